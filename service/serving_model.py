"""One loaded bundle as the server runs it: class resolution, request plans, decode, inference
(through the runtime), explanation and answer encoding. Transport-free: the gRPC, HTTP and
inference-protocol layers and the TorchServe handler all call this."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from ..v1 import explain_service_pb2 as pb
from .bundle import Bundle
from .config import ServerConfig
from .contrast import ContrastStore
from .errors import ClassNotFoundError, InvalidInputError
from .explain import Explainer, top_predictions
from .html import overlay_png, raw_grid
from .metrics import Metrics
from .preprocess import preprocess
from .runtime import Runtime, open_session, select_providers

MAX_CLASSES_PER_REQUEST = 32
MAX_OVERLAY_SIDE = 1024  # PNG overlays of larger images keep the aspect ratio at this long side
CONTRAST_PAIRS = 256  # contrast pairs computed on request and kept (LRU)

RAW, PNG = pb.HEATMAP_FORMAT_RAW, pb.HEATMAP_FORMAT_PNG_OVERLAY
HEATMAP_FORMATS = {pb.HEATMAP_FORMAT_UNSPECIFIED, pb.HEATMAP_FORMAT_NONE, RAW, PNG}
PROTOTYPE_FORMATS = {pb.PROTOTYPE_FORMAT_UNSPECIFIED, pb.PROTOTYPE_FORMAT_REFERENCE, pb.PROTOTYPE_FORMAT_JPEG}


@dataclass
class Plan:
    """An Explain request's options, validated and resolved against the bundle."""

    classes: list[int] | None  # explicit classes, or None for the top k
    top_k: int
    contrast: int | None
    max_concepts: int  # 0: all
    heatmap: int
    prototypes: int
    prototype_jpeg: bool
    predictions: int


class ServingModel:
    """A bundle, its runtime and explainer, and the answers that never change (built once)."""

    def __init__(self, bundle: Bundle, runtime: Runtime, config: ServerConfig):
        self.bundle, self.runtime, self.config = bundle, runtime, config
        # "a rather than b": precomputed pairs, or computed on request from the bundle's samples (in
        # the worker thread that explains, never on the event loop) and then kept
        self.contrasts = ContrastStore(bundle, max_pairs=CONTRAST_PAIRS)
        self.explainer = Explainer(bundle, head=self._head_fn(bundle, runtime, config),
                                   contrast_projectors=self.contrasts.projector)
        self.names = bundle.class_names
        self.num_classes = len(self.names)
        self.linear = bundle.head_kind == "linear"
        self.model_info = self._model_info()
        self._list = {flag: self._list_classes(flag).SerializeToString() for flag in (False, True)}
        self.prototype_bytes = functools.lru_cache(maxsize=4096)(self._read_prototype)

    @staticmethod
    def _head_fn(bundle: Bundle, runtime: Runtime, config: ServerConfig):
        if bundle.head_kind == "linear":
            return None
        # where the model runs (a TorchServe worker's GPU included), else as configured
        providers = getattr(runtime, "providers_requested", None) or select_providers(config.device)
        sess = open_session(bundle.head_path, providers)
        name = sess.get_inputs()[0].name
        return lambda f: sess.run(None, {name: np.ascontiguousarray(f, np.float32)})[0]

    # --- class resolution ---
    def resolve(self, ref: pb.ClassRef, what: str = "class") -> int:
        kind = ref.WhichOneof("ref")
        if kind is None:
            raise InvalidInputError(f"the {what} reference has neither an id nor a name")
        try:
            return self.bundle.class_id(ref.id if kind == "id" else ref.name)
        except KeyError as e:
            raise ClassNotFoundError(f"{what}: {e.args[0]}") from None

    def require_concepts(self, cid: int) -> None:
        if cid not in self.bundle.classes:
            raise ClassNotFoundError(f"class {cid} ({self.names[cid]!r}) has no concepts in this bundle; "
                                     f"ListClasses with with_concepts_only lists those that do")

    def plan(self, opts: pb.ExplainOptions) -> Plan:
        """Validate and resolve request options; ValueError or ClassNotFoundError when they are bad."""
        top_k = opts.top_k if opts.HasField("top_k") else 1
        protos = opts.prototypes_per_concept if opts.HasField("prototypes_per_concept") \
            else self.config.default_prototypes
        preds = opts.num_predictions if opts.HasField("num_predictions") else self.config.default_predictions
        for name, value in (("top_k", top_k), ("max_concepts", opts.max_concepts),
                            ("prototypes_per_concept", protos), ("num_predictions", preds)):
            if value < 0:
                raise InvalidInputError(f"{name} must not be negative (got {value})")
        if opts.heatmap_format not in HEATMAP_FORMATS:
            raise InvalidInputError(f"unknown heatmap_format {opts.heatmap_format}")
        if opts.prototype_format not in PROTOTYPE_FORMATS:
            raise InvalidInputError(f"unknown prototype_format {opts.prototype_format}")
        if len(opts.classes) > MAX_CLASSES_PER_REQUEST or top_k > MAX_CLASSES_PER_REQUEST:
            raise InvalidInputError(f"at most {MAX_CLASSES_PER_REQUEST} classes can be explained per request")
        classes = None
        if len(opts.classes):
            classes = list(dict.fromkeys(self.resolve(r) for r in opts.classes))
            for cid in classes:
                self.require_concepts(cid)
        contrast = None
        if opts.HasField("contrast") and opts.contrast.WhichOneof("ref") is not None:
            contrast = self.resolve(opts.contrast, "contrast class")
            if classes is not None and contrast in classes:
                raise InvalidInputError(f"the contrast class must differ from the explained class "
                                 f"({contrast}, {self.names[contrast]!r})")
        return Plan(classes=classes, top_k=min(top_k, self.num_classes), contrast=contrast,
                    max_concepts=opts.max_concepts, heatmap=opts.heatmap_format, prototypes=protos,
                    prototype_jpeg=opts.prototype_format == pb.PROTOTYPE_FORMAT_JPEG,
                    predictions=min(preds, self.num_classes))

    # --- hooks: decode, predict, explain + encode ---
    def decode(self, data: bytes) -> tuple[np.ndarray, pb.ImageInfo]:
        """Image bytes -> (model input (3, S, S) float32, image size and crop box in its pixels)."""
        p = preprocess(data, self.bundle.preprocessing, max_pixels=self.config.max_pixels)
        x = p.input
        info = pb.ImageInfo(width=p.size[0], height=p.size[1])
        info.crop.x0, info.crop.y0, info.crop.x1, info.crop.y1 = p.crop
        return x, info

    def infer(self, inputs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Batch the inputs, run the model, and split the outputs into per-request views.

        A model exported with a fixed batch size gets padded batches, in chunks when there are more."""
        fixed = self.runtime.max_batch_size
        if fixed and len(inputs) > fixed:
            return [o for s in range(0, len(inputs), fixed) for o in self.infer(inputs[s:s + fixed])]
        n = len(inputs)
        batch = inputs[0][None] if n == 1 else np.stack(inputs)
        if fixed and fixed > n:  # pad
            batch = np.concatenate([batch, np.zeros((fixed - n, *batch.shape[1:]), batch.dtype)])
        features, logits = self.runtime.run(batch)
        return [(features[i], logits[i]) for i in range(n)]

    def answer(self, features: np.ndarray, logits: np.ndarray, plan: Plan, info: pb.ImageInfo,
               metrics: Metrics) -> tuple[bytes, float, float]:
        """(serialized ExplainResponse without timings, explain seconds, encode seconds)."""
        resp, t_explain, t_build = self.answer_message(features, logits, plan, info, metrics)
        t = time.perf_counter()
        body = resp.SerializeToString()
        return body, t_explain, t_build + time.perf_counter() - t

    def answer_message(self, features: np.ndarray, logits: np.ndarray, plan: Plan, info: pb.ImageInfo,
                       metrics: Metrics | None = None) -> tuple[pb.ExplainResponse, float, float]:
        """(ExplainResponse without timings, explain seconds, seconds building the message).

        features (C, H, W) and logits (K,) of one image; ``metrics`` gets each class's concept
        presence and residual (none in a TorchServe worker)."""
        t0 = time.perf_counter()
        wanted = 0 if plan.classes is not None else plan.top_k + (plan.contrast is not None)
        ranked = top_predictions(logits, self.names, max(plan.predictions, wanted))
        if plan.classes is not None:
            cids = plan.classes
        else:  # top-k against a contrast class: the top k other than the contrast itself
            cids = [p.class_id for p in ranked if p.class_id != plan.contrast][:plan.top_k]
        preds = ranked[:plan.predictions]
        heatmaps = plan.heatmap in (RAW, PNG)
        explained = [self.explainer.explain(features, logits, cid, contrast=plan.contrast,
                                            with_heatmaps=heatmaps) if cid in self.bundle.classes else cid
                     for cid in cids]
        t1 = time.perf_counter()
        resp = pb.ExplainResponse(bundle_id=self.bundle.bundle_id, image=info)
        for p in preds:
            resp.predictions.add(class_id=p.class_id, class_name=p.name, logit=p.logit, probability=p.probability)
        for ex in explained:
            if isinstance(ex, int):
                self._encode_unexplained(resp.explanations.add(), ex, logits, plan.contrast)
            else:
                self._encode(resp.explanations.add(), ex, plan, info)
                if metrics is None:
                    continue
                presence = np.zeros(len(ex.concepts))
                for c in ex.concepts:
                    presence[c.concept] = c.presence
                metrics.explanation(ex.class_id, ex.name, presence, ex.residual, ex.relative_residual)
        return resp, t1 - t0, time.perf_counter() - t1

    def _encode(self, msg: pb.ClassExplanation, ex, plan: Plan, info: pb.ImageInfo) -> None:
        msg.class_id, msg.class_name, msg.logit = ex.class_id, ex.name, ex.target
        msg.bias, msg.residual, msg.relative_residual = ex.bias, ex.residual, ex.relative_residual
        msg.num_concepts, msg.method = len(ex.concepts), ex.method
        msg.flags.extend(ex.flags)
        if ex.contrast_class is not None:
            msg.contrast_class_id, msg.contrast_class_name = ex.contrast_class, self.names[ex.contrast_class]
        kept = ex.concepts[:plan.max_concepts] if plan.max_concepts else ex.concepts
        msg.omitted_contribution = float(sum(c.contribution for c in ex.concepts[len(kept):]))
        if plan.heatmap == PNG:  # overlays at image size (long side capped), the crop scaled alike
            f = min(1.0, MAX_OVERLAY_SIDE / max(info.width, info.height))
            size = (max(1, round(info.width * f)), max(1, round(info.height * f)))
            crop = tuple(round(v * f) for v in (info.crop.x0, info.crop.y0, info.crop.x1, info.crop.y1))
        for c in kept:
            cm = msg.concepts.add(concept_id=c.concept, presence=c.presence, weight=c.weight,
                                  contribution=c.contribution)
            if plan.heatmap == RAW:
                data, scale = raw_grid(c.heatmap)
                h, w = c.heatmap.shape
                cm.heatmap.format, cm.heatmap.height, cm.heatmap.width = RAW, h, w
                cm.heatmap.scale, cm.heatmap.data = scale, data
            elif plan.heatmap == PNG:
                data, top = overlay_png(c.heatmap, size, crop)
                cm.heatmap.format, cm.heatmap.width, cm.heatmap.height = PNG, size[0], size[1]
                cm.heatmap.scale, cm.heatmap.data = top, data
            for ref in c.prototypes[:plan.prototypes]:
                self._encode_prototype(cm.prototypes.add(), ref, plan.prototype_jpeg)

    def _encode_prototype(self, p: pb.Prototype, ref, jpeg: bool) -> None:
        p.file, p.source, p.score = ref.file, ref.source, ref.score
        p.box.x0, p.box.y0, p.box.x1, p.box.y1 = (int(v) for v in ref.box)
        if jpeg:
            p.jpeg = self.prototype_bytes(ref.file)

    def _encode_unexplained(self, msg: pb.ClassExplanation, cid: int, logits: np.ndarray, contrast) -> None:
        """A top-k class without concepts: nothing explained, all of the logit is residual."""
        logit = float(logits[cid] - (logits[contrast] if contrast is not None else 0.0))
        bias = 0.0
        if self.linear:
            bias = float(self.bundle.head_bias[cid] - (self.bundle.head_bias[contrast] if contrast is not None else 0.0))
        msg.class_id, msg.class_name, msg.logit, msg.bias = cid, self.names[cid], logit, bias
        msg.residual = logit - bias
        msg.relative_residual = 1.0 if msg.residual != 0 else 0.0
        msg.flags.append("no_concepts")
        if contrast is not None:
            msg.contrast_class_id, msg.contrast_class_name = contrast, self.names[contrast]

    def _read_prototype(self, rel: str) -> bytes:
        """JPEG bytes of a prototype crop of the bundle (read once, kept)."""
        root = self.bundle.root.resolve()
        path = (root / rel).resolve()
        if root not in path.parents:
            raise InvalidInputError(f"prototype path {rel!r} leaves the bundle")
        return path.read_bytes()

    # --- static answers ---
    def class_concepts(self, request: pb.GetClassConceptsRequest) -> pb.GetClassConceptsResponse:
        if not request.HasField("class_ref"):
            raise InvalidInputError("class_ref is required")
        cid = self.resolve(request.class_ref)
        self.require_concepts(cid)
        cc = self.bundle.classes[cid]
        n = request.prototypes_per_concept if request.HasField("prototypes_per_concept") else None
        if n is not None and n < 0:
            raise InvalidInputError("prototypes_per_concept must not be negative")
        weights = self.explainer.concept_weights(cid)
        norms = np.linalg.norm(cc.basis, axis=1)
        resp = pb.GetClassConceptsResponse(bundle_id=self.bundle.bundle_id, class_id=cid, class_name=cc.name,
                                           method=cc.method, flags=cc.flags)
        jpeg = request.prototype_format == pb.PROTOTYPE_FORMAT_JPEG
        for j in range(cc.k):
            c = resp.concepts.add(concept_id=j, weight=float(weights[j]), direction_norm=float(norms[j]))
            refs = cc.prototypes[j] if j < len(cc.prototypes) else []
            for ref in refs[:n] if n is not None else refs:
                self._encode_prototype(c.prototypes.add(), ref, jpeg)
        for key, value in _flatten(cc.metrics):
            resp.metrics[key] = value
        return resp

    def _list_classes(self, with_concepts_only: bool) -> pb.ListClassesResponse:
        resp = pb.ListClassesResponse(bundle_id=self.bundle.bundle_id)
        for cid, name in enumerate(self.names):
            cc = self.bundle.classes.get(cid)
            if cc is None and with_concepts_only:
                continue
            resp.classes.add(class_id=cid, class_name=name, has_concepts=cc is not None,
                             num_concepts=cc.k if cc else 0, flags=cc.flags if cc else [])
        return resp

    def list_classes(self, with_concepts_only: bool) -> bytes:
        return self._list[bool(with_concepts_only)]

    def _model_info(self) -> pb.GetModelInfoResponse:
        b, m = self.bundle, self.bundle.manifest
        pre = b.preprocessing
        return pb.GetModelInfoResponse(
            bundle_id=b.bundle_id, schema_version=m.schema_version, created_at=m.created_at,
            model_name=m.model.name, model_sha256=m.model.file_sha256, layer=m.model.layer,
            feature_shape=list(m.model.feature_shape), num_classes=self.num_classes,
            num_explained_classes=len(b.classes), head_kind=b.head_kind, method=m.method.name,
            resize=pre.resize, crop=pre.crop, mean=list(pre.mean), std=list(pre.std),
            runtime=self.runtime.name, providers=list(self.runtime.providers),
            max_batch_size=self.config.max_batch_size, model_source=m.model.source,
            interpolation=pre.interpolation)

    def warmup(self, max_batch_size: int) -> None:
        """Run every batch size up to the largest once (powers of two), and one explanation."""
        s = self.bundle.preprocessing.crop
        n, sizes = 1, []
        while n < max_batch_size:
            sizes.append(n)
            n *= 2
        sizes.append(max_batch_size)
        outputs = None
        for n in sizes:
            outputs = self.infer([np.zeros((3, s, s), np.float32)] * n)
        if self.bundle.classes and outputs:
            features, logits = outputs[0]
            cid = next(iter(self.bundle.classes))
            ex = self.explainer.explain(features, logits, cid)
            if ex.concepts:
                overlay_png(ex.concepts[0].heatmap, (s, s), (0, 0, s, s))


def _flatten(d, prefix: str = ""):
    """(dotted key, float) for every number in a nested dict; other values are skipped."""
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            yield key, float(v)
