"""NMF concept learner (ICE's reducer), on torch, CPU or CUDA.

X (n, C) >= 0 pixel activations ~ W (n, k) codes @ H (k, C) basis, minimizing 1/2 ||X - W H||_F^2.
Solvers (registry ``SOLVERS``): ``hals`` (accelerated HALS, Gillis & Glineur 2012: several cheap
coordinate sweeps per pass over X, since the passes over X dominate) and ``mu`` (multiplicative
updates, for reference). Init: NNDSVDa (Boutsidis & Gallopoulos 2008, zeros filled with the mean),
as scikit-learn's default. Stops when the relative decrease of the loss over one outer iteration
falls below ``tol``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .base import EPS, ConceptLearner, pixel_rows, resolve_device, to_numpy

__all__ = ["NMF", "SOLVERS", "EPS", "hals_fit", "lowrank_svd", "mu_fit", "nndsvda_init", "pixel_rows", "resolve_device", "to_numpy"]


def lowrank_svd(x: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top singular triplets (U (n, q), S (q,), V (C, q)) of X (n, C) that NNDSVDa needs for up to
    k components: randomized (Halko et al.), q = k + 10 oversampled, seeded without touching torch's
    global generator. One of them serves every k' <= k (:meth:`NMF.sweep`)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return torch.svd_lowrank(x, q=min(k + 10, min(x.shape)), niter=4)
    finally:
        torch.random.set_rng_state(gen_state)


def nndsvda_init(x: torch.Tensor, k: int, seed: int = 0, svd: tuple | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD with zeros replaced by the mean of X: W (n, k), H (k, C), both >= 0. ``svd``: X's
    :func:`lowrank_svd` for at least k components, when computed already."""
    u, s, v = svd if svd is not None else lowrank_svd(x, k, seed)
    if s.shape[0] < k:
        raise ValueError(f"an SVD of {s.shape[0]} components cannot start {k}")
    u, s, v = u[:, :k], s[:k], v[:, :k]
    w = torch.zeros(x.shape[0], k, dtype=x.dtype, device=x.device)
    h = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    w[:, 0] = s[0].sqrt() * u[:, 0].abs()
    h[0] = s[0].sqrt() * v[:, 0].abs()
    for j in range(1, k):
        a, b = u[:, j], v[:, j]
        ap, an, bp, bn = a.clamp(min=0), (-a).clamp(min=0), b.clamp(min=0), (-b).clamp(min=0)
        apn, bpn, ann, bnn = ap.norm(), bp.norm(), an.norm(), bn.norm()
        if apn * bpn >= ann * bnn:
            uu, vv, sigma = ap / (apn + EPS), bp / (bpn + EPS), apn * bpn
        else:
            uu, vv, sigma = an / (ann + EPS), bn / (bnn + EPS), ann * bnn
        lam = (s[j] * sigma).sqrt()
        w[:, j] = lam * uu
        h[j] = lam * vv
    avg = x.mean()
    w[w == 0] = avg / 100
    h[h == 0] = avg / 100
    return w, h


def _hals_sweeps(wt: torch.Tensor, xht_t: torch.Tensor, hht: torch.Tensor, max_sweeps: int, delta: float = 0.1
                 ) -> torch.Tensor:
    """Coordinate sweeps on W^T (k, n) for fixed (X H^T)^T (k, n) and H H^T (k, k); in place.

    Rows are contiguous, so each coordinate update is one fused multiply-add over n values.
    Stops after ``max_sweeps`` or once a sweep changes W by less than ``delta`` times the first.
    """
    first = None
    diag = hht.diagonal().clamp(min=EPS)
    for _ in range(max_sweeps):
        change = 0.0
        for j in range(wt.shape[0]):
            step = (xht_t[j] - hht[j] @ wt) / diag[j]
            new = (wt[j] + step).clamp_(min=EPS)
            change += float((new - wt[j]).square().sum())
            wt[j] = new
        if first is None:
            first = change
        elif change <= delta * delta * first:
            break
    return wt


def hals_fit(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, max_iter: int, tol: float,
             inner: int = 10, callback: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Accelerated HALS from (W, H). Returns W, H and the number of outer iterations run."""
    norm_x = x.square().sum()
    wt = w.T.contiguous()
    prev = None
    it = 0
    for it in range(1, max_iter + 1):
        # W is kept as W^T (k, n) and H as (k, C): both updates sweep over contiguous rows.
        hxt, hht = h @ x.T, h @ h.T
        wt = _hals_sweeps(wt, hxt, hht, inner)
        wtx, wtw = wt @ x, wt @ wt.T
        h = _hals_sweeps(h, wtx, wtw, inner)
        # ||X - WH||^2 from quantities already computed: ||X||^2 - 2 <W^T X, H> + <W^T W, H H^T>
        loss = float((norm_x - 2 * (wtx * h).sum() + (wtw * (h @ h.T)).sum()).clamp(min=0) / 2)
        if callback:
            callback(it, loss)
        if prev is not None and prev - loss <= tol * prev:
            break
        prev = loss
    return wt.T.contiguous(), h, it


def mu_fit(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, max_iter: int, tol: float,
           inner: int = 1, callback: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Multiplicative updates (Lee & Seung), Frobenius loss."""
    prev = None
    it = 0
    for it in range(1, max_iter + 1):
        h = h * (w.T @ x) / (w.T @ w @ h + EPS)
        w = w * (x @ h.T) / (w @ (h @ h.T) + EPS)
        loss = float((x - w @ h).square().sum() / 2)
        if callback:
            callback(it, loss)
        if prev is not None and prev - loss <= tol * prev:
            break
        prev = loss
    return w, h, it


SOLVERS: dict[str, Callable] = {"hals": hals_fit, "mu": mu_fit}


class NMF(ConceptLearner):
    """Non-negative matrix factorization with fit / encode / decode.

    ``components_`` (k, C) are the concept directions; ``encode`` gives codes (n, k) for new rows
    by non-negative least squares with the basis fixed.
    """

    # fit_class: ConceptLearner's (the pixel rows of one class's features)

    def __init__(self, n_components: int, solver: str = "hals", max_iter: int = 200, tol: float = 1e-4,
                 seed: int = 0, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        if solver not in SOLVERS:
            raise ValueError(f"unknown NMF solver {solver!r}; choose from {sorted(SOLVERS)}")
        super().__init__(n_components, device, dtype)
        self.solver, self.max_iter, self.tol, self.seed = solver, max_iter, tol, seed
        self.n_iter_ = 0
        self.loss_ = float("nan")

    def _as_input(self, x) -> torch.Tensor:
        x = torch.as_tensor(x).to(self.device, self.dtype)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D (n, C) matrix, got shape {tuple(x.shape)}")
        if (x < 0).any():
            raise ValueError("NMF input must be non-negative")
        return x

    @classmethod
    def sweep(cls, feats, ks, *, seed: int = 0, device=None, max_iter: int = 200, tol: float = 1e-4, **_):
        """k -> NMF fitted on one class's features (N, C, H, W) for each k of ``ks``: the pixel rows and
        the SVD of the initialization are computed once for all of them (the k sweep's cost is the
        fits, not n_k copies of the same start)."""
        x = torch.from_numpy(pixel_rows(feats)).to(resolve_device(device))
        svd = lowrank_svd(x, max(ks), seed)

        def fit_k(k: int) -> "NMF":
            return cls(k, max_iter=max_iter, tol=tol, seed=seed, device=device).fit(x, svd=svd)
        return fit_k

    @torch.no_grad()
    def fit_transform(self, x, svd: tuple | None = None) -> torch.Tensor:
        """Learn the basis from X (n, C); returns the training codes W (n, k). ``svd``: X's
        :func:`lowrank_svd` (for at least k components) when computed already."""
        x = self._as_input(x)
        if x.shape[0] < self.n_components:
            raise ValueError(f"{x.shape[0]} rows are too few for {self.n_components} components")
        w, h = nndsvda_init(x, self.n_components, self.seed, svd)
        losses: list[float] = []
        w, h, self.n_iter_ = SOLVERS[self.solver](x, w, h, self.max_iter, self.tol,
                                                  callback=lambda i, l: losses.append(l))
        self.loss_ = losses[-1] if losses else float("nan")
        self.components_ = h
        return w

    def fit(self, x, svd: tuple | None = None) -> "NMF":
        self.fit_transform(x, svd)
        return self

    @torch.no_grad()
    def encode(self, x, max_iter: int = 200, tol: float = 1e-6) -> torch.Tensor:
        """Codes (n, k) >= 0 of X (n, C) for the fixed basis (HALS on the codes only)."""
        x = self._as_input(x)
        h = self.components_
        hht, hxt = h @ h.T, h @ x.T
        wt = (torch.linalg.pinv(hht) @ hxt).clamp(min=EPS)
        for _ in range(max_iter):
            old = wt.clone()
            _hals_sweeps(wt, hxt, hht, 1)
            if (wt - old).abs().max() <= tol * wt.abs().max().clamp(min=EPS):
                break
        return wt.T.contiguous()
