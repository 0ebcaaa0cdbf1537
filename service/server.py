"""The gRPC explanation server (``grpc.aio``), KServe-style: servicer, one error interceptor, health,
reflection, graceful drain.

A request goes through hooks, LitServe-style, all in one worker thread (one hop off the event
loop and back: on a 5 ms model every thread hand-off is a visible share of the latency):

    cache    (event loop)      hit: answered here, no thread at all
    decode                     image bytes -> model input (3, S, S) float32, image size and crop
    batch                      BatchQueue: concurrent requests share one inference; the thread of
                               the oldest request leads the batch, the others wait for it
    predict  (inference thread) runtime.run(batch) -> features (N, C, H, W), logits (N, K); the
                               leader hands its batch to it and waits
    unbatch                    per-request views features[i], logits[i] (no copies)
    explain                    Explainer.explain for the requested classes only
    encode                     protobuf bytes; heatmaps and prototypes only when asked for

Decode and explain+encode run at most ``workers`` at a time (a CPU budget, so they do not crowd
out inference's own threads); threads that wait for a batch hold no CPU.

Answers are cached as serialized ExplainResponse bytes *without* timings; the timings of the
request and ``cache_hit`` are appended as a second serialized ExplainResponse (protobuf merges
concatenated messages), so neither a miss nor a hit parses or serializes an answer twice.

Errors are mapped to status codes in one place (:func:`status_for`, used by
:class:`ErrorInterceptor` and by the per-item statuses of ExplainStream); clients never see a
stack trace.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hmac
import inspect
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from ..v1 import explain_service_pb2 as pb
from .batcher import BatchQueue, CancelledItemError, ClosedError, DeadlineExpiredError, QueueFullError, Ticket
from .bundle import Bundle, load_bundle
from .cache import cache_key, make_cache
from .config import ServerConfig
from .contrast import ContrastStore
from .explain import Explainer, top_predictions
from .html import overlay_png, raw_grid
from .metrics import Metrics
from .preprocess import ImageError, preprocess
from .runtime import Runtime, create_runtime, open_session, select_providers, single_threaded_blas

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExplainService"].full_name  # conceptlens.v1.ExplainService
MAX_CLASSES_PER_REQUEST = 32
HASH_IN_THREAD_BYTES = 256 << 10  # hash larger images off the event loop
MAX_OVERLAY_SIDE = 1024  # PNG overlays of larger images keep the aspect ratio at this long side
CONTRAST_PAIRS = 256  # contrast pairs computed on request and kept (LRU)

RAW, PNG = pb.HEATMAP_FORMAT_RAW, pb.HEATMAP_FORMAT_PNG_OVERLAY
HEATMAP_FORMATS = {pb.HEATMAP_FORMAT_UNSPECIFIED, pb.HEATMAP_FORMAT_NONE, RAW, PNG}
PROTOTYPE_FORMATS = {pb.PROTOTYPE_FORMAT_UNSPECIFIED, pb.PROTOTYPE_FORMAT_REFERENCE, pb.PROTOTYPE_FORMAT_JPEG}


# -- errors ------------------------------------------------------------------------------------
class ClassNotFoundError(LookupError):
    """An unknown class, or a class without concepts in the bundle."""


class UnavailableError(Exception):
    """The server is loading or draining."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and client-facing message for an exception raised while serving."""
    if isinstance(exc, ClassNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc.args[0]) if exc.args else "class not found"
    if isinstance(exc, ValueError):  # ImageError included
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (UnavailableError, ClosedError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, CancelledItemError):
        return grpc.StatusCode.CANCELLED, str(exc)
    if isinstance(exc, (DeadlineExpiredError, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the answer was ready"
    ref = uuid.uuid4().hex[:12]
    log.error("internal error (ref %s)", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the server log has the details"


def _context_code(context) -> grpc.StatusCode:
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    for c in grpc.StatusCode:  # some versions return the int value
        if code is not None and c.value[0] == code:
            return c
    return grpc.StatusCode.UNKNOWN


# -- interceptors ------------------------------------------------------------------------------
def _rebuild(handler: grpc.RpcMethodHandler, behavior) -> grpc.RpcMethodHandler:
    kind = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
        (handler.request_streaming, handler.response_streaming)]
    return kind(behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _behavior(handler: grpc.RpcMethodHandler):
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps every exception of every RPC to a status code with a clear message, and counts RPCs
    by method and code. Wrapped handlers are kept per method, so the wrapping costs nothing per call."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, details.method.rsplit("/", 1)[-1])
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        inner = _behavior(handler)
        record = self.metrics.rpc

        async def guarded(request, context, produce):
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                return await produce(request, context)
            except grpc.aio.AbortError:
                code = _context_code(context)
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as e:
                code, message = status_for(e)
                await context.abort(code, message)
            finally:
                record(method, code.name, time.perf_counter() - start)

        if not handler.response_streaming:
            async def produce_unary(request, context):
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result

            async def unary(request, context):
                return await guarded(request, context, produce_unary)
            return _rebuild(handler, unary)

        async def produce_stream(request, context):
            result = inner(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    await context.write(item)
            elif inspect.isawaitable(result):
                await result
            else:  # a plain iterator
                for item in result:
                    await context.write(item)

        async def streaming(request, context):
            await guarded(request, context, produce_stream)
        return _rebuild(handler, streaming)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except health checks."""

    EXEMPT = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith(self.EXEMPT):
            return await continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got = got.encode() if isinstance(got, str) else bytes(got)
        handler = await continuation(details)
        if handler is None or hmac.compare_digest(got, self._expected):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        return _rebuild(handler, deny)


# -- the loaded model --------------------------------------------------------------------------
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
            raise ValueError(f"the {what} reference has neither an id nor a name")
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
                raise ValueError(f"{name} must not be negative (got {value})")
        if opts.heatmap_format not in HEATMAP_FORMATS:
            raise ValueError(f"unknown heatmap_format {opts.heatmap_format}")
        if opts.prototype_format not in PROTOTYPE_FORMATS:
            raise ValueError(f"unknown prototype_format {opts.prototype_format}")
        if len(opts.classes) > MAX_CLASSES_PER_REQUEST or top_k > MAX_CLASSES_PER_REQUEST:
            raise ValueError(f"at most {MAX_CLASSES_PER_REQUEST} classes can be explained per request")
        classes = None
        if len(opts.classes):
            classes = list(dict.fromkeys(self.resolve(r) for r in opts.classes))
            for cid in classes:
                self.require_concepts(cid)
        contrast = None
        if opts.HasField("contrast") and opts.contrast.WhichOneof("ref") is not None:
            contrast = self.resolve(opts.contrast, "contrast class")
            if classes is not None and contrast in classes:
                raise ValueError(f"the contrast class must differ from the explained class "
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
        ranked = top_predictions(logits, self.names, max(plan.predictions, 0 if plan.classes is not None else plan.top_k))
        cids = plan.classes if plan.classes is not None else [p.class_id for p in ranked[:plan.top_k]]
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
            raise ValueError(f"prototype path {rel!r} leaves the bundle")
        return path.read_bytes()

    # --- static answers ---
    def class_concepts(self, request: pb.GetClassConceptsRequest) -> pb.GetClassConceptsResponse:
        if not request.HasField("class_ref"):
            raise ValueError("class_ref is required")
        cid = self.resolve(request.class_ref)
        self.require_concepts(cid)
        cc = self.bundle.classes[cid]
        n = request.prototypes_per_concept if request.HasField("prototypes_per_concept") else None
        if n is not None and n < 0:
            raise ValueError("prototypes_per_concept must not be negative")
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


def _serialize(message) -> bytes:
    """Response serializer that passes already-serialized bytes through."""
    return message if isinstance(message, (bytes, bytearray)) else message.SerializeToString()


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    """Protobuf wire encoding of a bytes/message field (to embed serialized answers without parsing)."""
    n, out = len(payload), bytearray([(field_number << 3) | 2])
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + payload


# -- the server --------------------------------------------------------------------------------
class ExplainServer:
    """Owns the gRPC server, the model, the batcher, the cache, the metrics and the lifecycle.

    ``await start()`` binds the ports (health NOT_SERVING), loads and warms the model, then turns
    health SERVING; ``await stop()`` drains. A ``bundle``/``runtime`` may be passed in (tests).
    """

    def __init__(self, config: ServerConfig, bundle: Bundle | None = None, runtime: Runtime | None = None):
        self.config = config.validate()
        self.metrics = Metrics(concept_metrics=not config.no_concept_metrics)
        self.model: ServingModel | None = None
        self._bundle, self._runtime = bundle, runtime
        self._draining = False
        # One thread per request in the pipeline: enough for a running batch and a full next one on
        # every batch slot, plus the decoding ones; more admitted requests wait for a thread.
        batching = 2 * config.max_batch_size * config.max_concurrent_batches
        self._pipeline = concurrent.futures.ThreadPoolExecutor(batching + config.workers,
                                                               thread_name_prefix="cl-req")
        self._cpu = threading.BoundedSemaphore(config.workers)  # decodes and explanations at once
        # The model runs on its own threads, one per batch slot: ONNX Runtime called from one
        # steady thread served 5-10 % more images/s on EfficientNet-Lite0 here than called from
        # whichever request thread leads the batch, at the same batch-1 latency (measured).
        self._inference = concurrent.futures.ThreadPoolExecutor(config.max_concurrent_batches,
                                                                thread_name_prefix="cl-infer")
        self.cache = None
        self.batcher: BatchQueue | None = None
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._stopped = asyncio.Event()
        # requests past the cache at once: the queue, the running batches, and as many decoding
        self._admitted = 0
        self._admitted_lock = threading.Lock()  # decremented in the request's thread
        self._admission_limit = config.max_queue_size + batching
        self.metrics.inflight.set_function(lambda: self._admitted)

    # --- lifecycle ---
    async def start(self) -> int:
        """Bind, load, warm, serve; returns the gRPC port."""
        cfg = self.config
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        interceptors = [ErrorInterceptor(self.metrics)]
        token = cfg.token()
        if token:
            interceptors.append(AuthInterceptor(token))
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        self.server.add_generic_rpc_handlers((self._handlers(),))
        from grpc_health.v1 import health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            self.port = self.server.add_secure_port(address, _server_credentials(cfg))
        else:
            self.port = self.server.add_insecure_port(address)
        await self.server.start()
        if cfg.metrics_port:
            self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.metrics_host)
        log.info("listening on %s (port %d)%s; loading %s", address, self.port,
                 f", metrics on :{self.metrics_port}" if self.metrics_port else "", cfg.bundle)
        try:
            self.model = await asyncio.get_running_loop().run_in_executor(self._pipeline, self._load)
        except BaseException:
            await self.server.stop(0)
            self.metrics.stop()
            raise
        max_batch = cfg.max_batch_size
        if self.model.runtime.max_batch_size:
            max_batch = min(max_batch, self.model.runtime.max_batch_size)
        self.batcher = BatchQueue(self._predict, max_batch_size=max_batch,
                                  max_delay_s=cfg.max_queue_delay_ms / 1000.0, max_queue_size=cfg.max_queue_size,
                                  max_concurrent_batches=cfg.max_concurrent_batches,
                                  max_arrival_wait_s=cfg.max_arrival_wait_ms / 1000.0,
                                  on_batch=self.metrics.batch, on_depth=self.metrics.depth, on_drop=self.metrics.drop)
        self.cache = make_cache(cfg.redis_url, cfg.cache_size, cfg.cache_ttl_s, cfg.redis_timeout_ms / 1000.0,
                                cfg.redis_retry_s, metrics=self.metrics)
        b = self.model.bundle
        self.metrics.bundle_info.labels(b.bundle_id, self.model.model_info.model_name,
                                        self.model.model_info.method, self.model.runtime.name).set(1)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.ready.set(1)
        log.info("serving bundle %s (%d classes with concepts) on %s, batch <= %d, cache %s", b.bundle_id,
                 len(b.classes), ",".join(self.model.runtime.providers), max_batch,
                 self.cache.backend if self.cache is not None else "off")
        return self.port

    def _load(self) -> ServingModel:
        cfg = self.config
        single_threaded_blas()
        bundle = self._bundle or load_bundle(cfg.bundle, verify=not cfg.no_verify)
        runtime = self._runtime or create_runtime(
            cfg.runtime, bundle.model_path, device=cfg.device, intra_op_threads=cfg.intra_op_threads,
            inter_op_threads=cfg.inter_op_threads, spin=cfg.ort_spin, torchserve_address=cfg.torchserve_address,
            torchserve_model=cfg.torchserve_model, torchserve_token_file=cfg.torchserve_token_file,
            torchserve_timeout_s=cfg.torchserve_timeout_s, bundle_id=bundle.bundle_id)
        model = ServingModel(bundle, runtime, cfg)
        model.contrasts.on_compute = lambda a, b, seconds: self.metrics.stage("contrast", seconds)
        if not cfg.no_warmup:
            t = time.perf_counter()
            model.warmup(min(cfg.max_batch_size, runtime.max_batch_size or cfg.max_batch_size))
            log.info("warmed up in %.2f s", time.perf_counter() - t)
        return model

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, new calls UNAVAILABLE, in-flight calls finish (up to grace)."""
        if self._draining:
            await self._stopped.wait()
            return
        self._draining = True
        grace = self.config.grace_s if grace is None else grace
        log.info("draining (grace %.1f s)", grace)
        self.metrics.ready.set(0)
        await self.health.enter_graceful_shutdown()
        if self.config.drain_delay_s > 0:
            await asyncio.sleep(self.config.drain_delay_s)
        if self.server is not None:
            await self.server.stop(grace)
        if self.batcher is not None:
            self.batcher.close()
        if self.cache is not None:
            await self.cache.close()
        self.metrics.stop()
        self._pipeline.shutdown(wait=False, cancel_futures=True)
        self._inference.shutdown(wait=False, cancel_futures=True)
        if self.model is not None:
            self.model.runtime.close()
        self._stopped.set()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --- plumbing ---
    def _handlers(self) -> grpc.GenericRpcHandler:
        def uu(fn, req):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req.FromString,
                                                       response_serializer=_serialize)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Explain": uu(self.Explain, pb.ExplainRequest),
            "ExplainStream": grpc.stream_stream_rpc_method_handler(
                self.ExplainStream, request_deserializer=pb.ExplainStreamRequest.FromString,
                response_serializer=_serialize),
            "GetClassConcepts": uu(self.GetClassConcepts, pb.GetClassConceptsRequest),
            "ListClasses": uu(self.ListClasses, pb.ListClassesRequest),
            "GetModelInfo": uu(self.GetModelInfo, pb.GetModelInfoRequest),
        })

    def _ready(self) -> ServingModel:
        if self._draining:
            raise UnavailableError("the server is shutting down; retry on another replica")
        if self.model is None or self.batcher is None:
            raise UnavailableError("the model is still loading; retry when health says SERVING")
        return self.model

    def _predict(self, inputs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The batcher's predict (in the leader's thread): the batch runs on the inference thread."""
        return self._inference.submit(self.model.infer, inputs).result()

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining() if context is not None else None
        return None if remaining is None else time.monotonic() + remaining

    async def explain_bytes(self, request: pb.ExplainRequest, deadline: float | None) -> bytes:
        """The whole Explain pipeline; returns the serialized ExplainResponse."""
        start = time.perf_counter()
        model = self._ready()
        loop = asyncio.get_running_loop()
        metrics = self.metrics
        image = request.image
        if not image:
            raise ImageError("image is empty (0 bytes)")
        key, t_cache = None, 0.0
        if self.cache is not None:
            options = request.options.SerializeToString(deterministic=True)
            key_args = (self.config.cache_namespace, model.bundle.bundle_id, options, image)
            key = cache_key(*key_args) if len(image) < HASH_IN_THREAD_BYTES else \
                await loop.run_in_executor(self._pipeline, cache_key, *key_args)
            hit = await self.cache.get(key)
            t_cache = time.perf_counter() - start
            metrics.stage("cache", t_cache)
            if hit is not None:
                total = time.perf_counter() - start
                return hit + pb.ExplainResponse(cache_hit=True, timings=pb.Timings(
                    cache_seconds=t_cache, total_seconds=total)).SerializeToString()
        plan = model.plan(request.options)  # after the cache: a cached answer had valid options
        if self._admitted >= self._admission_limit:  # bound the work in the pipeline, before decoding
            metrics.drop("queue_full")
            raise QueueFullError(f"the server is busy: {self._admitted} requests are already being served; "
                                 f"retry later")
        with self._admitted_lock:
            self._admitted += 1
        ticket = Ticket()
        job = self._pipeline.submit(self._serve, model, image, plan, deadline, ticket)
        try:
            body, timings = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            ticket.cancel()  # the thread drops the request if it has not reached inference yet
            if job.cancelled():  # it never started: nothing in it will release its place
                self._release()
            raise
        if key is not None:
            self.cache.put(key, body)
        timings.cache_seconds = t_cache
        timings.total_seconds = time.perf_counter() - start
        return body + pb.ExplainResponse(timings=timings).SerializeToString()

    def _release(self) -> None:
        """A request left the pipeline (any thread)."""
        with self._admitted_lock:
            self._admitted -= 1

    def _serve(self, model: ServingModel, image: bytes, plan: Plan, deadline: float | None,
               ticket: Ticket) -> tuple[bytes, pb.Timings]:
        """decode -> batch -> predict -> explain -> encode, in one worker thread.

        Returns the serialized answer (without timings) and the timings of its stages.
        """
        metrics, batcher = self.metrics, self.batcher
        announced = False  # between expect() and submit(): a batch leader may wait for it
        try:
            batcher.expect(deadline, ticket)  # refused if it waited for a thread past its deadline
            announced = True
            with self._cpu:
                t0 = time.perf_counter()
                x, info = model.decode(image)
                t_decode = time.perf_counter() - t0
            metrics.stage("decode", t_decode)
            announced = False
            (features, logits), batch = batcher.submit(x, deadline, ticket, expected=True)
            metrics.stage("queue", batch.queue_seconds)
            with self._cpu:
                body, t_explain, t_encode = model.answer(features, logits, plan, info, metrics)
            metrics.stage("explain", t_explain)
            metrics.stage("encode", t_encode)
        finally:
            if announced:  # its decode failed
                batcher.unexpect()
            self._release()
        return body, pb.Timings(decode_seconds=t_decode, queue_seconds=batch.queue_seconds,
                                inference_seconds=batch.predict_seconds, explain_seconds=t_explain,
                                encode_seconds=t_encode, batch_size=batch.size)

    # --- RPCs ---
    async def Explain(self, request: pb.ExplainRequest, context) -> bytes:
        return await self.explain_bytes(request, self._deadline(context))

    async def ExplainStream(self, request_iterator, context):
        """Items run concurrently (at most stream_concurrency at once) and are answered as they finish."""
        self._ready()
        deadline = self._deadline(context)
        limit = self.config.stream_concurrency
        slots = asyncio.Semaphore(limit)
        out: asyncio.Queue = asyncio.Queue(maxsize=limit)
        tasks: set[asyncio.Task] = set()
        done = object()

        async def one(item: pb.ExplainStreamRequest):
            try:
                try:
                    body = await self.explain_bytes(item.request, deadline)
                    msg = pb.ExplainStreamResponse(item_id=item.item_id, status=pb.ItemStatus(code=0))
                    msg = msg.SerializeToString() + _length_delimited(3, body)
                except Exception as e:
                    code, text = status_for(e)
                    msg = pb.ExplainStreamResponse(item_id=item.item_id,
                                                   status=pb.ItemStatus(code=code.value[0], message=text))
                await out.put(msg)
            finally:
                slots.release()

        async def read():
            try:
                async for item in request_iterator:
                    await slots.acquire()
                    task = asyncio.get_running_loop().create_task(one(item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks))
                await out.put(done)
            except BaseException as e:
                await out.put(e)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                msg = await out.get()
                if msg is done:
                    return
                if isinstance(msg, BaseException):
                    raise msg
                yield msg
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def GetClassConcepts(self, request: pb.GetClassConceptsRequest, context):
        model = self._ready()
        if request.prototype_format == pb.PROTOTYPE_FORMAT_JPEG:
            return await asyncio.get_running_loop().run_in_executor(self._pipeline, model.class_concepts, request)
        return model.class_concepts(request)

    async def ListClasses(self, request: pb.ListClassesRequest, context):
        return self._ready().list_classes(request.with_concepts_only)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context):
        return self._ready().model_info


def _server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials:
    key, cert = Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes()
    ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


async def serve(config: ServerConfig) -> int:
    """Run a server until SIGTERM or SIGINT, then drain; returns the exit status (0)."""
    server = ExplainServer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = loop.create_task(server.start())
    waiter = loop.create_task(stop.wait())
    await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        starting.result()  # raises if the bundle could not be loaded
    await stop.wait()
    if not starting.done():
        starting.cancel()
        try:
            await starting
        except (asyncio.CancelledError, Exception):
            pass
    await server.stop()
    return 0
