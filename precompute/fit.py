"""One entry point from the job to the concept learners: ``--method`` -> a basis (k, C)."""
from __future__ import annotations

import numpy as np
import torch

from .learners.nmf import NMF


def pixels(feats: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N*H*W, C) pixel activations."""
    n, c, h, w = feats.shape
    return np.ascontiguousarray(feats.transpose(0, 2, 3, 1).reshape(n * h * w, c))


def fit_basis(method: str, feats: np.ndarray, *, k: int, class_id: int, head_weight: np.ndarray | None,
              head_bias: np.ndarray | None, head_fn, seed: int, device: torch.device, max_iter: int = 200,
              tol: float = 1e-4, params: dict | None = None) -> np.ndarray:
    """Learn class ``class_id``'s concept basis (k, C) >= 0 from its images' features (N, C, H, W)."""
    if method == "nmf":
        nmf = NMF(k, max_iter=max_iter, tol=tol, seed=seed, device=device).fit(torch.from_numpy(pixels(feats)))
        return nmf.components_.cpu().numpy().astype(np.float32)
    raise ValueError(f"unknown method {method!r}")
