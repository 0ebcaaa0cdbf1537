"""What precompute learns for one class, as steps that each return a typed part of the result.

    split      the class's reservoir -> train / held-out feature maps (seeded)
    fit        the learner on the train maps -> basis (k, C), weights, the single-class explainer
    evaluate   served codes, held-out and train metrics, deletion/insertion curves, stability
    contrast   attribution-filtered pixels, the most confused class's precomputed pair, shift test
    examples   a few images' codes (heatmaps for the report)
    prototypes the class's mined crops (one streamed pass of the pool for all of a shard's classes,
               :func:`.prototypes.mine_classes`) -> the stitched-prototype test and the top crops

:meth:`ClassPipeline.learn` runs every step but the last; :meth:`ClassPipeline.finish` adds the
prototypes. :class:`ClassResult` gathers the tensors and the manifest entry that the job writes to
``classes/staged/<id>.safetensors`` after learn and ``classes/<id>.safetensors`` when finished.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..service.explain import Explainer, softmax
from .config import PrecomputeConfig
from .evaluate import evaluate_class, logits_of, served_codes, single_class_explainer
from .features import Record
from .learner_params import LearnerParams
from .model_access import ModelAccess
from .prototypes import DEFAULT_RANKING, crop_jpeg

log = logging.getLogger(__name__)


def split_indices(n: int, cls: int, seed: int, held_out: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices into a class's ``n`` records (in key order): a permutation seeded by
    ``seed + cls``, its first round(n * held_out) held out (none below 5 images)."""
    order = np.random.default_rng(seed + cls).permutation(n)
    n_held = int(round(n * held_out)) if n >= 5 else 0
    return order[n_held:], order[:n_held]


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
    params: dict = field(default_factory=dict)  # the learner parameters it was fitted with (typed, none 'auto')
    served: dict[str, np.ndarray] = field(default_factory=dict)  # the learner's extra served tensors


@dataclass(frozen=True)
class LearnSettings:
    """What the job decided before any class is learned: its config, the learner for the layer
    (``auto`` resolved), whether the layer is signed, and the learner's typed parameters."""

    cfg: PrecomputeConfig
    method: str
    signed: bool
    params: LearnerParams


@dataclass
class ClassResult:
    """Everything written for one class: tensors and the manifest entry (``info``)."""

    tensors: dict[str, np.ndarray]
    info: dict


class ClassPipeline:
    """The per-class steps of one job (its model, head, data pool, learner and settings)."""

    def __init__(self, access: ModelAccess, settings: LearnSettings, records: dict[int, list[Record]],
                 pool=None, prototype_ranking: str = DEFAULT_RANKING):
        self.access, self.settings, self.cfg, self.model = access, settings, settings.cfg, access.model
        self.method, self.signed, self.params = settings.method, settings.signed, settings.params
        self.records, self.pool, self.prototype_ranking = records, pool, prototype_ranking
        self.hw, self.hb, self.hfn = access.head()
        # the served projection's alpha (service/nnls.py): logit-aware along a linear head's rows only
        self.logit_weight = float(self.cfg.logit_weight) if self.hw is not None else 0.0

    def logit_row(self, cls: int) -> np.ndarray | None:
        """The head's row of ``cls`` (C,) for the logit-aware projection, None where it is plain NNLS."""
        return self.hw[cls] if self.logit_weight > 0 else None

    # --- steps ---
    def split(self, cls: int) -> ClassData:
        recs = self.records[cls]
        train, held = split_indices(len(recs), cls, self.cfg.seed, self.cfg.held_out)
        feats = np.stack([r.features for r in recs]).astype(np.float32)
        return ClassData(cls, recs, feats, train=train, held=held)

    def fit_learner(self, cls: int, feats: np.ndarray, k: int, params: dict | None = None,
                    method: str | None = None, init: np.ndarray | None = None):
        """The job's learner (or ``method``'s, with its defaults) fitted on ``feats`` (N, C, H, W) with k
        concepts (``components_`` (k, C)). ``params``: the job learner's parameters for this fit, every
        ``auto`` one chosen (:meth:`LearnerParams.with_chosen`); with ``method`` they are that learner's.
        ``init`` (k, C): a start basis, for a learner that warm-starts (:func:`.fit.fit_learner`)."""
        from .fit import fit_learner

        method, kw = self._fit_keywords(params, method)
        return fit_learner(method, feats, k=k, class_id=cls, init=init, **kw)

    def sweep_bases(self, cls: int, feats: np.ndarray, ks, params: dict | None = None, method: str | None = None):
        """k -> basis (k, C) of :meth:`fit_learner` on ``feats`` for each k of ``ks``, sharing what the
        fits have in common (:func:`.fit.sweep_learner`)."""
        from .fit import basis_of, sweep_learner

        method, kw = self._fit_keywords(params, method)
        fit_k = sweep_learner(method, feats, ks, class_id=cls, **kw)
        return lambda k: basis_of(fit_k(k))

    def _fit_keywords(self, params: dict | None, method: str | None) -> tuple[str, dict]:
        cfg = self.cfg
        if method is None or method == self.method:
            method, params = self.method, self.params.with_chosen(params or {})
        # the DeepLift reference is an array: passed to the learner, never hashed or written to the manifest
        return method, dict(head_weight=self.hw, head_bias=self.hb, seed=cfg.seed, device=self.access.device,
                            max_iter=cfg.nmf_max_iter, tol=cfg.nmf_tol,
                            params={"attribution": cfg.attribution,
                                    "deeplift_reference": self.access.deeplift_reference(), **(params or {})})

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

        learner, selection, params = select(self, data)
        served = learner.served_tensors() if hasattr(learner, "served_tensors") else {}
        return self.finish_fit(data, basis_of(learner), selection, served, params)

    def finish_fit(self, data: ClassData, basis: np.ndarray, selection: dict | None = None,
                   served: dict | None = None, params: dict | None = None) -> ClassFit:
        """Weights and the single-class explainer of a basis."""
        anchor = None if self.hw is not None else data.train_feats.mean(axis=0)  # see service.head
        weights = self.model.head.concept_weights(basis, data.cls, anchor=anchor)
        explainer = single_class_explainer(self.model.class_names, data.cls, basis, weights, self.hw, self.hb,
                                           self.hfn, self.method, anchor,
                                           {f"{name}/{data.cls}": t for name, t in (served or {}).items()},
                                           logit_weight=self.logit_weight)
        return ClassFit(basis, weights, anchor, explainer, self.method, selection=selection or {},
                        served=dict(served or {}), params=self.params.with_chosen(params or {}))

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
        # the folds are fitted as the class was: same k, same chosen parameters (lambda), never 'auto'
        metrics["stability"] = stability(lambda f: self.fit_basis(cls, f, len(fit.basis), fit.params), data.train_feats,
                                         fit.basis, self.cfg.stability_folds, self.cfg.seed)
        if fit.selection:
            metrics["selection"] = fit.selection
        return metrics, codes

    @staticmethod
    def curves_split(data: ClassData) -> str:
        return "held_out" if len(data.held) else "train"

    def prototypes(self, cls: int, order: list[int], grid: tuple[int, int], mined: dict, basis: np.ndarray
                   ) -> tuple[dict, list[list[dict]], dict[str, np.ndarray]]:
        """(the stitched-prototype test, the prototypes' manifest entries, their JPEG tensors) of a
        class from its mined crops (:func:`.prototypes.mine_classes`, one streamed pass for a shard's
        classes); ``order``: concept indices by importance; ``grid``: the feature map's (H, W);
        ``basis`` (k, C): the concepts, whose code maps fit each crop to its concept's extent
        (:func:`.prototypes.fit_boxes`). Every ranking is stitch-tested with fitted crops, and the
        paper's (``cosine`` with window crops); the served prototypes are ``--prototype-ranking``'s
        with ``--prototype-box``'s crops, and are always among those tested."""
        from ..service.preprocess import normalize
        from .checks import stitched_test
        from .prototypes import FITTED, fit_boxes
        from .windows import window_boxes

        cfg, pool, pre = self.cfg, self.pool, self.model.preprocessing
        ranking = self.prototype_ranking + (f"/{FITTED}" if cfg.prototype_box == FITTED else "")
        boxes = window_boxes(grid[0], grid[1], cfg.prototype_cells, pre.crop)
        mined = fit_boxes(mined, basis, pool, grid, cfg.prototype_cells, pre.crop, self.logit_row(cls),
                          self.logit_weight)

        def box_of(crop) -> list[int]:
            return [int(v) for v in (crop.box if crop.box is not None else boxes[crop.window])]

        @functools.lru_cache(maxsize=None)  # a stitched crop is also a served prototype: cut it once
        def crop_bytes(crop) -> bytes:
            return crop_jpeg(pool.view_jpeg(crop.ref), box_of(crop))

        # tested: every ranking with fitted crops, the paper's (cosine, its window) and the served one
        tests = {key: crops for key, crops in mined.items()
                 if key[0].endswith(f"/{FITTED}") or key[0] in ("cosine", ranking)}
        stitched = stitched_test(tests, order, crop_bytes, cls, self.access.forward(),
                                 lambda im: normalize(im, pre), pre.crop, self.model.class_names, ranking)
        protos, tensors = [], {}
        for j, crops in enumerate(mined[(ranking, bool(cfg.prototypes_exclude_class))]):
            concept = []
            for r, crop in enumerate(crops[:cfg.prototypes]):
                tensors[f"proto/{j}/{r}"] = np.frombuffer(crop_bytes(crop), dtype=np.uint8)
                concept.append({"source": crop.ref.key, "box": box_of(crop), "score": crop.score,
                                "cosine": crop.cosine, "ranking": ranking, "source_predicted": crop.ref.predicted})
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
        head = self.access.attribution_head()
        if self.signed or head is None:
            log.info("class %d: no contrast data (%s)", cls, "signed activations" if self.signed else
                     "the non-linear head is an ONNX graph, without gradients")
            return {}, {}
        px = attribution_pixels(data.train_feats, head, cls, cfg.contrast_samples, cfg.seed, method=cfg.attribution,
                                reference=self.access.deeplift_reference())
        tensors = {"samples": px.astype(np.float16)}
        logits = logits_of(data.feats, self.hw, self.hb, self.hfn)
        other = most_confused(logits, cls, {c for c in self.records if self.records.count(c) >= 2} - {cls})
        if other is None or len(px) < len(fit.basis):
            return {}, tensors
        return self.contrast_pair(cls, other, px, self.records[other], head, tensors, len(fit.basis)), tensors

    def contrast_pair(self, a: int, b: int, px_a: np.ndarray, recs_b: list[Record], head_for_attr, tensors: dict,
                      k: int) -> dict:
        """Hyperplane and contrast concepts of "a rather than b" into ``tensors``; the shifting test."""
        import torch

        from ..service.contrast import METHOD_PRECOMPUTED, compute_pair
        from .checks import attribution_pixels
        from .learners.contrast import shift_test

        cfg, hw, hb, hfn = self.cfg, self.hw, self.hb, self.hfn
        feats_b = np.stack([r.features for r in recs_b]).astype(np.float32)
        px_b = attribution_pixels(feats_b, head_for_attr, b, cfg.contrast_samples, cfg.seed,
                                  method=cfg.attribution, reference=self.access.deeplift_reference())
        if len(px_b) == 0:
            return {}
        pair = compute_pair(a, b, px_a, px_b, k, seed=cfg.seed, method=METHOD_PRECOMPUTED)
        if pair is None:  # too few of a's pixels on its side of the hyperplane: no precomputed pair
            return {}
        normal, offset = pair.normal, pair.offset
        key = f"contrast/{a}_{b}"
        tensors[f"{key}/basis"] = pair.basis
        tensors[f"{key}/normal"] = normal
        tensors[f"{key}/offset"] = np.asarray([offset], np.float32)
        head = (torch.from_numpy(hw), torch.from_numpy(hb)) if hw is not None else self.model.torch_head
        base = float(np.mean(softmax(logits_of(feats_b, hw, hb, hfn))[:, a]))
        best = shift_test(torch.from_numpy(feats_b), torch.from_numpy(np.asarray(normal, np.float32)), offset,
                          head, a)
        names = self.model.class_names
        return {"pairs": [{"target": a, "target_name": names[a], "source": b, "source_name": names[b],
                           "baseline_probability": base, "max_probability": float(best)}]}

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

    # --- all of them: learn (every step but prototypes), then finish once the shard's crops are mined ---
    def learn(self, cls: int, seen: int) -> ClassResult:
        """Every step but the prototypes: the result :meth:`finish` completes (its ``info`` keeps the
        concepts' importance order and the feature grid for it; flags come with the stitched test)."""
        import time

        clock = [time.perf_counter()]
        seconds: dict[str, float] = {}

        def lap(step: str) -> None:
            clock.append(time.perf_counter())
            seconds[step] = round(clock[-1] - clock[-2], 4)

        data = self.split(cls)
        lap("read")
        fit = self.fit(data)
        lap("fit")
        metrics, codes = self.evaluate(data, fit)
        lap("evaluate")
        tensors = {"basis": fit.basis.astype(np.float32), "weights": fit.weights.astype(np.float32)}
        if fit.anchor is not None:
            tensors["anchor"] = fit.anchor.astype(np.float32)
        for name, t in fit.served.items():
            tensors[f"served/{name}"] = np.asarray(t, np.float32)
        shift, contrast_tensors = self.contrast(data, fit)
        lap("contrast")
        if shift:
            metrics["shift"] = shift
        tensors.update(contrast_tensors)
        tensors.update(self.examples(data, codes))
        imp = np.asarray(metrics[self.curves_split(data)].get("importance") or fit.weights, np.float64)
        # grouped by label, a class the model mostly predicts otherwise has little of it to show
        metrics["predicted_as_class"] = float(np.mean([r.predicted == cls for r in data.records]))
        info = {"class_id": cls, "name": self.model.class_names[cls], "k": int(fit.basis.shape[0]),
                "images": len(data.records), "images_seen": seen, "held_out_images": int(len(data.held)),
                "metrics": metrics, "method": fit.method, "signed_features": bool(self.signed),
                "seconds": seconds,  # logged, not in the bundle
                "importance_order": [int(j) for j in np.argsort(-imp, kind="stable")],
                "grid": [int(v) for v in data.feats.shape[2:]]}
        return ClassResult(tensors, info)

    def finish(self, result: ClassResult, mined: dict) -> ClassResult:
        """:meth:`learn`'s result with the prototypes, the stitched test and the flags, from the
        class's mined crops (:func:`.prototypes.mine_classes`)."""
        import time

        from .checks import class_flags

        t0 = time.perf_counter()
        info = dict(result.info)
        order, grid = info.pop("importance_order"), tuple(info.pop("grid"))
        cls = int(info["class_id"])
        metrics = dict(info["metrics"])
        metrics["stitched"], protos, proto_tensors = self.prototypes(cls, order, grid, mined, result.tensors["basis"])
        info.update(metrics=metrics, prototypes=protos, flags=class_flags(metrics, info["images"], self.cfg.min_images))
        info["seconds"] = {**info.get("seconds", {}), "prototypes": round(time.perf_counter() - t0, 4)}
        return ClassResult({**result.tensors, **proto_tensors}, info)
