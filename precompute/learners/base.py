"""The small base every concept learner of ``LEARNERS`` shares (as overcomplete's ``BaseDictionaryLearning``).

A learner is a ``torch.nn.Module`` with ``n_components`` (k), ``device`` (a resolved ``torch.device``),
a ``components_`` buffer (k, C) (the served basis, set by ``fit``), ``fit(X) -> self``, ``encode(X) ->
codes (n, k)`` and ``decode(codes) -> (n, C)``. ``fit_class`` is the precompute job's entry: one class's
images' features (N, C, H, W) numpy and the job's settings -> a fitted learner; the default builds
``cls(k, max_iter=, tol=, seed=, device=)`` and fits the pixel rows (N*H*W, C). Learners that need the
classifier's head (``needs_linear_head = True``, e.g. FACE) override it.

The device helpers (``resolve_device``, ``pixel_rows``, ``to_numpy``) live here so that this module
imports nothing of the learners; ``nmf.py`` re-exports them under the names it always had.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

EPS = 1e-12


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto": CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_numpy(x, dtype=np.float32) -> np.ndarray:
    """A tensor or array as a C-contiguous numpy array of ``dtype`` (for the numpy explain core)."""
    return np.ascontiguousarray(torch.as_tensor(x).detach().cpu().numpy(), dtype=dtype)


def pixel_rows(feats: np.ndarray) -> np.ndarray:
    """(N, C, H, W) feature maps -> (N*H*W, C) pixel activations, C-contiguous."""
    n, c, h, w = feats.shape
    return np.ascontiguousarray(feats.transpose(0, 2, 3, 1).reshape(n * h * w, c))


class ConceptLearner(nn.Module):
    """Base of the concept learners: ``n_components``, ``device``, ``dtype``, ``components_`` (k, C).

    Subclasses call ``super().__init__(n_components, device, dtype)`` and implement ``fit`` (setting
    ``components_``) and ``encode``; ``decode`` is ``codes @ components_``.
    """

    needs_linear_head = False  # True: fit_class needs head_weight / head_bias (a GAP + linear head)

    def __init__(self, n_components: int, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if int(n_components) < 1:
            raise ValueError("n_components must be at least 1")
        self.n_components = int(n_components)
        self.device, self.dtype = resolve_device(device), dtype
        self.register_buffer("components_", torch.zeros(0))

    @classmethod
    def fit_class(cls, feats: np.ndarray, *, k: int, class_id: int | None = None, head_weight: np.ndarray | None = None,
                  head_bias: np.ndarray | None = None, seed: int = 0, device=None, max_iter: int = 200,
                  tol: float = 1e-4, params: dict | None = None, **_) -> "ConceptLearner":
        """The precompute job's entry (the same keywords for every learner of ``LEARNERS``): one class's
        images' features (N, C, H, W) -> a fitted learner; keywords a learner does not use are ignored.
        Default: ``cls(k, max_iter=max_iter, tol=tol, seed=seed, device=device).fit(pixel rows)``."""
        return cls(k, max_iter=max_iter, tol=tol, seed=seed, device=device).fit(torch.from_numpy(pixel_rows(feats)))

    @classmethod
    def sweep(cls, feats: np.ndarray, ks, **fit_kw):
        """k -> the learner fitted on ``feats`` (N, C, H, W) with k concepts, for the k of ``ks`` (a k
        sweep on one set of images); ``fit_kw``: :meth:`fit_class`'s keywords. Default: each k fitted
        from scratch; a learner may share work across k (NMF: one SVD for every start)."""
        return lambda k: cls.fit_class(feats, k=k, **fit_kw)

    def fit(self, x, *args, **kwargs) -> "ConceptLearner":
        """Learn ``components_`` (k, C) from the data; returns self."""
        raise NotImplementedError

    def encode(self, x) -> torch.Tensor:
        """Codes (n, k) of rows X (n, C) for the learned basis."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (n, k) -> rows (n, C)."""
        return codes @ self.components_

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}, device={self.device}"
