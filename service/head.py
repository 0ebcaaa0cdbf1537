"""The head h: features A (N, C, H, W) -> logits (N, K), linear or not, defined once for precompute,
the service and the TorchServe handler (numpy only: no torch on the serving path).

- linear: h(A) = W GAP(A) + b, with W (K, C) and b (K,);
- generic: any callable (an ONNX Runtime session of ``head.onnx``, a torch module in precompute).

Concept weights (d target / d presence_j, target = logit_y or logit_y - logit_b) are exact
P_j . (W[y] - W[b]) for a linear head. For any other head they are ICE's central finite
difference: the concept direction added at every pixel of the class's *anchor* activations (the
mean feature map of the class's training images, stored in the bundle as ``anchor/<class>``),
so that the class weights precompute stores and the contrast weights the service computes on
request are measured at the same point.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

HeadFn = Callable[[np.ndarray], np.ndarray]  # features (N, C, H, W) float32 -> logits (N, K)
FD_EPS = 1e-2  # finite-difference step, in activation units along a unit of presence


class Head:
    """h: features -> logits. ``Head(weight=W, bias=b)`` (GAP + linear) or ``Head(fn=h)``."""

    def __init__(self, weight: np.ndarray | None = None, bias: np.ndarray | None = None, fn: HeadFn | None = None):
        if (weight is None) == (fn is None):
            raise ValueError("a head is either linear (weight, bias) or a function, not both or neither")
        self.weight = None if weight is None else np.asarray(weight, np.float32)
        self.bias = None if bias is None else np.asarray(bias, np.float32)
        if self.weight is not None and (self.bias is None or self.bias.shape != (self.weight.shape[0],)):
            raise ValueError("a linear head needs a bias of one value per class")
        self.fn = fn

    @property
    def linear(self) -> bool:
        return self.weight is not None

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> (N, K) float32."""
        if self.linear:
            return (features.mean(axis=(2, 3)) @ self.weight.T + self.bias).astype(np.float32)
        return np.asarray(self.fn(np.ascontiguousarray(features, np.float32)), np.float32)

    def concept_weights(self, basis: np.ndarray, target: int, contrast: int | None = None,
                        anchor: np.ndarray | None = None, eps: float = FD_EPS) -> np.ndarray:
        """(k,) float32: d (logit_target - logit_contrast) / d presence_j for each row of ``basis`` (k, C).

        Linear: exact. Generic: central difference at ``anchor`` (C, H, W) or (n, C, H, W), averaged
        over the n anchors (zeros when no anchor is given)."""
        if self.linear:
            u = self.weight[target] - (self.weight[contrast] if contrast is not None else 0.0)
            return (np.asarray(basis, np.float32) @ u).astype(np.float32)
        k, c = basis.shape
        if anchor is None:
            raise ValueError("finite-difference weights of a non-linear head need the class's anchor activations")
        if k == 0:  # an empty bank: no probes to run (a batch of 0 cannot be reshaped back)
            return np.zeros(0, np.float32)
        a = np.asarray(anchor, np.float32)
        a = a[None] if a.ndim == 3 else a
        steps = (eps * np.asarray(basis, np.float32))[:, :, None, None]  # (k, C, 1, 1)
        probes = np.concatenate([a[None] + steps[:, None], a[None] - steps[:, None]])  # (2k, n, C, H, W)
        z = self.logits(probes.reshape(-1, *a.shape[1:])).reshape(2, k, len(a), -1)
        t = z[..., target] - (z[..., contrast] if contrast is not None else 0.0)  # (2, k, n)
        return ((t[0] - t[1]).mean(axis=1) / (2 * eps)).astype(np.float32)
