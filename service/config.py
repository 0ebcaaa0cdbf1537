"""Server settings: one dataclass, one field per ``conceptlens serve`` flag.

Each field's metadata gives its flag's help; ``serve_cli`` builds the flags from here, so a flag
``--max-batch-size`` is field ``max_batch_size`` and environment variable
``CONCEPTLENS_MAX_BATCH_SIZE``. Defaults are the embedded single-machine setup: local bundle,
CPU unless a GPU is present, in-process cache, no TLS, no token.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

MiB = 1 << 20


def _f(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ServerConfig:
    bundle: str = _f(None, "one bundle directory written by `conceptlens precompute` (a repository of one model)")
    repository: str = _f(None, "model repository DIR/<model>/<version>/ of bundles (Triton's layout), loaded live")
    model_name: str = _f(None, "--bundle: the model's name (default: the bundle directory's name)")
    default_model: str = _f(None, "model for requests that name none (default: the only model)")
    keep_versions: int = _f(1, "loaded versions kept per model (the newest); older ones are unloaded")
    repository_poll_s: float = _f(10.0, "seconds between scans of --repository for new versions (0: only on "
                                        "SIGHUP and ReloadModels)")
    http_host: str = _f("0.0.0.0", "address of the HTTP/JSON API, the inference protocol and the page")
    http_port: int = _f(8080, "HTTP port (0 turns HTTP off)")
    host: str = _f("[::]", "address to listen on")
    port: int = _f(50051, "gRPC port (0 picks a free one)")
    metrics_host: str = _f("0.0.0.0", "address of the Prometheus /metrics endpoint (127.0.0.1: this host only)")
    metrics_auth: bool = _f(False, "require the bearer token (--auth-token) on /metrics too")
    metrics_port: int = _f(9090, "Prometheus /metrics port (0 turns the endpoint off)")
    runtime: str = _f("onnx", "model runtime", choices=("onnx", "torchserve"))
    torchserve_address: str = _f(None, "--runtime torchserve: TorchServe's gRPC inference address HOST:PORT "
                                       "(its port 7070 by default)")
    torchserve_model: str = _f("conceptlens", "--runtime torchserve: the TorchServe model, an archive built by "
                                              "`conceptlens torchserve-archive` from this bundle")
    torchserve_token_file: str = _f(None, "--runtime torchserve: TorchServe's key_file.json (or a file holding "
                                          "its inference key) when its token authorization is on")
    torchserve_timeout_s: float = _f(60.0, "--runtime torchserve: seconds one TorchServe inference may take")
    device: str = _f("auto", "auto: CUDA when a GPU is present, else CPU", choices=("auto", "cpu", "cuda"))
    intra_op_threads: int = _f(0, "ONNX Runtime threads per operator (0: one per physical core)")
    inter_op_threads: int = _f(1, "ONNX Runtime threads across operators")
    ort_spin: bool = _f(False, "let ONNX Runtime threads spin between runs (dedicated machines)")
    malloc_arenas: int = _f(2, "glibc malloc arenas (0: glibc's default of 8 per core, whose memory climbs "
                               "with live version swaps under load)")
    max_batch_size: int = _f(8, "largest inference batch")
    max_queue_delay_ms: float = _f(0.0, "longest wait for a batch to fill (0: no added delay)")
    max_arrival_wait_ms: float = _f(10.0, "longest wait of a batch for requests already being decoded "
                                          "(never waits when none are)")
    max_queue_size: int = _f(256, "requests waiting for inference before RESOURCE_EXHAUSTED")
    max_concurrent_batches: int = _f(1, "inference batches run at the same time")
    workers: int = _f(2, "requests decoding or explaining at once (a CPU budget beside inference)")
    stream_concurrency: int = _f(32, "images of one ExplainStream call in flight at once")
    redis_url: str = _f(None, "Redis URL for the answer cache (e.g. redis://host:6379/0); "
                              "without one an in-process LRU is used")
    cache_size: int = _f(1024, "entries of the in-process cache, in front of Redis when --redis-url is set "
                               "(0: Redis alone, or no cache without Redis)")
    cache_ttl_s: float = _f(3600.0, "seconds a cached answer lives")
    cache_namespace: str = _f("conceptlens", "prefix of cache keys")
    redis_timeout_ms: float = _f(50.0, "Redis connect/read timeout; slower means no cache")
    redis_retry_s: float = _f(1.0, "after a Redis error, seconds served without it before retrying")
    max_message_bytes: int = _f(16 * MiB, "largest gRPC message received or sent")
    max_pixels: int = _f(40_000_000, "largest declared image size (width x height); bigger is rejected")
    tls_cert: str = _f(None, "PEM certificate chain: serve over TLS")
    tls_key: str = _f(None, "PEM private key of --tls-cert")
    tls_client_ca: str = _f(None, "PEM CA bundle: require client certificates signed by it (mutual TLS)")
    auth_token: str = _f(None, "require 'authorization: Bearer TOKEN' on every call but health checks")
    auth_token_file: str = _f(None, "file holding the bearer token (instead of --auth-token)")
    grace_s: float = _f(30.0, "on SIGTERM, seconds in-flight requests get to finish")
    drain_delay_s: float = _f(0.0, "on SIGTERM, seconds NOT_SERVING is announced before draining")
    no_concept_metrics: bool = _f(False, "do not export per-class presence and residual histograms")
    concept_metrics_classes: int = _f(100, "classes with their own presence and residual series (the first "
                                           "explained, ~10 KB of a scrape each); the others' residuals are "
                                           "summed under class_id=\"other\"")
    no_warmup: bool = _f(False, "skip the warm-up inference (health turns SERVING at once)")
    no_verify: bool = _f(False, "skip checking the bundle's file checksums at load")
    default_prototypes: int = _f(3, "prototypes per concept when a request does not say")
    default_predictions: int = _f(5, "top predictions returned when a request does not say")

    def validate(self) -> "ServerConfig":
        """Raise ValueError for settings that cannot work."""
        if not self.bundle and not self.repository:
            raise ValueError("--bundle or --repository is required")
        if self.bundle and self.repository:
            raise ValueError("--bundle and --repository exclude each other")
        for name in ("max_batch_size", "max_queue_size", "max_concurrent_batches", "workers",
                     "stream_concurrency", "max_message_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.runtime == "torchserve" and not self.torchserve_address:
            raise ValueError("--runtime torchserve needs --torchserve-address HOST:PORT")
        if self.concept_metrics_classes < 0:
            raise ValueError("--concept-metrics-classes must not be negative")
        if self.malloc_arenas < 0:
            raise ValueError("--malloc-arenas must not be negative")
        for name in ("max_queue_delay_ms", "max_arrival_wait_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.metrics_auth and not (self.auth_token or self.auth_token_file):
            raise ValueError("--metrics-auth needs a token: --auth-token or --auth-token-file")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return self

    def token(self) -> str | None:
        """The bearer token from --auth-token or --auth-token-file."""
        if self.auth_token_file:
            with open(self.auth_token_file) as f:
                return f.read().strip() or None
        return self.auth_token or None

    @classmethod
    def from_namespace(cls, ns) -> "ServerConfig":
        """From an argparse namespace whose attributes are named like the fields."""
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})
