"""One entry point from the job to the concept learners: ``--method`` -> a basis (k, C) (rows >= 0; signed for seminmf).

Dispatch is the ``LEARNERS`` registry: each learner's ``fit_class`` takes one class's features and
the job's settings, so a new learner is a class and a registry entry.
"""
from __future__ import annotations

import numpy as np
import torch

from .learners import LEARNERS


def fit_basis(method: str, feats: np.ndarray, *, k: int, class_id: int, head_weight: np.ndarray | None,
              head_bias: np.ndarray | None, seed: int, device: torch.device, max_iter: int = 200,
              tol: float = 1e-4, params: dict | None = None) -> np.ndarray:
    """Learn class ``class_id``'s concept basis (k, C) from its images' features (N, C, H, W): rows >= 0, signed for seminmf.

    params: ``face_lambda`` (FACE's KL weight, default 1.0), ``attribution`` ("gradxact" | "deeplift",
    with ``deeplift_reference`` features).
    FACE and attribution-weighted NMF need a GAP+linear head (head_weight, head_bias).
    """
    return basis_of(fit_learner(method, feats, k=k, class_id=class_id, head_weight=head_weight,
                                head_bias=head_bias, seed=seed, device=device, max_iter=max_iter, tol=tol,
                                params=params))


def basis_of(learner) -> np.ndarray:
    """A fitted learner's served basis ``components_`` (k, C) as a float32 numpy array (a copy)."""
    return learner.components_.detach().cpu().numpy().astype(np.float32)


def fit_learner(method: str, feats: np.ndarray, *, k: int, class_id: int, head_weight: np.ndarray | None,
                head_bias: np.ndarray | None, seed: int, device: torch.device, max_iter: int = 200,
                tol: float = 1e-4, params: dict | None = None, init: np.ndarray | None = None):
    """As :func:`fit_basis`, returning the fitted learner itself: ``components_`` (k, C) is the
    served basis; a learner may also have ``served_tensors() -> {name: array}``, extra per-class
    tensors the bundle keeps as ``<name>/<class>`` (e.g. the decoding directions of ``directions``).
    ``init`` (k, C): a start basis for a learner that warm-starts (FACE); the others ignore it."""
    return _learner(method, head_weight, params).fit_class(
        feats, k=k, class_id=class_id, head_weight=head_weight, head_bias=head_bias, seed=seed, device=device,
        max_iter=max_iter, tol=tol, params=params or {}, init=init)


def sweep_learner(method: str, feats: np.ndarray, ks, *, class_id: int, head_weight: np.ndarray | None,
                  head_bias: np.ndarray | None, seed: int, device: torch.device, max_iter: int = 200,
                  tol: float = 1e-4, params: dict | None = None):
    """k -> :func:`fit_learner` of ``method`` on ``feats`` with k concepts, for each k of ``ks``; the
    learner shares what does not depend on k across the fits (``ConceptLearner.sweep``)."""
    return _learner(method, head_weight, params).sweep(
        feats, ks, class_id=class_id, head_weight=head_weight, head_bias=head_bias, seed=seed, device=device,
        max_iter=max_iter, tol=tol, params=params or {})


def _learner(method: str, head_weight, params: dict | None):
    from .learner_params import check_resolved

    check_resolved(params or {})
    learner = LEARNERS.get(method)
    if learner is None:
        raise ValueError(f"unknown method {method!r}: choose {', '.join(LEARNERS)}")
    if learner.needs_linear_head and head_weight is None:
        raise ValueError(f"--method {method} needs a model whose head is global average pooling + linear")
    return learner
