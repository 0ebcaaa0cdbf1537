"""The serving core: one request pipeline over a repository of models, and the server's lifecycle
(``grpc.aio``, KServe-style: health per server and per model, reflection, graceful drain).

The transports are thin layers over :class:`ExplainServer`'s core calls (``explain_bytes``,
``predict``, ``class_concepts``, ``resolve``, ``list_models``, ``reload``): gRPC in grpc_api.py,
HTTP/JSON and the page in http_api.py, the Open Inference Protocol in oip.py. Errors are typed
(errors.py) and mapped to codes in one place. The per-model parts (bundle, runtime, batcher,
inference thread) live in repository.py's ModelVersion; the model's own decode, explain and
encode in serving_model.py.

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

Errors are mapped to status codes in one place (:func:`errors.status_for`, used by the
interceptor, the HTTP layer and the per-item statuses of ExplainStream); clients never see a
stack trace.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from ..v1 import explain_service_pb2 as pb
from .batcher import BatchQueue, QueueFullError, Ticket
from .bundle import Bundle, BundleError
from .cache import cache_key, make_cache
from .config import ServerConfig
from .errors import InvalidInputError, ModelNotFoundError, UnavailableError
from .grpc_api import SERVICE_NAME
from .interceptors import AuthInterceptor, ErrorInterceptor
from .metrics import Metrics
from .preprocess import ImageError
from .repository import ModelRepository, ModelVersion
from .runtime import Runtime, single_threaded_blas
from .serving_model import Plan, ServingModel

log = logging.getLogger(__name__)

HASH_IN_THREAD_BYTES = 256 << 10  # hash larger images off the event loop


# -- the server --------------------------------------------------------------------------------
class ExplainServer:
    """The serving core and its lifecycle: the model repository, the request pipeline, the cache,
    the metrics, and the transports over them (gRPC here; HTTP/JSON, the page and the inference
    protocol in service/http_api.py and service/oip.py).

    ``await start()`` binds the ports (health NOT_SERVING), loads and warms the models, then turns
    health SERVING; ``await stop()`` drains. A ``bundle``/``runtime`` may be passed in (tests): it is
    served as the one model.
    """

    def __init__(self, config: ServerConfig, bundle: Bundle | None = None, runtime: Runtime | None = None):
        self.config = config.validate()
        self.metrics = Metrics(concept_metrics=not config.no_concept_metrics,
                               concept_metrics_classes=config.concept_metrics_classes)
        self._draining = False
        # One thread per request in the pipeline: enough for a running batch and a full next one on
        # every batch slot, plus the decoding ones; more admitted requests wait for a thread. The
        # threads and the decode/explain slots are the machine's budget, shared by all models.
        batching = 2 * config.max_batch_size * config.max_concurrent_batches
        self._pipeline = concurrent.futures.ThreadPoolExecutor(batching + config.workers,
                                                               thread_name_prefix="cl-req")
        self._cpu = threading.BoundedSemaphore(config.workers)  # decodes and explanations at once
        self.cache = None
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        # requests past the cache at once: the queue, the running batches, and as many decoding
        self._admitted = 0
        self._admitted_lock = threading.Lock()  # decremented in the request's thread
        self._admission_limit = config.max_queue_size + batching
        self.metrics.inflight.set_function(lambda: self._admitted)
        if config.repository:
            root, single = Path(config.repository), None
        else:
            path = Path(config.bundle) if config.bundle else Path(".")
            root, single = None, (config.model_name or path.resolve().name or "model", path)
        self.repository = ModelRepository(config, self.metrics, root=root, single=single,
                                          on_change=self._models_changed, bundle=bundle, runtime=runtime)

    # --- lifecycle ---
    async def start(self) -> int:
        """Bind, load, warm, serve; returns the gRPC port."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
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
        from .grpc_api import ExplainServicer

        handlers = [ExplainServicer(self).handler()]
        try:
            from . import oip
            handlers.append(oip.grpc_handler(self))
        except ImportError:
            pass
        self.server.add_generic_rpc_handlers(tuple(handlers))
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
            self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.metrics_host,
                                                   cfg.token() if cfg.metrics_auth else None)
        if cfg.http_port:
            try:
                from .http_api import start_http
            except ImportError as e:
                log.warning("HTTP is off: %s", e)
            else:
                self._http, self.http_port = await start_http(self, cfg.http_host, cfg.http_port)
        log.info("listening on %s (port %d)%s%s; loading %s", address, self.port,
                 f", HTTP on :{self.http_port}" if self.http_port else "",
                 f", metrics on :{self.metrics_port}" if self.metrics_port else "", cfg.repository or cfg.bundle)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pipeline, single_threaded_blas)
            await loop.run_in_executor(self._pipeline, self.repository.scan)
            await loop.run_in_executor(self._pipeline, self.repository.wait_loaded)
            if not self.repository.loaded_versions() and cfg.bundle:  # --bundle: a bundle that does not load is fatal
                status = self.repository.status()
                reason = status.models[0].versions[0].reason if status.models and status.models[0].versions else ""
                raise BundleError(reason or f"bundle {cfg.bundle} could not be loaded")
        except BaseException:
            await self._close_transports()
            raise
        self.cache = make_cache(cfg.redis_url, cfg.cache_size, cfg.cache_ttl_s, cfg.redis_timeout_ms / 1000.0,
                                cfg.redis_retry_s, metrics=self.metrics)
        near = getattr(self.cache, "near", self.cache)
        if hasattr(near, "held_bytes"):  # read at scrape time
            self.metrics.cache_memory_bytes.set_function(near.held_bytes)
            self.metrics.cache_memory_entries.set_function(near.__len__)
        for name in self.repository.names():
            await self._set_model_health(name)
        self.metrics.ready.set(1)
        if cfg.repository and cfg.repository_poll_s > 0:
            self._poller = loop.create_task(self._poll())
        for mv in self.repository.loaded_versions():
            log.info("serving %s version %d: bundle %s (%d classes with concepts) on %s, batch <= %d", mv.name,
                     mv.version, mv.bundle_id, len(mv.model.bundle.classes), ",".join(mv.model.runtime.providers),
                     mv.max_batch)
        log.info("cache %s", self.cache.backend if self.cache is not None else "off")
        return self.port

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.repository_poll_s)
            try:
                await self.reload()
            except Exception as e:  # a repository that vanished for a moment: keep serving, log
                log.error("repository scan failed: %s", e)

    async def reload(self) -> pb.ReloadModelsResponse:
        """Scan the repository now (the poll, SIGHUP and the ReloadModels call do this)."""
        if self._draining:
            raise UnavailableError("the server is shutting down")
        loading, unloaded = await asyncio.get_running_loop().run_in_executor(self._pipeline, self.repository.scan)
        return pb.ReloadModelsResponse(loading=loading, unloaded=unloaded)

    def _models_changed(self, name: str) -> None:
        """A model's ready versions changed (any thread): its health follows, its info metric too."""
        for mv in self.repository.loaded_versions():
            if mv.name == name and mv.model is not None:
                self.metrics.bundle_info.labels(mv.bundle_id, mv.model.model_info.model_name,
                                                mv.model.model_info.method, mv.model.runtime.name).set(1)
        if self._loop is not None and not self._draining:
            asyncio.run_coroutine_threadsafe(self._set_model_health(name), self._loop)

    async def _set_model_health(self, name: str) -> None:
        """Health of the model ``name`` and of the server (SERVING while any model is ready)."""
        def status(ok: bool):
            return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        if self._draining:
            return
        await self.health.set(name, status(self.repository.is_ready(name)))
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status(self.ready()))

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, new calls UNAVAILABLE, in-flight calls finish (up to grace)."""
        if self._draining:
            await self._stopped.wait()
            return
        self._draining = True
        grace = self.config.grace_s if grace is None else grace
        log.info("draining (grace %.1f s)", grace)
        self.metrics.ready.set(0)
        if self._poller is not None:
            self._poller.cancel()
        await self.health.enter_graceful_shutdown()
        if self.config.drain_delay_s > 0:
            await asyncio.sleep(self.config.drain_delay_s)
        stops = [self.server.stop(grace)] if self.server is not None else []
        if self._http is not None:
            stops.append(self._http.cleanup())
        await asyncio.gather(*stops)  # in-flight gRPC and HTTP requests finish side by side
        if self.cache is not None:
            await self.cache.close()
        self.metrics.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.repository.close)
        self._pipeline.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()
        log.info("stopped")

    async def _close_transports(self) -> None:
        if self._http is not None:
            await self._http.cleanup()
        if self.server is not None:
            await self.server.stop(0)
        self.metrics.stop()
        self.repository.close()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --- the core the transports call ---
    def ready(self) -> bool:
        return not self._draining and bool(self.repository.loaded_versions())

    def model_ready(self, name: str, version: int = 0) -> bool:
        return not self._draining and self.repository.is_ready(name, version)

    def resolve(self, model: str = "", version: int = 0) -> ModelVersion:
        """The loaded version asked for (for metadata: not held; see :meth:`explain_bytes`)."""
        mv = self._acquire(model, version)
        mv.release()
        return mv

    def _acquire(self, model: str, version: int) -> ModelVersion:
        if self._draining:
            raise UnavailableError("the server is shutting down; retry on another replica")
        return self.repository.acquire(model, int(version))

    def list_models(self) -> pb.ListModelsResponse:
        return self.repository.status()

    def _default_version(self) -> ModelVersion | None:
        try:
            return self.resolve()
        except (UnavailableError, ModelNotFoundError, InvalidInputError):
            return None

    @property
    def model(self) -> ServingModel | None:
        """The default model's newest version (tests and single-model tools)."""
        mv = self._default_version()
        return mv.model if mv else None

    @property
    def batcher(self) -> BatchQueue | None:
        mv = self._default_version()
        return mv.batcher if mv else None

    async def class_concepts(self, request: pb.GetClassConceptsRequest) -> pb.GetClassConceptsResponse:
        mv = self._acquire(request.model, request.version)
        try:
            if request.prototype_format == pb.PROTOTYPE_FORMAT_JPEG:
                return await asyncio.get_running_loop().run_in_executor(self._pipeline, mv.model.class_concepts,
                                                                        request)
            return mv.model.class_concepts(request)
        finally:
            mv.release()

    async def predict(self, model: str, version: int, inputs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Plain inference of model inputs (3, S, S) float32 through the version's batcher."""
        mv = self._acquire(model, version)
        try:
            s = mv.model.bundle.preprocessing.crop
            for x in inputs:
                if x.shape != (3, s, s):
                    raise InvalidInputError(f"model input must be 3 x {s} x {s}, got {' x '.join(map(str, x.shape))}")
            loop = asyncio.get_running_loop()
            jobs = [loop.run_in_executor(self._pipeline, mv.batcher.submit, np.ascontiguousarray(x, np.float32))
                    for x in inputs]
            return [r for r, _ in await asyncio.gather(*jobs)]
        finally:
            mv.release()

    async def explain_bytes(self, request: pb.ExplainRequest, deadline: float | None) -> bytes:
        """The whole Explain pipeline; returns the serialized ExplainResponse."""
        start = time.perf_counter()
        mv = self._acquire(request.model, request.version)
        try:
            return await self._explain(mv, request, deadline, start)
        finally:
            mv.release()

    async def _explain(self, mv: ModelVersion, request: pb.ExplainRequest, deadline: float | None,
                       start: float) -> bytes:
        model = mv.model
        loop = asyncio.get_running_loop()
        metrics = self.metrics
        image = request.image
        if not image:
            raise ImageError("image is empty (0 bytes)")
        key, t_cache = None, 0.0
        if self.cache is not None:
            options = request.options.SerializeToString(deterministic=True)
            key_args = (self.config.cache_namespace, mv.cache_scope, options, image)
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
        job = self._pipeline.submit(self._serve, mv, image, plan, deadline, ticket)
        try:
            body, timings = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            ticket.cancel()  # the thread drops the request if it has not reached inference yet
            if job.cancelled():  # it never started: nothing in it will release its place
                self._release()
            raise
        body += mv.answer_identity
        if key is not None:
            self.cache.put(key, body)
        timings.cache_seconds = t_cache
        timings.total_seconds = time.perf_counter() - start
        return body + pb.ExplainResponse(timings=timings).SerializeToString()

    def _release(self) -> None:
        """A request left the pipeline (any thread)."""
        with self._admitted_lock:
            self._admitted -= 1

    def _serve(self, mv: ModelVersion, image: bytes, plan: Plan, deadline: float | None,
               ticket: Ticket) -> tuple[bytes, pb.Timings]:
        """decode -> batch -> predict -> explain -> encode, in one worker thread.

        Returns the serialized answer (without timings) and the timings of its stages.
        """
        model, metrics, batcher = mv.model, self.metrics, mv.batcher
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


async def _reload_logged(server: ExplainServer) -> None:
    try:
        found = await server.reload()
        log.info("SIGHUP: loading %s; unloaded %s", list(found.loading) or "nothing", list(found.unloaded) or "nothing")
    except Exception as e:
        log.error("SIGHUP: repository scan failed: %s", e)


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
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload_logged(server)))
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
