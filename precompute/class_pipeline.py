"""What precompute learns for one class, as steps that each return a typed part of the result.

    split      the class's reservoir -> train / held-out feature maps (seeded)
    fit        the learner on the train maps -> basis (k, C), weights, the single-class explainer
    evaluate   served codes, held-out and train metrics, deletion/insertion curves, stability
    prototypes crop scores over the pool -> the stitched-prototype test and the top crops
    contrast   attribution-filtered pixels, the most confused class's precomputed pair, shift test
    examples   a few images' codes (heatmaps for the report)

:class:`ClassResult` gathers the tensors and the manifest entry that the job writes to
``classes/<id>.safetensors``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from ..service.explain import Explainer
from .evaluate import evaluate_class, logits_of, served_codes, single_class_explainer
from .features import Record
from .prototypes import CropPool, cosine_scores, crop_jpeg, crop_scores, top_crops

if TYPE_CHECKING:
    from .job import Job

log = logging.getLogger(__name__)


@dataclass
class ClassData:
    """A class's images: features (N, C, H, W) float32 and the seeded train / held-out split."""

    cls: int
    records: list[Record]
    feats: np.ndarray
    train: np.ndarray  # indices into records
    held: np.ndarray

    @cached_property  # indexing copies: once, not at every step that reads it
    def train_feats(self) -> np.ndarray:
        return self.feats[self.train]

    @cached_property
    def held_feats(self) -> np.ndarray:
        return self.feats[self.held]


@dataclass
class ClassFit:
    """The learned basis and what the service needs beside it."""

    basis: np.ndarray  # (k, C)
    weights: np.ndarray  # (k,) d logit / d presence
    anchor: np.ndarray | None  # (C, H, W) where a non-linear head's weights are measured
    explainer: Explainer
    method: str
    selection: dict = field(default_factory=dict)  # how k (and lambda) were chosen, when chosen
    served: dict[str, np.ndarray] = field(default_factory=dict)  # the learner's extra served tensors


@dataclass
class ClassResult:
    """Everything written for one class: tensors and the manifest entry (``info``)."""

    tensors: dict[str, np.ndarray]
    info: dict


class ClassPipeline:
    """The per-class steps of one job (its model, head, data pool, learner and settings)."""

    def __init__(self, job: "Job", records: dict[int, list[Record]], pool: CropPool):
        self.job, self.cfg, self.model = job, job.cfg, job.model
        self.records, self.pool = records, pool
        self.hw, self.hb, self.hfn = job._head()

    # --- steps ---
    def split(self, cls: int) -> ClassData:
        recs = self.records[cls]
        order = np.random.default_rng(self.cfg.seed + cls).permutation(len(recs))
        n_held = int(round(len(recs) * self.cfg.held_out)) if len(recs) >= 5 else 0
        feats = np.stack([r.features for r in recs]).astype(np.float32)
        return ClassData(cls, recs, feats, train=order[n_held:], held=order[:n_held])

    def fit_learner(self, cls: int, feats: np.ndarray, k: int, params: dict | None = None,
                    method: str | None = None):
        """The job's learner (or ``method``'s) fitted on ``feats`` (N, C, H, W) with k concepts
        (``components_`` (k, C))."""
        from .fit import fit_learner

        cfg = self.cfg
        # the DeepLift reference is an array: passed to the learner, never hashed or written to the manifest
        return fit_learner(method or self.job.method, feats, k=k, class_id=cls, head_weight=self.hw, head_bias=self.hb,
                           seed=cfg.seed, device=self.job.device, max_iter=cfg.nmf_max_iter, tol=cfg.nmf_tol,
                           params={**cfg.method_params, "attribution": cfg.attribution,
                                   "deeplift_reference": self.job.deeplift_reference(), **(params or {})})

    def fit_basis(self, cls: int, feats: np.ndarray, k: int, params: dict | None = None,
                  method: str | None = None) -> np.ndarray:
        """basis (k, C) of the job's learner (or ``method``'s) on ``feats``."""
        from .fit import basis_of

        return basis_of(self.fit_learner(cls, feats, k, params, method))

    def fit(self, data: ClassData) -> ClassFit:
        """The class's basis: with ``--concepts auto``, k chosen by :mod:`.selection`; FACE's lambda
        likewise with ``--face-lambda auto``."""
        from .fit import basis_of
        from .selection import select

        learner, selection = select(self, data)
        served = learner.served_tensors() if hasattr(learner, "served_tensors") else {}
        return self.finish_fit(data, basis_of(learner), selection, served)

    def finish_fit(self, data: ClassData, basis: np.ndarray, selection: dict | None = None,
                   served: dict | None = None) -> ClassFit:
        """Weights and the single-class explainer of a basis."""
        anchor = None if self.hw is not None else data.train_feats.mean(axis=0)  # see service.head
        weights = self.model.head.concept_weights(basis, data.cls, anchor=anchor)
        explainer = single_class_explainer(self.model.class_names, data.cls, basis, weights, self.hw, self.hb,
                                           self.hfn, self.job.method, anchor,
                                           {f"{name}/{data.cls}": t for name, t in (served or {}).items()})
        return ClassFit(basis, weights, anchor, explainer, self.job.method, selection or {}, dict(served or {}))

    def evaluate(self, data: ClassData, fit: ClassFit) -> tuple[dict, dict[str, np.ndarray]]:
        """(metrics, served codes (n, HW, k) of each split)."""
        from .checks import concept_curves, stability

        cls, ex = data.cls, fit.explainer
        parts = {"train": data.train_feats, "held_out": data.held_feats}
        codes = {part: served_codes(ex, cls, f) for part, f in parts.items() if len(f)}  # projected once
        metrics = {part: evaluate_class(ex, cls, f, self.hw, self.hb, self.hfn, codes.get(part))
                   for part, f in parts.items()}
        on = self.curves_split(data)
        metrics[on].update(concept_curves(ex, cls, parts[on], self.hw, self.hb, self.hfn, codes[on],
                                          importance=self.cfg.importance))
        metrics["stability"] = stability(lambda f: self.fit_basis(cls, f, len(fit.basis)), data.train_feats,
                                         fit.basis, self.cfg.stability_folds, self.cfg.seed)
        if fit.selection:
            metrics["selection"] = fit.selection
        return metrics, codes

    @staticmethod
    def curves_split(data: ClassData) -> str:
        return "held_out" if len(data.held) else "train"

    def prototypes(self, data: ClassData, fit: ClassFit) -> tuple[dict, list[list[dict]], dict[str, np.ndarray]]:
        """(the stitched-prototype test, the prototypes' manifest entries, their JPEG tensors)."""
        from ..service.preprocess import normalize
        from .checks import stitched_test

        cfg, pool, pre = self.cfg, self.pool, self.model.preprocessing
        scores = crop_scores(pool, fit.basis)  # (n_crops, k), shared by the stitched test and prototypes
        stitched = stitched_test(pool, scores, data.cls, self.job._forward(), lambda im: normalize(im, pre),
                                 pre.crop, self.model.class_names)
        crops = top_crops(pool, scores, cfg.prototypes, exclude_class=data.cls if cfg.prototypes_exclude_class else None)
        cosines = cosine_scores(scores, crops)
        protos, tensors = [], {}
        for j, idxs in enumerate(crops):
            concept = []
            for r, idx in enumerate(idxs):
                rec = pool.records[pool.image[idx]]
                box = [int(v) for v in pool.boxes[idx]]
                tensors[f"proto/{j}/{r}"] = np.frombuffer(crop_jpeg(rec, box), dtype=np.uint8)
                concept.append({"source": rec.key, "box": box, "score": cosines[j][r],
                                "source_predicted": rec.predicted})
            protos.append(concept)
        return stitched, protos, tensors

    def contrast(self, data: ClassData, fit: ClassFit) -> tuple[dict, dict[str, np.ndarray]]:
        """(shift-test metrics, contrast tensors): attribution-filtered pixels of the class (for pairs
        computed on request) and the precomputed pair with the class the model confuses it with most.
        Contrast concepts are NMF of hyperplane-weighted pixels: not for signed layers, nor without
        head gradients."""
        from .checks import attribution_pixels, most_confused

        cfg, cls = self.cfg, data.cls
        if cfg.contrast_samples <= 0:
            return {}, {}
        head = self.job._attribution_head()
        if self.job.signed or head is None:
            log.info("class %d: no contrast data (%s)", cls, "signed activations" if self.job.signed else
                     "the non-linear head is an ONNX graph, without gradients")
            return {}, {}
        px = attribution_pixels(data.train_feats, head, cls, cfg.contrast_samples, cfg.seed, method=cfg.attribution,
                                reference=self.job.deeplift_reference())
        tensors = {"samples": px.astype(np.float16)}
        logits = logits_of(data.feats, self.hw, self.hb, self.hfn)
        other = most_confused(logits, cls, {c for c, r in self.records.items() if len(r) >= 2} - {cls})
        if other is None or len(px) < len(fit.basis):
            return {}, tensors
        return self.job._contrast_pair(cls, other, px, self.records[other], head, self.hw, self.hb, self.hfn,
                                       tensors, len(fit.basis)), tensors

    def examples(self, data: ClassData, codes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Codes (n, k, H, W) and JPEGs of the first ``--examples`` images of the curves' split."""
        n = self.cfg.examples
        if not n:
            return {}
        on = self.curves_split(data)
        ex = (data.held if on == "held_out" else data.train)[:n]
        h, w = data.feats.shape[2:]
        c = codes[on][:len(ex)]  # (n, HW, k): the first of the split's codes, projected already
        tensors = {"examples_codes": c.transpose(0, 2, 1).reshape(len(ex), -1, h, w).astype(np.float32)}
        for i, j in enumerate(ex):
            tensors[f"example/{i}"] = np.frombuffer(data.records[j].view_jpeg, dtype=np.uint8)
        return tensors

    # --- all of them ---
    def run(self, cls: int, seen: int) -> ClassResult:
        from .job import class_flags

        data = self.split(cls)
        fit = self.fit(data)
        metrics, codes = self.evaluate(data, fit)
        metrics["stitched"], protos, proto_tensors = self.prototypes(data, fit)
        tensors = {"basis": fit.basis.astype(np.float32), "weights": fit.weights.astype(np.float32)}
        if fit.anchor is not None:
            tensors["anchor"] = fit.anchor.astype(np.float32)
        for name, t in fit.served.items():
            tensors[f"served/{name}"] = np.asarray(t, np.float32)
        shift, contrast_tensors = self.contrast(data, fit)
        if shift:
            metrics["shift"] = shift
        tensors.update(contrast_tensors)
        tensors.update(self.examples(data, codes))
        tensors.update(proto_tensors)
        flags = class_flags(metrics, len(data.records), self.cfg.min_images)
        info = {"class_id": cls, "name": self.model.class_names[cls], "k": int(fit.basis.shape[0]),
                "images": len(data.records), "images_seen": seen, "held_out_images": int(len(data.held)),
                "metrics": metrics, "flags": flags, "method": fit.method, "prototypes": protos,
                "signed_features": bool(self.job.signed)}
        return ClassResult(tensors, info)
