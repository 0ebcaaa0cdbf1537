"""Per-class evaluation through the explain core (what is evaluated is exactly what is served).

Metrics on a set of images of the class (held out from fitting unless said otherwise):
- ``recon_error``: ||V - S P||_F / ||V||_F over all pixels, S the served NNLS codes;
- ``ice_fidelity``: ICE's error, mean_i |f_y(A_i) - f_y(S_i P)| / (|mean_i f_y(A_i)| + 1e-4);
- ``ice_fidelity_basis``: the same through plain NNLS codes, where the served projection is logit-aware
  (service/nnls.py): what the basis alone keeps of the logit, which the logit-aware codes keep by design;
- ``top1_agreement``: share of images whose top-1 on the reconstruction equals the model's;
- ``identity_max_error``: max |sum c + r + bias - logit| of the served explanation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..service.bundle import Bundle, ClassConcepts
from ..service.head import HeadFn
from ..service.explain import Explainer
from ..service.manifest import HeadCard, Manifest, MethodCard, ModelCard, Preprocessing


def single_class_explainer(class_names: list[str], class_id: int, basis: np.ndarray, weights: np.ndarray,
                           head_weight: np.ndarray | None, head_bias: np.ndarray | None,
                           head_fn: HeadFn | None = None, method: str = "nmf",
                           anchor: np.ndarray | None = None, tensors: dict | None = None,
                           logit_weight: float = 0.0) -> Explainer:
    """An Explainer over an in-memory bundle holding one class, for evaluation before writing.
    ``anchor`` (C, H, W): where a non-linear head's weights are measured (see service.head);
    ``tensors``: further bundle tensors of the class (e.g. ``decoding/<class>``); ``logit_weight``:
    the served projection's alpha (service/nnls.py; used with a linear head only)."""
    kind = "linear" if head_weight is not None else "generic"
    shape = tuple(anchor.shape) if anchor is not None else (basis.shape[1], 1, 1)
    card = ModelCard(source="evaluation", name="evaluation", file_sha256="", layer="", feature_shape=shape,
                     num_classes=len(class_names), head=HeadCard(kind, ""))
    manifest = Manifest(model=card, preprocessing=Preprocessing(), class_names=list(class_names),
                        method=MethodCard(method, logit_weight=logit_weight), classes={}, bundle_id="evaluation")
    bundle = Bundle(root=Path("."), manifest=manifest,
                    classes={class_id: ClassConcepts(class_id, class_names[class_id], basis.astype(np.float32),
                                                     weights.astype(np.float32), method=method)},
                    class_names=class_names, head_weight=head_weight, head_bias=head_bias,
                    preprocessing=manifest.preprocessing,
                    tensors={**({} if anchor is None else {f"anchor/{class_id}": anchor.astype(np.float32)}),
                             **(tensors or {})})
    return Explainer(bundle, head=head_fn)


def served_codes(explainer: Explainer, class_id: int, features: np.ndarray) -> np.ndarray:
    """Served codes S (N, HW, k) of features (N, C, H, W): the explain core's NNLS projection."""
    proj = explainer.projector(class_id)
    n, c, h, w = features.shape
    v = features.reshape(n, c, h * w).transpose(0, 2, 1).reshape(-1, c)
    return proj.project(v).reshape(n, h * w, -1)


def reconstruct(explainer: Explainer, class_id: int, features: np.ndarray,
                codes: np.ndarray | None = None) -> np.ndarray:
    """Served reconstructions S P of features (N, C, H, W), same shape, float32 (``codes``: their
    served codes when already at hand)."""
    n, c, h, w = features.shape
    if codes is None:
        codes = served_codes(explainer, class_id, features)
    recon = codes @ explainer.projector(class_id).basis  # (N, HW, C)
    return recon.transpose(0, 2, 1).reshape(n, c, h, w)


def logits_of(features: np.ndarray, head_weight: np.ndarray | None, head_bias: np.ndarray | None,
              head_fn: HeadFn | None) -> np.ndarray:
    """Logits (N, K) of features (N, C, H, W) through the head."""
    if head_weight is not None:
        return features.mean(axis=(2, 3)) @ head_weight.T + head_bias
    return head_fn(features)


def evaluate_class(explainer: Explainer, class_id: int, features: np.ndarray,
                   head_weight: np.ndarray | None, head_bias: np.ndarray | None,
                   head_fn: HeadFn | None = None, codes: np.ndarray | None = None, identity: bool = True) -> dict:
    """Metrics of the class basis on images ``features`` (N, C, H, W) float32 (``codes``: their
    served codes when already at hand; ``identity``: also the served explanation's largest identity
    error, one explain call per image, which choosing k or lambda does not need)."""
    if len(features) == 0:
        return {}
    features = features.astype(np.float32)
    recon = reconstruct(explainer, class_id, features, codes)
    true = logits_of(features, head_weight, head_bias, head_fn)
    rec = logits_of(recon, head_weight, head_bias, head_fn)
    err = float(np.linalg.norm(features - recon) / (np.linalg.norm(features) + 1e-12))
    fy, ry = true[:, class_id], rec[:, class_id]
    fidelity = float(np.abs(fy - ry).mean() / (abs(fy.mean()) + 1e-4))
    agree = float((true.argmax(1) == rec.argmax(1)).mean())
    out = {"recon_error": err, "ice_fidelity": fidelity, "top1_agreement": agree, "images": int(len(features))}
    proj = explainer.projector(class_id)
    if getattr(proj, "logit_row", None) is not None:  # logit-aware: also the plain projection's fidelity
        from ..service.nnls import NNLSProjector

        n, c, h, w = features.shape
        v = features.reshape(n, c, h * w).transpose(0, 2, 1).reshape(-1, c)
        plain = NNLSProjector.from_basis(proj.basis).project(v) @ proj.basis
        py = logits_of(plain.reshape(n, h * w, c).transpose(0, 2, 1).reshape(n, c, h, w), head_weight, head_bias,
                       head_fn)[:, class_id]
        out["ice_fidelity_basis"] = float(np.abs(fy - py).mean() / (abs(fy.mean()) + 1e-4))
    if identity:
        out["identity_max_error"] = float(max(explainer.explain(f, l, class_id, with_heatmaps=False).identity_error
                                              for f, l in zip(features, true)))
    return out
