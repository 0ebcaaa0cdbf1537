"""Semi-NMF concept learner (Ding, Li & Jordan 2010), on torch, CPU or CUDA.

For layers whose activations are signed (SiLU/GELU stages, pre-ReLU layers), where plain NMF does not
apply: X (n, C) signed pixel activations ~ S (n, k) codes >= 0 @ P (k, C) signed directions, minimizing
1/2 ||X - S P||_F^2. The served projection is unchanged: NNLS of a pixel on the fixed basis P, which
needs S >= 0 only, not P >= 0.

Alternating minimization:
- P given S: regularised least squares P = (S^T S + eps I)^-1 S^T X, eps = ``ridge`` times the mean of
  diag(S^T S) (a direction whose codes have all died is re-seeded with the worst-reconstructed row of X);
- S given P: a few sweeps of projected coordinate descent (HALS) on the codes, the NMF learner's.
Init: P from a short spherical k-means of X's rows (k-means++ seeding on the unit sphere, weighted by
the row norms, as the direction-pair learner; the best of ``kmeans_init`` restarts by the k-means
objective, not by the semi-NMF loss, which a cone wider than the data's can lower), S from HALS given P.
Stops when the relative decrease of the loss over one outer iteration falls below ``tol``, or after
``max_iter``. At the end the rows of P are scaled to unit norm (S rescaled to keep S P) and the codes
are solved once more to convergence, so the training codes are the NNLS codes of the returned basis.
Deterministic for a seed (the k-means++ draws use a CPU generator seeded with ``seed``).

Shapes: X (n, C) float32, S (n, k) >= 0, P = ``components_`` (k, C); ``fit_class`` takes feature maps
(N, C, H, W) -> rows (N*H*W, C) by the NMF learner's ``pixel_rows``.
"""
from __future__ import annotations

import torch

from .base import ConceptLearner
from .directions import _kmeanspp
from .nmf import EPS, _hals_sweeps


def spherical_kmeans(x: torch.Tensor, k: int, gen: torch.Generator, n_iter: int = 10, n_init: int = 3
                     ) -> torch.Tensor:
    """k unit directions (k, C) of the rows of X (n, C): k-means++ seeding on the unit sphere weighted by
    row norm, then up to ``n_iter`` rounds of cosine assignment / norm-weighted centroid; of ``n_init``
    restarts the one with the largest sum_i x_i . d_assigned(i) is kept. All-zero rows are ignored.
    Centroids by one-hot matmul (no atomics: deterministic on CUDA too)."""
    norm = x.norm(dim=1)
    live = norm > 0
    xs, ns = x[live], norm[live]
    if xs.shape[0] < k:
        raise ValueError(f"{xs.shape[0]} non-zero rows are too few for {k} components")
    xu = xs / ns[:, None]
    best_d, best_obj = None, -float("inf")
    for _ in range(max(1, n_init)):
        d = _kmeanspp(xu, ns, k, gen)
        for _ in range(n_iter):
            cos, lab = (xu @ d.T).max(dim=1)
            sums = torch.nn.functional.one_hot(lab, k).to(x.dtype).T @ xs  # (k, C): strong pixels weigh more
            empty = sums.norm(dim=1) == 0
            if empty.any():  # refill an empty cluster with the worst-fitted rows
                sums[empty] = xs[torch.argsort(cos)[: int(empty.sum())]]
            new = sums / sums.norm(dim=1, keepdim=True)
            if torch.equal(new, d):
                break
            d = new
        obj = float((ns * (xu @ d.T).max(dim=1).values).sum())
        if obj > best_obj:
            best_d, best_obj = d, obj
    return best_d


def _solve_codes(st: torch.Tensor, x: torch.Tensor, p: torch.Tensor, sweeps: int, delta: float = 0.1) -> torch.Tensor:
    """HALS on the codes S^T (k, n) >= 0 for fixed P (k, C); in place, returns S^T."""
    return _hals_sweeps(st, p @ x.T, p @ p.T, sweeps, delta)


def _init_codes(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """S^T (k, n) start: the unconstrained least-squares codes, clipped >= EPS."""
    ppt = p @ p.T
    return (torch.linalg.pinv(ppt) @ (p @ x.T)).clamp(min=EPS).contiguous()


class SemiNMF(ConceptLearner):
    """Semi-NMF with fit / encode / decode: X (n, C) signed ~ S (n, k) >= 0 @ P (k, C) signed.

    ``components_`` (k, C) float32, unit rows, are the concept directions; ``fit_transform`` returns the
    training codes S (n, k) >= 0; ``encode`` gives codes for new rows by non-negative least squares with
    the basis fixed; ``loss_`` is 1/2 ||X - S P||^2 at the end, ``n_iter_`` the outer iterations run.
    """

    # fit_class: ConceptLearner's (the pixel rows of one class's features, signed)

    def __init__(self, n_components: int, max_iter: int = 200, tol: float = 1e-4, seed: int = 0,
                 inner: int = 10, ridge: float = 1e-6, kmeans_iter: int = 10, kmeans_init: int = 10,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(n_components, device, dtype)
        self.max_iter, self.tol, self.seed = max_iter, tol, seed
        self.inner, self.ridge, self.kmeans_iter, self.kmeans_init = inner, ridge, kmeans_iter, kmeans_init
        self.n_iter_ = 0
        self.loss_ = float("nan")

    def _as_input(self, x) -> torch.Tensor:
        x = torch.as_tensor(x).detach().to(self.device, self.dtype)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D (n, C) matrix, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("semi-NMF input must be finite")
        return x

    def _update_basis(self, x: torch.Tensor, st: torch.Tensor, stx: torch.Tensor, sts: torch.Tensor
                      ) -> tuple[torch.Tensor, bool]:
        """P = (S^T S + eps I)^-1 S^T X; directions whose codes all died are re-seeded with the
        worst-fitted rows of X (their codes in ``st`` set to 1, in place). Returns P and whether any was."""
        k = sts.shape[0]
        eps = self.ridge * float(sts.diagonal().mean()) + EPS
        p = torch.linalg.solve(sts + eps * torch.eye(k, dtype=sts.dtype, device=sts.device), stx)
        dead = st.amax(dim=1) <= 1e3 * EPS
        if dead.any():
            resid = (x - st.T @ p).square().sum(dim=1)
            worst = torch.argsort(resid, descending=True)[: int(dead.sum())]
            p[dead] = x[worst]
            st[dead] = 1.0  # revived with unit codes; the next S sweep re-fits them
        return p, bool(dead.any())

    @torch.no_grad()
    def fit_transform(self, x) -> torch.Tensor:
        """Learn the basis from X (n, C) signed; returns the training codes S (n, k) >= 0."""
        x = self._as_input(x)
        k = self.n_components
        if x.shape[0] < k:
            raise ValueError(f"{x.shape[0]} rows are too few for {k} components")
        gen = torch.Generator().manual_seed(self.seed)
        p = spherical_kmeans(x, k, gen, self.kmeans_iter, self.kmeans_init)
        st = _solve_codes(_init_codes(x, p), x, p, self.inner)
        norm_x = x.square().sum()
        prev = None
        it = 0
        for it in range(1, self.max_iter + 1):
            stx, sts = st @ x, st @ st.T
            revived = False
            if it > 1:
                p, revived = self._update_basis(x, st, stx, sts)
                st = _solve_codes(st, x, p, self.inner)
                stx, sts = st @ x, st @ st.T
            # ||X - SP||^2 = ||X||^2 - 2 <S^T X, P> + <S^T S, P P^T>, from what the next update needs anyway
            loss = float((norm_x - 2 * (stx * p).sum() + (sts * (p @ p.T)).sum()).clamp(min=0) / 2)
            if prev is not None and not revived and prev - loss <= self.tol * prev:
                break
            prev = None if revived else loss  # a re-seeded direction may raise the loss once
        # unit rows (S P unchanged), then the codes of the final basis solved to convergence
        scale = p.norm(dim=1).clamp(min=EPS)
        p = p / scale[:, None]
        st = (st * scale[:, None]).contiguous()
        st = _solve_codes(st, x, p, 200, delta=1e-4)
        self.n_iter_ = it
        self.loss_ = float((x - st.T @ p).square().sum() / 2)
        self.components_ = p.contiguous()
        return st.T.contiguous()

    def fit(self, x) -> "SemiNMF":
        self.fit_transform(x)
        return self

    @torch.no_grad()
    def encode(self, x, max_iter: int = 200, tol: float = 1e-6) -> torch.Tensor:
        """Codes (n, k) >= 0 of X (n, C) for the fixed basis (HALS on the codes only)."""
        x = self._as_input(x)
        p = self.components_
        pxt, ppt = p @ x.T, p @ p.T
        st = _init_codes(x, p)
        for _ in range(max_iter):
            old = st.clone()
            _hals_sweeps(st, pxt, ppt, 1)
            if (st - old).abs().max() <= tol * st.abs().max().clamp(min=EPS):
                break
        return st.T.contiguous()
