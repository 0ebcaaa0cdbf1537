"""Encoding/decoding direction pairs (arXiv 2509.23926), on torch, CPU or CUDA.

Decoding directions d_k (filters: the latent factor of concept k is z_k = a . d_k) come from directional
clustering of pixel activations: spherical k-means, assignment by cosine, each centroid the normalized
sum of its members' raw activations (so strong pixels weigh more than near-zero ones, whose direction is
mostly noise), k-means++ seeding on the unit sphere. Encoding directions (what the network adds to a
when concept k is present) are estimated as signal vectors e_k = Cov(a, z_k) / Var(z_k) (Haufe et al.
2014), which undo the correlations between concepts that a filter has to cancel.

Served like any basis: ``components_`` are the decoding directions with negative entries clipped and
rows renormalized, so the service's NNLS projection applies unchanged. For non-negative (post-ReLU)
activations the centroids are already non-negative and the clip changes nothing.
"""
from __future__ import annotations

import torch
from torch import nn

from .nmf import pixel_rows, resolve_device


def _kmeanspp(x: torch.Tensor, weight: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k rows of unit-norm X (n, C), D^2 sampling with chord distance 2 (1 - cos), weighted by ``weight``."""
    first = int(torch.multinomial(weight.cpu(), 1, generator=gen))
    centers = [x[first]]
    d2 = (2 - 2 * x @ centers[0]).clamp(min=0)
    for _ in range(1, k):
        p = (weight * d2).double().cpu()
        idx = int(torch.multinomial(p, 1, generator=gen)) if float(p.sum()) > 0 else int(torch.randint(
            x.shape[0], (1,), generator=gen))
        centers.append(x[idx])
        d2 = torch.minimum(d2, (2 - 2 * x @ x[idx]).clamp(min=0))
    return torch.stack(centers)


class DirectionPairs(nn.Module):
    """Decoding directions by spherical k-means, encoding directions as signal vectors.

    ``fit(X (n, C))`` sets ``decoding_`` (k, C) unit rows, ``encoding_`` (k, C), ``components_`` (k, C)
    (decoding, clipped >= 0, renormalized) and ``labels_`` (n,) (-1 for all-zero rows, which have no
    direction). ``score``: "projection" (z_k = x . d_k) or "assignment" (the same, 0 outside cluster k).
    ``n_init`` restarts, the best (largest sum of x . d_assigned) kept.
    """

    needs_linear_head = False

    @classmethod
    def fit_class(cls, feats, *, k: int, seed: int, device, **_) -> "DirectionPairs":
        """One class's features (N, C, H, W) -> fitted (the job's entry, as ``NMF.fit_class``)."""
        return cls(k, seed=seed, device=device).fit(torch.from_numpy(pixel_rows(feats)))

    def __init__(self, n_components: int, max_iter: int = 100, tol: float = 1e-6, n_init: int = 3, seed: int = 0,
                 score: str = "projection", device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if n_components < 1:
            raise ValueError("n_components must be at least 1")
        if score not in ("projection", "assignment"):
            raise ValueError(f"unknown score {score!r}")
        self.n_components, self.max_iter, self.tol, self.n_init, self.seed = n_components, max_iter, tol, n_init, seed
        self.score, self.device, self.dtype = score, resolve_device(device), dtype
        for name in ("components_", "decoding_", "encoding_", "labels_"):
            self.register_buffer(name, torch.zeros(0))
        self.n_iter_, self.inertia_ = 0, float("nan")

    @torch.no_grad()
    def fit(self, x) -> "DirectionPairs":
        x = torch.as_tensor(x).detach().to(self.device, self.dtype)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D (n, C) matrix, got shape {tuple(x.shape)}")
        norm = x.norm(dim=1)
        live = norm > 0
        xs, ns = x[live], norm[live]
        if xs.shape[0] < self.n_components:
            raise ValueError(f"{xs.shape[0]} non-zero rows are too few for {self.n_components} directions")
        xu = xs / ns[:, None]
        gen = torch.Generator().manual_seed(self.seed)
        best = None
        for _ in range(self.n_init):
            d, lab, obj, it = self._cluster(xs, xu, ns, gen)
            if best is None or obj > best[2]:
                best = (d, lab, obj, it)
        d, lab, self.inertia_, self.n_iter_ = best
        labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=self.device)
        labels[live] = lab
        self.labels_, self.decoding_ = labels, d
        self.encoding_ = self._signal_vectors(x, labels, d)
        p = d.clamp(min=0)
        self.components_ = p / p.norm(dim=1, keepdim=True).clamp(min=1e-30)
        return self

    def _cluster(self, xs, xu, ns, gen):
        d = _kmeanspp(xu, ns, self.n_components, gen)
        prev = None
        for it in range(1, self.max_iter + 1):
            cos = xu @ d.T
            best_cos, lab = cos.max(dim=1)
            obj = float((ns * best_cos).sum())  # sum_i x_i . d_{c(i)}: what both steps increase
            sums = torch.zeros_like(d).index_add_(0, lab, xs)
            empty = sums.norm(dim=1) == 0
            if empty.any():  # refill an empty cluster with the worst-fitted points
                worst = torch.argsort(best_cos)[: int(empty.sum())]
                sums[empty] = xs[worst]
            d = sums / sums.norm(dim=1, keepdim=True)
            if prev is not None and obj - prev <= self.tol * abs(obj):
                break
            prev = obj
        lab = (xu @ d.T).argmax(dim=1)
        return d, lab, float((ns * (xu @ d.T).max(dim=1).values).sum()), it

    def _signal_vectors(self, x: torch.Tensor, labels: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """e_k = Cov(x, z_k) / Var(z_k) over all rows: (k, C)."""
        z = x @ d.T
        if self.score == "assignment":
            z = z * (labels[:, None] == torch.arange(d.shape[0], device=x.device))
        xc, zc = x - x.mean(0), z - z.mean(0)
        return (zc.T @ xc) / zc.square().sum(0).clamp(min=1e-30)[:, None]

    @torch.no_grad()
    def encode(self, x) -> torch.Tensor:
        """Latent factors z (n, k) = X d^T of rows X (n, C) (the decoding directions as filters)."""
        return torch.as_tensor(x).detach().to(self.device, self.dtype) @ self.decoding_.T

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Activations (n, C) = z e (the encoding directions as the generative model)."""
        return z @ self.encoding_
