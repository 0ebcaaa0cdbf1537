"""Prometheus metrics of the service, served over HTTP (``--metrics-port``).

Base units (seconds), counters end in ``_total``. Each server owns its own registry, so several
servers can live in one process (tests).

    conceptlens_requests_total{method, code}              RPCs by gRPC method and status code
    conceptlens_request_duration_seconds{method}          RPC latency on the server
    conceptlens_stage_duration_seconds{stage}             decode | queue | inference | explain |
                                                          encode | cache | contrast (a pair computed on request)
    conceptlens_batch_size                                items per inference batch
    conceptlens_queue_depth                               items waiting for a batch
    conceptlens_inflight_requests                         Explain requests being served
    conceptlens_dropped_total{reason}                     queue_full | deadline | cancelled
    conceptlens_cache_hits_total{backend}                 backend: memory | redis
    conceptlens_cache_misses_total{backend}
    conceptlens_cache_errors_total{backend, operation}    Redis errors and timeouts (get | set)
    conceptlens_concept_presence{class_id, class_name, concept}   presence per explained concept
    conceptlens_residual{class_id, class_name}            residual, logit units
    conceptlens_relative_residual{class_id, class_name}   |r| / (sum |c| + |r|)
    conceptlens_ready                                     1 once the bundle is loaded and warmed
    conceptlens_bundle_info{bundle_id, model, method, runtime}   1 per loaded version
    conceptlens_model_loads_total{model, result}          version loads: loaded | failed (refused, the old kept)
    conceptlens_cache_memory_bytes, _entries              what the in-process answer cache holds

The per-class series exist only for classes that were explained, and only for the first
``--concept-metrics-classes`` of them (100 by default): a class costs about (concepts + 2) x 15
series, ~10 KB of every scrape and ~1 ms of the scrape's time (holding the GIL), so at ImageNet's
1000 classes, unbounded, one scrape was 10 MB, 108,000 series and a second of the server's time.
Classes explained after the bound is reached are summed into ``class_id="other"``,
``class_name="other"``: their residual and relative residual (drift in aggregate); their presences
are not recorded, concept j of one class having nothing to do with concept j of another. The first
classes explained hold their series for the server's life (series that come and go would break
rate() and the dashboards); with skewed traffic those are mostly the most requested ones.
``--no-concept-metrics`` turns all of these off.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
PRESENCE_BUCKETS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
RESIDUAL_BUCKETS = (-10.0, -5.0, -2.0, -1.0, -0.5, -0.2, -0.1, 0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
RELATIVE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
STAGES = ("decode", "queue", "inference", "explain", "encode", "cache", "contrast")
CONCEPT_METRICS_CLASSES = 100  # classes with their own per-class series (the first explained)
OTHER = "other"  # class_id and class_name of the classes beyond that bound


class Metrics:
    """All metrics of one server, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None, concept_metrics: bool = True,
                 concept_metrics_classes: int = CONCEPT_METRICS_CLASSES):
        r = self.registry = registry or CollectorRegistry()
        self.concept_metrics = concept_metrics
        if concept_metrics_classes < 0:
            raise ValueError("concept_metrics_classes must not be negative")
        self.concept_metrics_classes = int(concept_metrics_classes)
        self._other = None  # the residual series of the classes beyond the bound, made when first needed
        self.requests = Counter("conceptlens_requests", "RPCs by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.request_seconds = Histogram("conceptlens_request_duration_seconds", "RPC latency on the server",
                                         ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("conceptlens_stage_duration_seconds", "Latency per request stage",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self._stages = {s: self.stage_seconds.labels(s) for s in STAGES}
        self._rpc_children: dict[tuple[str, str], tuple] = {}
        self._class_children: dict[int, tuple] = {}  # class id -> its presence and residual series
        self.batch_size = Histogram("conceptlens_batch_size", "Items per inference batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("conceptlens_queue_depth", "Items waiting for an inference batch", registry=r)
        self.inflight = Gauge("conceptlens_inflight_requests", "Explain requests being served", registry=r)
        self.dropped = Counter("conceptlens_dropped", "Requests dropped before inference", ["reason"], registry=r)
        self.cache_hits = Counter("conceptlens_cache_hits", "Cache hits", ["backend"], registry=r)
        self.cache_memory_bytes = Gauge("conceptlens_cache_memory_bytes", "Bytes of answers held in the in-process "
                                        "cache (bounded by 256 MiB and --cache-size entries)", registry=r)
        self.cache_memory_entries = Gauge("conceptlens_cache_memory_entries", "Answers held in the in-process cache",
                                          registry=r)
        self.cache_misses = Counter("conceptlens_cache_misses", "Cache misses", ["backend"], registry=r)
        self.cache_errors = Counter("conceptlens_cache_errors", "Cache backend errors and timeouts",
                                    ["backend", "operation"], registry=r)
        self.presence = Histogram("conceptlens_concept_presence", "Presence of each concept of explained classes",
                                  ["class_id", "class_name", "concept"], buckets=PRESENCE_BUCKETS, registry=r)
        self.residual = Histogram("conceptlens_residual", "Residual of explained classes, logit units",
                                  ["class_id", "class_name"], buckets=RESIDUAL_BUCKETS, registry=r)
        self.relative_residual = Histogram("conceptlens_relative_residual",
                                           "Relative residual of explained classes",
                                           ["class_id", "class_name"], buckets=RELATIVE_BUCKETS, registry=r)
        self.model_loads = Counter("conceptlens_model_loads", "Model version loads by model and result "
                                   "(loaded, failed)", ["model", "result"], registry=r)
        self.ready = Gauge("conceptlens_ready", "1 once the bundle is loaded and the model warmed", registry=r)
        self.bundle_info = Gauge("conceptlens_bundle_info", "The bundle served",
                                 ["bundle_id", "model", "method", "runtime"], registry=r)
        self._http = None

    # -- hooks -------------------------------------------------------------------------------
    def model_load(self, model: str, result: str) -> None:
        """A model version finished loading: result "loaded" or "failed" (refused, the old one kept)."""
        self.model_loads.labels(model, result).inc()

    def rpc(self, method: str, code: str, seconds: float) -> None:
        children = self._rpc_children.get((method, code))
        if children is None:
            children = self._rpc_children[(method, code)] = (self.requests.labels(method, code),
                                                             self.request_seconds.labels(method))
        children[0].inc()
        children[1].observe(seconds)

    def stage(self, stage: str, seconds: float) -> None:
        self._stages[stage].observe(seconds)

    def batch(self, size: int, seconds: float) -> None:
        """One inference batch: its size and its wall time (stage "inference")."""
        self.batch_size.observe(size)
        self._stages["inference"].observe(seconds)

    def depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def drop(self, reason: str) -> None:
        self.dropped.labels(reason).inc()

    def cache_hit(self, backend: str) -> None:
        self.cache_hits.labels(backend).inc()

    def cache_miss(self, backend: str) -> None:
        self.cache_misses.labels(backend).inc()

    def cache_error(self, backend: str, operation: str) -> None:
        self.cache_errors.labels(backend, operation).inc()

    def explanation(self, class_id: int, class_name: str, presences, residual: float, relative: float) -> None:
        """Record one explained class: presence per concept (indexed by concept id) and residuals."""
        if not self.concept_metrics:
            return
        series = self._class_children.get(class_id)
        if series is None and len(self._class_children) >= self.concept_metrics_classes:
            if self._other is None:  # beyond the bound: residuals summed under "other", no presences
                self._other = ([], self.residual.labels(OTHER, OTHER), self.relative_residual.labels(OTHER, OTHER))
            series = self._other
        elif series is None or len(series[0]) != len(presences):  # labels() looked up once per class
            cid = str(class_id)
            series = self._class_children[class_id] = (
                [self.presence.labels(cid, class_name, str(j)) for j in range(len(presences))],
                self.residual.labels(cid, class_name), self.relative_residual.labels(cid, class_name))
        for child, p in zip(series[0], presences):
            child.observe(float(p))
        series[1].observe(residual)
        series[2].observe(relative)

    # -- exposition --------------------------------------------------------------------------
    def text(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0", token: str | None = None) -> int:
        """Start the /metrics HTTP server on a daemon thread; returns the bound port. With ``token``,
        a scrape must send ``authorization: Bearer <token>`` (compared in constant time), else 401."""
        from prometheus_client import start_http_server

        if token is None:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        else:
            server = _guarded_server(self.registry, host, port, f"Bearer {token}".encode())
        self._http = server
        return int(server.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _guarded_server(registry, host: str, port: int, expected: bytes):
    """prometheus_client's WSGI exposition behind a bearer token, on a daemon thread."""
    import hmac
    import threading
    from wsgiref.simple_server import make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler

    app = make_wsgi_app(registry)

    def guarded(environ, start_response):
        if not hmac.compare_digest(environ.get("HTTP_AUTHORIZATION", "").encode(), expected):
            start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer"), ("Content-Type", "text/plain")])
            return [b"/metrics needs 'authorization: Bearer <token>'\n"]
        return app(environ, start_response)

    class Server(ThreadingWSGIServer):
        pass

    Server.address_family, addr = _get_best_family(host, port)
    server = make_server(addr, port, guarded, Server, handler_class=_SilentHandler)
    threading.Thread(target=server.serve_forever, daemon=True, name="cl-metrics").start()
    return server


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` in Prometheus text whose labels include ``labels`` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == str(v) for k, v in labels.items()):
                total += s.value
    return total
