"""The linear projection of direction pairs (arXiv 2509.23926): latent factors by decoding filters.

A class learned by ``--method directions`` has encoding directions E (k, C) (the bundle's
``basis/<class>``: what concept k adds to a pixel per unit of its latent factor) and decoding
directions D (k, C) (``decoding/<class>``: the filters that read the factors back). Its codes are
the latent factors, one inner product per pixel and concept, instead of the NNLS projection:

    S = max(V D^T, 0)          (n, k) for pixels V (n, C)

A negative response is clipped to 0: the latent factor of a present concept is positive, and a
negative response only says the concept is absent (it is the other concepts, or noise, seen
through the filter). Clipping keeps heatmaps and presences readable as "how much of the concept is
here"; what it leaves out of the activations (with the rest of V - S E) is in the explanation's
residual, so the identity logit = sum_j c_j + r + b holds all the same.

:class:`LinearProjector` has the interface of :class:`~conceptlens.service.nnls.NNLSProjector`
that the explain core and precompute's evaluation use: ``project(v) -> codes`` and ``basis``,
the directions that reconstruct (S E) and that the weights are taken along (w_k = e_k . u).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearProjector:
    """Per-class constants of the direction-pairs projection, computed once (bundle load time)."""

    basis: np.ndarray  # (k, C) float32: the encoding directions E
    decoding: np.ndarray  # (k, C) float32: the decoding directions D (filters)

    @classmethod
    def from_pair(cls, encoding: np.ndarray, decoding: np.ndarray) -> "LinearProjector":
        encoding = np.ascontiguousarray(encoding, dtype=np.float32)
        decoding = np.ascontiguousarray(decoding, dtype=np.float32)
        if encoding.ndim != 2 or decoding.shape != encoding.shape:
            raise ValueError(f"decoding directions {decoding.shape} do not match the encoding directions "
                             f"{encoding.shape}: both must be (k, C)")
        return cls(basis=encoding, decoding=decoding)

    def project(self, v: np.ndarray, **_) -> np.ndarray:
        """Codes S (n, k) float32 of pixels V (n, C): the latent factors V D^T, clipped at 0.

        Keyword arguments of the NNLS projector (``max_iter``, ``tol``) are accepted and ignored."""
        s = np.asarray(v, dtype=np.float32) @ self.decoding.T
        return np.maximum(s, 0.0, out=s)
