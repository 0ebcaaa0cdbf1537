"""Encoding/decoding direction pairs (arXiv 2509.23926), on torch, CPU or CUDA.

The model of the paper: a pixel's activations are a linear combination of concept *encoding
directions* e_k with the concepts' *latent factors* z_k >= 0 as coefficients, a = sum_k z_k e_k
(+ noise), and the factor of concept k is read back by an inner product with a filter, its
*decoding direction*: z_k = a . d_k.

- Directional clustering: spherical k-means of the pixel activations (assignment by cosine, each
  centroid the normalized sum of its members' raw activations, so strong pixels weigh more than
  near-zero ones, whose direction is mostly noise; k-means++ seeding on the unit sphere). Pixels
  where one concept dominates lie along its encoding direction, so the unit centroids m_k are the
  directions the concepts write.
- Decoding directions: the filters that read one cluster's direction and are blind to the others,
  d_k . m_j = [k = j], i.e. the rows of D = (M M^T + ridge)^-1 M (the dual basis of the centroids
  in their span). A filter has to cancel the other concepts it overlaps with: the centroid itself
  as a filter reads a share of every concept whose direction it is not orthogonal to.
- Encoding directions: signal vectors under the linear-Gaussian view (Haufe et al. 2014), the
  activation pattern that goes with the filters, E = Cov(z)^-1 Cov(z, a) with z = a D^T: the
  regression of the activations on all decoded factors together. For uncorrelated factors each row
  is the per-concept signal vector Cov(a, z_k) / Var(z_k) (``signal="single"``); concepts that
  exclude each other at a pixel are negatively correlated, and the joint form removes that bias.

Served as the paper describes it: ``components_`` (the basis the bundle stores) are the encoding
directions, what a concept adds to the activations (signed in general), and ``served_tensors()``
gives the decoding directions, which the service applies as a linear filter (latent factors
max(V D^T, 0); :mod:`conceptlens.service.projection`) instead of the NNLS projection.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import ConceptLearner, pixel_rows


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


def dual_filters(m: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """Filters D (k, C) with D m_j^T = [k = j] for the rows m_j of M (k, C), in the span of M:
    D = (M M^T + ridge * mean(diag) I)^-1 M (in float64). ``ridge`` keeps the filters bounded when
    two directions are nearly parallel."""
    m64 = m.double()
    gram = m64 @ m64.T
    lam = ridge * float(gram.diagonal().mean().clamp(min=1e-30))
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, m64).to(m.dtype)


def signal_vectors(x: torch.Tensor, z: torch.Tensor, joint: bool = True) -> torch.Tensor:
    """Encoding directions (k, C) of latent factors z (n, k) of rows X (n, C) (Haufe et al. 2014).

    ``joint``: Cov(z)^-1 Cov(z, X), the pattern of all filters together; else per concept
    Cov(X, z_k) / Var(z_k) (the same when the factors are uncorrelated)."""
    x64, z64 = x.double(), z.double()
    xc, zc = x64 - x64.mean(0), z64 - z64.mean(0)
    cross = zc.T @ xc  # (k, C): n Cov(z, X)
    if not joint:
        return (cross / zc.square().sum(0).clamp(min=1e-30)[:, None]).to(x.dtype)
    cov = zc.T @ zc  # (k, k): n Cov(z)
    return (torch.linalg.pinv(cov, hermitian=True) @ cross).to(x.dtype)


class DirectionPairs(ConceptLearner):
    """Decoding directions from spherical k-means, encoding directions as signal vectors.

    ``fit(X (n, C))`` sets ``centroids_`` (k, C) unit cluster directions, ``decoding_`` (k, C) filters
    (``decoding_ @ centroids_.T`` = I), ``encoding_`` (k, C), ``components_`` (k, C) = ``encoding_``
    (the served basis: what concept k adds to a pixel per unit of its latent factor) and ``labels_``
    (n,) (-1 for all-zero rows, which have no direction). ``score``: "projection" (z_k = x . d_k) or
    "assignment" (the same, 0 outside cluster k), the factors the signal vectors are estimated from.
    ``signal``: "joint" or "single" (see :func:`signal_vectors`). ``n_init`` restarts, the best
    (largest sum of x . m_assigned) kept.
    """

    needs_linear_head = False

    @classmethod
    def fit_class(cls, feats, *, k: int, seed: int, device, **_) -> "DirectionPairs":
        """One class's features (N, C, H, W) -> fitted (the job's entry, as ``NMF.fit_class``)."""
        return cls(k, seed=seed, device=device).fit(torch.from_numpy(pixel_rows(feats)))

    def __init__(self, n_components: int, max_iter: int = 100, tol: float = 1e-6, n_init: int = 3, seed: int = 0,
                 score: str = "projection", signal: str = "joint", ridge: float = 1e-4,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(n_components, device, dtype)
        if score not in ("projection", "assignment"):
            raise ValueError(f"unknown score {score!r}")
        if signal not in ("joint", "single"):
            raise ValueError(f"unknown signal {signal!r}")
        self.max_iter, self.tol, self.n_init, self.seed = max_iter, tol, n_init, seed
        self.score, self.signal, self.ridge = score, signal, ridge
        for name in ("centroids_", "decoding_", "encoding_", "labels_"):
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
            m, lab, obj, it = self._cluster(xs, xu, ns, gen)
            if best is None or obj > best[2]:
                best = (m, lab, obj, it)
        m, lab, self.inertia_, self.n_iter_ = best
        labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=self.device)
        labels[live] = lab
        self.labels_, self.centroids_ = labels, m
        self.decoding_ = dual_filters(m, self.ridge)
        z = x @ self.decoding_.T
        if self.score == "assignment":
            z = z * (labels[:, None] == torch.arange(m.shape[0], device=x.device))
        self.encoding_ = signal_vectors(x, z, joint=self.signal == "joint")
        self.components_ = self.encoding_
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

    def served_tensors(self) -> dict[str, np.ndarray]:
        """What the bundle keeps beside the basis (``<name>/<class>``): the decoding directions (k, C)."""
        return {"decoding": self.decoding_.detach().cpu().numpy().astype(np.float32)}

    @torch.no_grad()
    def encode(self, x) -> torch.Tensor:
        """Latent factors z (n, k) = X d^T of rows X (n, C) (the decoding directions as filters; unclipped)."""
        return torch.as_tensor(x).detach().to(self.device, self.dtype) @ self.decoding_.T

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Activations (n, C) = z e (the encoding directions as the generative model)."""
        return z @ self.encoding_
