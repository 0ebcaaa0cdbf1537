"""The explain core: one image's features -> concept explanation of a class (DESIGN.md, "The math").

Used by the gRPC server, the TorchServe handler and precompute's evaluation, so that what is
evaluated offline is exactly what is served. numpy only: no torch on the serving path.

For a GAP+linear head, with V the (H*W, C) pixel activations, P the class basis (k, C) and S the
non-negative codes (H*W, k):

    presence_j     s_j = mean_pixels S[:, j]
    weight_j       w_j = P[j] . u              (u = W[y], or W[A] - W[B] for "A rather than B")
    contribution_j c_j = s_j w_j
    residual       r   = GAP(V - S P) . u
    identity       target = sum_j c_j + r + bias,  target = logit_y (or logit_A - logit_B)

For any other head h, weights are finite differences at the class's anchor activations
(:mod:`.head`: precompute stores the class weights, contrast weights are computed here the same
way), the residual is h(A)_y - h(S P)_y and the bias is what remains: h(S P)_y - sum_j c_j.

A class with decoding directions D (``decoding/<class>``, ``--method directions``: encoding /
decoding direction pairs, arXiv 2509.23926) is projected linearly instead of by NNLS: S is the
latent factors max(V D^T, 0) and P the encoding directions E (:mod:`.projection`); presence,
weights (w_j = e_j . u), contributions, residual and identity are the same formulas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .bundle import Bundle, ClassConcepts, PrototypeRef
from .head import Head, HeadFn
from .nnls import NNLSProjector
from .projection import LinearProjector

Projector = NNLSProjector | LinearProjector  # project(v) -> codes (n, k); basis (k, C) reconstructs


@dataclass
class ConceptScore:
    concept: int  # index of the concept in the class basis
    presence: float  # mean code over pixels (activation units)
    weight: float  # logit units per unit of presence
    contribution: float  # presence * weight, logit units
    heatmap: np.ndarray  # (H, W) float32 codes on the feature grid
    prototypes: list[PrototypeRef] = field(default_factory=list)


@dataclass
class ClassExplanation:
    class_id: int
    name: str
    target: float  # the logit explained: logit_y, or logit_A - logit_B with a contrast class
    bias: float
    residual: float
    relative_residual: float  # |r| / (sum_j |c_j| + |r|): share of the explanation left unexplained
    concepts: list[ConceptScore]  # sorted by |contribution|, largest first
    flags: list[str]
    method: str
    contrast_class: int | None = None

    @property
    def identity_error(self) -> float:
        """|sum c + r + bias - target| over all concepts kept (exact when none were dropped)."""
        return abs(sum(c.contribution for c in self.concepts) + self.residual + self.bias - self.target)


@dataclass
class Prediction:
    class_id: int
    name: str
    logit: float
    probability: float


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_predictions(logits: np.ndarray, class_names: list[str], k: int) -> list[Prediction]:
    """The k largest of ``logits`` (K,) with names and softmax probabilities.

    Only the k probabilities asked for are computed (one exp-sum over K): this runs right after
    inference, when every numpy call is slow (the model has evicted the caches)."""
    k = max(0, min(k, logits.shape[-1]))
    if k == 0:
        return []
    z = np.asarray(logits, np.float32)
    top = float(z.max())
    total = float(np.exp(z - top, dtype=np.float64).sum())
    if k == 1:
        idx = [int(z.argmax())]
    else:
        part = np.argpartition(-z, k - 1)[:k]
        idx = [int(i) for i in part[np.argsort(-z[part], kind="stable")]]
    return [Prediction(i, class_names[i], float(z[i]), math.exp(float(z[i]) - top) / total) for i in idx]


def class_projector(bundle: Bundle, cc: ClassConcepts) -> Projector:
    """The served projection of a class: linear through its decoding directions when it has them
    (``cc.decoding``, or the bundle tensor ``decoding/<class>``), else NNLS on its basis, logit-aware
    along the head's row of the class when the bundle says so (``method.logit_weight``, a linear head)."""
    decoding = cc.decoding if cc.decoding is not None else bundle.tensors.get(f"decoding/{cc.class_id}")
    if decoding is not None:
        return LinearProjector.from_pair(cc.basis, decoding)
    alpha = bundle.manifest.method.logit_weight if bundle.head_kind == "linear" else 0.0
    if alpha > 0:
        return NNLSProjector.from_basis(cc.basis, bundle.head_weight[cc.class_id], alpha)
    return NNLSProjector.from_basis(cc.basis)


class Explainer:
    """Explains classes of one bundle. Per-basis constants are computed once, here."""

    def __init__(self, bundle: Bundle, head: HeadFn | None = None,
                 contrast_projectors: Callable[[int, int], tuple[Projector, str] | None] | None = None):
        """``head`` is required for a bundle whose head is not linear (``head.onnx`` run by the caller).

        ``contrast_projectors(a, b)`` (e.g. ``ContrastStore.projector``, which computes and keeps
        pairs) may return the projector of a contrast basis (and its method name) for "a rather than
        b"; without one the class basis of ``a`` is used with the contrast weights.
        """
        self.bundle = bundle
        if bundle.head_kind == "linear":
            self.head = Head(weight=bundle.head_weight, bias=bundle.head_bias)
        elif head is None:
            raise ValueError("this bundle's head is not linear: pass its head function")
        else:
            self.head = Head(fn=head)
        self.contrast_projectors = contrast_projectors
        self._projectors = {cid: class_projector(bundle, c) for cid, c in bundle.classes.items()}
        # d logit_y / d presence_j of each class: exact P_j . W[y] for a linear head (computed here,
        # once, so the identity holds whatever precision the bundle's weights were stored at)
        self._weights = {cid: (self._projectors[cid].basis @ np.asarray(bundle.head_weight[cid], np.float32))
                         if bundle.head_kind == "linear" else c.weights for cid, c in bundle.classes.items()}

    def projector(self, class_id: int) -> Projector:
        try:
            return self._projectors[class_id]
        except KeyError:
            raise KeyError(f"class {class_id} ({self.bundle.class_names[class_id]!r}) has no concepts "
                           f"in this bundle") from None

    def concept_weights(self, class_id: int) -> np.ndarray:
        """(k,) float32: logit units per unit of presence of each concept of ``class_id``."""
        self.projector(class_id)
        return self._weights[class_id]

    def concepts_of(self, class_id: int) -> ClassConcepts:
        self.projector(class_id)
        return self.bundle.classes[class_id]

    def _contrast_projector(self, a: int, b: int) -> tuple[Projector, str]:
        found = self.contrast_projectors(a, b) if self.contrast_projectors else None
        return found if found is not None else (self.projector(a), self.bundle.classes[a].method)

    def explain(self, features: np.ndarray, logits: np.ndarray, class_id: int,
                contrast: int | None = None, max_concepts: int | None = None,
                with_heatmaps: bool = True) -> ClassExplanation:
        """Explain ``class_id`` for one image.

        features: (C, H, W) float32 activations of the bundle's layer; logits: (K,) of the model.
        ``contrast``: explain logit_class - logit_contrast ("why class rather than contrast").
        ``max_concepts`` keeps the largest contributions; the dropped ones are added to the bias
        line only through the identity check, so keep all of them where the identity matters.
        """
        if contrast is not None and contrast == class_id:
            raise ValueError("the contrast class must differ from the explained class")
        bundle = self.bundle
        cc = self.concepts_of(class_id)
        c, h, w = features.shape
        v = features.reshape(c, h * w).T  # (HW, C) view, no copy
        if contrast is None:
            proj, method = self.projector(class_id), cc.method
        else:
            if not 0 <= contrast < len(bundle.class_names):
                raise KeyError(f"contrast class id {contrast} is out of range")
            proj, method = self._contrast_projector(class_id, contrast)
        codes = proj.project(v)  # (HW, k)
        presence = codes.mean(axis=0)  # (k,)
        if bundle.head_kind == "linear":
            u = np.asarray(bundle.head_weight[class_id], np.float32)
            bias = float(bundle.head_bias[class_id])
            if contrast is None:
                weights = self._weights[class_id]
            else:
                u = u - bundle.head_weight[contrast]
                bias -= float(bundle.head_bias[contrast])
                weights = proj.basis @ u
            target = float(logits[class_id] - (logits[contrast] if contrast is not None else 0.0))
            # r = GAP(V - S P) . u = GAP(V) . u - presence . (P u), and P u is the weights
            gap = features.reshape(c, h * w).mean(axis=1, dtype=np.float64)  # (C,)
            residual = float(gap @ u) - float(presence.astype(np.float64) @ weights)
        else:
            recon = (codes @ proj.basis).T.reshape(1, c, h, w).astype(np.float32)
            rl = self.head.logits(recon)[0]
            sel = (lambda z: z[class_id] - (z[contrast] if contrast is not None else 0.0))
            weights = cc.weights if contrast is None else self.head.concept_weights(
                proj.basis, class_id, contrast, anchor=self.anchor(class_id))
            target = float(sel(logits))
            residual = target - float(sel(rl))
            bias = float(sel(rl)) - float(presence @ weights)
        contrib = presence * weights
        order = np.argsort(-np.abs(contrib), kind="stable")
        if max_concepts is not None:
            order = order[:max_concepts]
        refs = cc.prototypes if contrast is None or proj is self._projectors.get(class_id) else []
        concepts = [ConceptScore(
            concept=int(j), presence=float(presence[j]), weight=float(weights[j]),
            contribution=float(contrib[j]),
            heatmap=codes[:, j].reshape(h, w) if with_heatmaps else np.zeros((0, 0), np.float32),
            prototypes=list(refs[j]) if j < len(refs) else []) for j in order]
        denom = float(np.abs(contrib).sum()) + abs(residual)
        return ClassExplanation(
            class_id=class_id, name=bundle.class_names[class_id], target=target, bias=bias,
            residual=residual, relative_residual=abs(residual) / denom if denom > 0 else 0.0,
            concepts=concepts, flags=list(cc.flags), method=method, contrast_class=contrast)

    def anchor(self, class_id: int) -> np.ndarray:
        """(C, H, W): where a non-linear head's concept weights of ``class_id`` are measured (the
        bundle's ``anchor/<class>``; zero activations for a bundle that has none)."""
        found = self.bundle.tensors.get(f"anchor/{class_id}")
        if found is not None:
            return np.asarray(found, np.float32)
        return np.zeros(self.bundle.feature_shape, np.float32)
