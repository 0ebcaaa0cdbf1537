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

__all__ = ["NMF", "SOLVERS", "EPS", "hals_fit", "hals_fit_many", "lowrank_svd", "mu_fit", "nndsvda_init", "pixel_rows", "resolve_device", "to_numpy"]


def lowrank_svd(x: torch.Tensor, k: int, seed: int = 0, niter: int = 2
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top singular triplets (U (n, q), S (q,), V (C, q)) of X (n, C) that NNDSVDa needs for up to
    k components: randomized (Halko et al.), q = k + 10 oversampled, ``niter`` power iterations (each
    two passes over X; a start needs the leading directions roughly, not to many digits), seeded
    without touching torch's global generator. One of them serves every k' <= k (:meth:`NMF.sweep`)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return torch.svd_lowrank(x, q=min(k + 10, min(x.shape)), niter=niter)
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
    Stops after ``max_sweeps`` or once a sweep changes W by less than ``delta`` times the first
    (a sweep's change: the squared norm of W after it minus W before it; each row moves once a sweep).
    """
    first = None
    inv_diag = 1.0 / hht.diagonal().clamp(min=EPS)
    for _ in range(max_sweeps):
        before = wt.clone()
        for j in range(wt.shape[0]):
            step = torch.addmv(xht_t[j], wt.T, hht[j], alpha=-1)  # (X H^T)_j - (H H^T)_j W^T
            wt[j].add_(step.mul_(inv_diag[j])).clamp_(min=EPS)
        change = float((wt - before).square().sum())
        if first is None:
            first = change
        elif change <= delta * delta * first:
            break
    return wt


def hals_fit(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, max_iter: int, tol: float,
             inner: int = 10, callback: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Accelerated HALS from (W, H). Returns W, H and the number of outer iterations run."""
    return hals_fit_many(x, [(w, h)], max_iter, tol, inner, [callback] if callback else None)[0]


def hals_fit_many(x: torch.Tensor, starts: list[tuple[torch.Tensor, torch.Tensor]], max_iter: int, tol: float,
                  inner: int = 10, callbacks: list[Callable[[int, float], None]] | None = None
                  ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """:func:`hals_fit` of several factorizations of the same X (n, C) at once (a k sweep), each from
    its (W (n, k_i), H (k_i, C)) and stopping on its own; the two passes over X of an outer iteration
    serve every fit still running, stacked (X's passes are memory-bound: one over 28 stacked rows costs
    about what one over 3 does). Each fit's arithmetic is :func:`hals_fit`'s. Returns (W, H, outer
    iterations) per start."""
    norm_x = x.square().sum()
    wts = [w.T.contiguous() for w, _ in starts]  # W kept as W^T (k, n), H as (k, C): contiguous sweeps
    hs = [h for _, h in starts]
    prev: list[float | None] = [None] * len(starts)
    iters = [0] * len(starts)
    running = list(range(len(starts)))
    for it in range(1, max_iter + 1):
        if not running:
            break
        sizes = [hs[i].shape[0] for i in running]
        hxts = torch.cat([hs[i] for i in running]) @ x.T
        for i, hxt in zip(running, hxts.split(sizes)):
            wts[i] = _hals_sweeps(wts[i], hxt, hs[i] @ hs[i].T, inner)
        wtxs = torch.cat([wts[i] for i in running]) @ x
        still = []
        for i, wtx in zip(running, wtxs.split(sizes)):
            wtw = wts[i] @ wts[i].T
            hs[i] = _hals_sweeps(hs[i], wtx, wtw, inner)
            # ||X - WH||^2 from quantities already computed: ||X||^2 - 2 <W^T X, H> + <W^T W, H H^T>
            loss = float((norm_x - 2 * (wtx * hs[i]).sum() + (wtw * (hs[i] @ hs[i].T)).sum()).clamp(min=0) / 2)
            iters[i] = it
            if callbacks:
                callbacks[i](it, loss)
            if prev[i] is not None and prev[i] - loss <= tol * prev[i]:
                continue
            prev[i] = loss
            still.append(i)
        running = still
    return [(wts[i].T.contiguous(), hs[i], iters[i]) for i in range(len(starts))]


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
    def fit_class(cls, feats, *, k: int, seed: int = 0, device=None, max_iter: int = 200, tol: float = 1e-4,
                  init=None, **_) -> "NMF":
        """The job's entry (:meth:`ConceptLearner.fit_class`); ``init`` (k, C) >= 0: a start basis
        (e.g. the chosen k's basis on part of the same images) instead of NNDSVDa."""
        x = torch.from_numpy(pixel_rows(feats))
        return cls(k, max_iter=max_iter, tol=tol, seed=seed, device=device).fit(x, init=init)

    @classmethod
    def sweep(cls, feats, ks, *, seed: int = 0, device=None, max_iter: int = 200, tol: float = 1e-4, **_):
        """k -> NMF fitted on one class's features (N, C, H, W) for each k of ``ks``: the pixel rows and
        the SVD of the initialization are computed once for all of them, and the fits run side by side
        (:func:`hals_fit_many`: one pass over X an iteration for every k), all of them at the first k
        asked for."""
        x = torch.from_numpy(pixel_rows(feats)).to(resolve_device(device))
        ks = sorted({int(k) for k in ks})
        fitted: dict[int, NMF] = {}

        def fit_k(k: int) -> "NMF":
            if k not in fitted:
                todo = [cls(j, max_iter=max_iter, tol=tol, seed=seed, device=device)
                        for j in ([j for j in ks if j not in fitted] if k in ks else [k])]
                xs = todo[0]._as_input(x)
                svd = lowrank_svd(xs, max(m.n_components for m in todo), seed)
                cls.fit_many(todo, xs, svd)
                fitted.update({m.n_components: m for m in todo})
            return fitted[k]
        return fit_k

    @staticmethod
    @torch.no_grad()
    def fit_many(models: list["NMF"], x: torch.Tensor, svd: tuple | None = None) -> None:
        """Fit ``models`` (HALS, each its own k) on the same X (n, C) side by side
        (:func:`hals_fit_many`), each from NNDSVDa (``svd``: X's :func:`lowrank_svd` for the largest k)."""
        if any(m.solver != "hals" for m in models) or len({(m.max_iter, m.tol) for m in models}) > 1:
            raise ValueError("fit_many runs the hals solver with one max_iter and tol for every model")
        if x.shape[0] < max(m.n_components for m in models):
            raise ValueError(f"{x.shape[0]} rows are too few for {max(m.n_components for m in models)} components")
        starts = [nndsvda_init(x, m.n_components, m.seed, svd) for m in models]
        losses: list[list[float]] = [[] for _ in models]
        results = hals_fit_many(x, starts, models[0].max_iter, models[0].tol,
                                callbacks=[lambda i, loss, ls=ls: ls.append(loss) for ls in losses])
        for m, (_, h, it), ls in zip(models, results, losses):
            m.components_, m.n_iter_, m.loss_ = h, it, ls[-1] if ls else float("nan")

    def _start(self, x: torch.Tensor, svd: tuple | None, init) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, H) to start from: NNDSVDa, or H = ``init`` with W its least-squares codes clamped >= 0."""
        if init is None:
            return nndsvda_init(x, self.n_components, self.seed, svd)
        h = torch.as_tensor(init).to(x.device, x.dtype).clamp(min=EPS)
        if h.shape != (self.n_components, x.shape[1]):
            raise ValueError(f"init of shape {tuple(h.shape)} cannot start k={self.n_components} on C={x.shape[1]}")
        w = ((x @ h.T) @ torch.linalg.pinv(h @ h.T)).clamp(min=EPS)
        return w, h

    @torch.no_grad()
    def fit_transform(self, x, svd: tuple | None = None, init=None) -> torch.Tensor:
        """Learn the basis from X (n, C); returns the training codes W (n, k). ``svd``: X's
        :func:`lowrank_svd` (for at least k components) when computed already; ``init`` (k, C): a
        start basis instead of NNDSVDa."""
        x = self._as_input(x)
        if x.shape[0] < self.n_components:
            raise ValueError(f"{x.shape[0]} rows are too few for {self.n_components} components")
        w, h = self._start(x, svd, init)
        losses: list[float] = []
        w, h, self.n_iter_ = SOLVERS[self.solver](x, w, h, self.max_iter, self.tol,
                                                  callback=lambda i, l: losses.append(l))
        self.loss_ = losses[-1] if losses else float("nan")
        self.components_ = h
        return w

    def fit(self, x, svd: tuple | None = None, init=None) -> "NMF":
        self.fit_transform(x, svd, init)
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
