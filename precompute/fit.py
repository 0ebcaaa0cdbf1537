"""One entry point from the job to the concept learners: ``--method`` -> a basis (k, C) >= 0."""
from __future__ import annotations

import numpy as np
import torch

from .learners.nmf import NMF


def pixels(feats: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N*H*W, C) pixel activations."""
    n, c, h, w = feats.shape
    return np.ascontiguousarray(feats.transpose(0, 2, 3, 1).reshape(n * h * w, c))


def fit_basis(method: str, feats: np.ndarray, *, k: int, class_id: int, head_weight: np.ndarray | None,
              head_bias: np.ndarray | None, seed: int, device: torch.device, max_iter: int = 200,
              tol: float = 1e-4, params: dict | None = None) -> np.ndarray:
    """Learn class ``class_id``'s concept basis (k, C) >= 0 from its images' features (N, C, H, W).

    params: ``face_lambda`` (FACE's KL weight, default 1.0), ``attribution`` ("grad_x_act").
    FACE and attribution-weighted NMF need a GAP+linear head (head_weight, head_bias).
    """
    params = params or {}
    if method == "nmf":
        model = NMF(k, max_iter=max_iter, tol=tol, seed=seed, device=device).fit(torch.from_numpy(pixels(feats)))
    elif method == "directions":
        from .learners.directions import DirectionPairs

        model = DirectionPairs(k, seed=seed, device=device).fit(torch.from_numpy(pixels(feats)))
    elif method in ("face", "attribution"):
        if head_weight is None:
            raise ValueError(f"--method {method} needs a model whose head is global average pooling + linear")
        if method == "face":
            from .learners.face import FACE

            n, c, h, w = feats.shape
            acts = torch.from_numpy(np.ascontiguousarray(feats.reshape(n, c, h * w).transpose(0, 2, 1)))
            model = FACE(k, lam=float(params.get("face_lambda", 1.0)), seed=seed, device=device,
                         nmf_max_iter=max_iter).fit(acts, torch.from_numpy(head_weight), torch.from_numpy(head_bias),
                                                    class_id=class_id)
        else:
            from .learners.attribution import AttributionNMF

            model = AttributionNMF(k, method=params.get("attribution", "grad_x_act"), max_iter=max_iter, tol=tol,
                                   seed=seed, device=device).fit(torch.from_numpy(feats), torch.from_numpy(head_weight),
                                                                 torch.from_numpy(head_bias), class_id)
    else:
        raise ValueError(f"unknown method {method!r}: choose nmf, face, attribution or directions")
    return model.components_.detach().cpu().numpy().astype(np.float32)
