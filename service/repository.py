"""The model repository: ``DIR/<model>/<version>/`` bundles (Triton's layout), loaded and unloaded live.

Each loaded version is a :class:`ModelVersion`: its own bundle, runtime session, explainer,
contrast store, batcher and inference thread. What the versions share is the machine's budget
(the server's request threads and its decode/explain slots) and the answer cache, whose key
carries the model, the version and the bundle id, so no answer crosses models or bundles.

A scan (the poll, SIGHUP, or the ReloadModels call) finds new version directories (a positive
integer name holding ``manifest.json``); each is loaded in the background (checksums verified,
warmed) and served once ready. The newest ``keep_versions`` ready versions of a model stay
loaded; an older one stops taking new requests at once, finishes those it holds, and is then
closed (its runtime session released). A version that fails to load is logged, counted
(``conceptlens_model_loads_total{result="failed"}``) and left FAILED while the older versions
keep serving; it is tried again when its manifest changes.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..v1 import explain_service_pb2 as pb
from .batcher import BatchQueue
from .bundle import MANIFEST, load_bundle
from .config import ServerConfig
from .errors import InvalidInputError, ModelNotFoundError, UnavailableError
from .memory import release_memory
from .metrics import Metrics
from .runtime import create_runtime
from .serving_model import ServingModel

log = logging.getLogger(__name__)

LOADING, READY, UNLOADING, FAILED = "LOADING", "READY", "UNLOADING", "FAILED"


class ModelVersion:
    """One loaded version of a model: the ServingModel, its batcher and its inference thread.

    ``acquire``/``release`` count the requests it holds, so that an unloaded version is closed only
    once the last of them has finished."""

    def __init__(self, name: str, version: int, path: Path, model: ServingModel, config: ServerConfig,
                 metrics: Metrics):
        self.name, self.version, self.path, self.model = name, version, path, model
        self.state = READY
        # appended to every answer it gives (serialized once here, not per request)
        self.answer_identity = pb.ExplainResponse(model=name, version=version).SerializeToString()
        self.cache_scope = f"{name}/{version}/{model.bundle.bundle_id}"  # what its cache keys hash beside the request
        # The model runs on its own threads, one per batch slot: ONNX Runtime called from one steady
        # thread served 5-10 % more images/s on EfficientNet-Lite0 than from the leading request's.
        self._inference = concurrent.futures.ThreadPoolExecutor(config.max_concurrent_batches,
                                                                thread_name_prefix=f"cl-infer-{name}")
        max_batch = config.max_batch_size
        if model.runtime.max_batch_size:
            max_batch = min(max_batch, model.runtime.max_batch_size)
        self.batcher = BatchQueue(self._predict, max_batch_size=max_batch,
                                  max_delay_s=config.max_queue_delay_ms / 1000.0, max_queue_size=config.max_queue_size,
                                  max_concurrent_batches=config.max_concurrent_batches,
                                  max_arrival_wait_s=config.max_arrival_wait_ms / 1000.0,
                                  on_batch=metrics.batch, on_depth=metrics.depth, on_drop=metrics.drop)
        self.max_batch = max_batch
        self._held = 0
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    @property
    def bundle_id(self) -> str:
        return self.model.bundle.bundle_id

    def _predict(self, inputs: list[np.ndarray]):
        """The batcher's predict (in the leader's thread): the batch runs on the inference thread."""
        return self._inference.submit(self.model.infer, inputs).result()

    def acquire(self) -> bool:
        """Hold the version for one request; False once it is unloading."""
        with self._lock:
            if self.state != READY:
                return False
            self._held += 1
            self._idle.clear()
            return True

    def release(self) -> None:
        with self._lock:
            self._held -= 1
            if self._held == 0:
                self._idle.set()

    def unload(self, timeout: float | None = None) -> None:
        """Stop taking requests, wait for those held (up to ``timeout`` s), release the runtime."""
        with self._lock:
            self.state = UNLOADING
        self._idle.wait(timeout)
        self.batcher.close()
        self._inference.shutdown(wait=True)
        self.model.runtime.close()
        self.model = None  # the bundle's tensors and the session go with it
        release_memory()


@dataclass
class _Entry:
    """What the repository knows of one version directory."""

    version: int
    path: Path
    state: str = LOADING
    loaded: ModelVersion | None = None
    reason: str = ""
    manifest_mtime: float = 0.0


@dataclass
class _Model:
    name: str
    entries: dict[int, _Entry] = field(default_factory=dict)


def scan_versions(model_dir: Path) -> dict[int, Path]:
    """Version directories of a model: positive integer names that hold a manifest."""
    found = {}
    for d in model_dir.iterdir() if model_dir.is_dir() else ():
        if d.is_dir() and d.name.isdigit() and int(d.name) > 0 and (d / MANIFEST).is_file():
            found[int(d.name)] = d
    return found


class ModelRepository:
    """The models a server serves, by name and version; thread-safe.

    ``root``: a repository directory, or None with ``single`` = (name, bundle dir) for ``--bundle``.
    ``on_change(name)`` is called (from any thread) when a model's ready versions change.
    """

    def __init__(self, config: ServerConfig, metrics: Metrics, root: Path | None = None,
                 single: tuple[str, Path] | None = None, on_change: Callable[[str], None] | None = None,
                 bundle=None, runtime=None):
        self.config, self.metrics = config, metrics
        self.root, self.single = (Path(root) if root else None), single
        self._given = (bundle, runtime)  # a bundle and/or runtime handed in (tests) instead of loaded
        self.on_change = on_change or (lambda name: None)
        self._models: dict[str, _Model] = {}
        self._lock = threading.RLock()
        self._loads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cl-load")
        self._pending: list[concurrent.futures.Future] = []
        self._closed = False

    # --- discovery and loading ---
    def scan(self) -> tuple[list[str], list[str]]:
        """Find new, changed and removed version directories; start loading the new ones in the
        background and unload the removed ones. Returns ("model/version" loading, unloaded)."""
        if self.single is not None:
            found = {self.single[0]: {1: Path(self.single[1])}}
        else:
            if not self.root.is_dir():
                raise FileNotFoundError(f"model repository {self.root} does not exist")
            found = {d.name: scan_versions(d) for d in sorted(self.root.iterdir())
                     if d.is_dir() and not d.name.startswith(".")}
        loading, unloaded = [], []
        with self._lock:
            if self._closed:
                return loading, unloaded
            for name, versions in found.items():
                m = self._models.setdefault(name, _Model(name))
                for v, path in sorted(versions.items()):
                    mtime = _mtime(path / MANIFEST)
                    e = m.entries.get(v)
                    if e is not None and not (e.state == FAILED and mtime != e.manifest_mtime):
                        continue
                    m.entries[v] = _Entry(v, path, manifest_mtime=mtime)
                    loading.append(f"{name}/{v}")
                    self._pending.append(self._loads.submit(self._load, name, v))
                for v in [v for v in m.entries if v not in versions]:
                    unloaded += self._retire(m, v, reason="its directory is gone")
            for name in [n for n in self._models if n not in found]:
                for v in list(self._models[name].entries):
                    unloaded += self._retire(self._models[name], v, reason="its model directory is gone")
                del self._models[name]
        if loading:
            log.info("repository: loading %s", ", ".join(loading))
        return loading, unloaded

    def wait_loaded(self, timeout: float | None = None) -> None:
        """Block until every load started so far has finished (ready or failed)."""
        with self._lock:
            pending, self._pending = self._pending, []
        concurrent.futures.wait(pending, timeout)

    def serving_model(self, path: Path, bundle=None, runtime=None) -> ServingModel:
        """The bundle at ``path`` (or the one handed in) with its runtime (or the one handed in),
        wired to the metrics and warmed: what the repository serves as a version."""
        cfg = self.config
        bundle = bundle or load_bundle(path, verify=not cfg.no_verify)
        runtime = runtime or create_runtime(
            cfg.runtime, bundle.model_path, device=cfg.device, intra_op_threads=cfg.intra_op_threads,
            inter_op_threads=cfg.inter_op_threads, spin=cfg.ort_spin, torchserve_address=cfg.torchserve_address,
            torchserve_model=cfg.torchserve_model, torchserve_token_file=cfg.torchserve_token_file,
            torchserve_timeout_s=cfg.torchserve_timeout_s, bundle_id=bundle.bundle_id)
        model = ServingModel(bundle, runtime, cfg)
        model.contrasts.on_compute = lambda a, b, seconds: self.metrics.stage("contrast", seconds)
        if not cfg.no_warmup:
            t = time.perf_counter()
            model.warmup(min(cfg.max_batch_size, runtime.max_batch_size or cfg.max_batch_size))
            log.info("warmed up %s in %.2f s", path, time.perf_counter() - t)
        return model

    def _load(self, name: str, version: int) -> None:
        with self._lock:
            entry = self._models.get(name, _Model(name)).entries.get(version)
        if entry is None:
            return
        t = time.perf_counter()
        try:
            model = self.serving_model(entry.path, *self._given)
            model.model_info.model, model.model_info.version = name, version
            loaded = ModelVersion(name, version, entry.path, model, self.config, self.metrics)
        except Exception as e:  # a broken version: refused, logged, counted; the older ones keep serving
            log.error("repository: %s version %d (%s) refused: %s", name, version, entry.path, e)
            self.metrics.model_load(name, "failed")
            with self._lock:
                entry.state, entry.reason = FAILED, str(e).splitlines()[0][:500] if str(e) else type(e).__name__
            return
        with self._lock:
            current = self._models.get(name)
            if self._closed or current is None or current.entries.get(version) is not entry:
                retire = [loaded]  # removed while loading
            else:
                entry.loaded, entry.state = loaded, READY
                ready = sorted((v for v, e in current.entries.items() if e.state == READY), reverse=True)
                retire = [current.entries[v].loaded for v in ready[self.config.keep_versions:]]
                for v in ready[self.config.keep_versions:]:
                    current.entries.pop(v)
        self.metrics.model_load(name, "loaded")
        log.info("repository: %s version %d ready (bundle %s) in %.1f s", name, version, loaded.bundle_id,
                 time.perf_counter() - t)
        self.on_change(name)
        for old in retire:
            self._unload_later(old)

    def _retire(self, m: _Model, version: int, reason: str) -> list[str]:
        e = m.entries.pop(version)
        if e.loaded is not None:
            log.info("repository: unloading %s version %d: %s", m.name, version, reason)
            self._unload_later(e.loaded)
            self.on_change(m.name)
            return [f"{m.name}/{version}"]
        return []

    def _unload_later(self, mv: ModelVersion) -> None:
        """Unload off the caller's thread: in-flight requests finish on it first."""
        with mv._lock:
            mv.state = UNLOADING

        def run():
            mv.unload(timeout=self.config.grace_s)
            log.info("repository: %s version %d unloaded", mv.name, mv.version)
        threading.Thread(target=run, name=f"cl-unload-{mv.name}-{mv.version}", daemon=True).start()

    # --- lookups ---
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def default_name(self) -> str | None:
        with self._lock:
            if self.config.default_model:
                return self.config.default_model
            if self.single is not None:
                return self.single[0]
            return next(iter(self._models)) if len(self._models) == 1 else None

    def acquire(self, name: str = "", version: int = 0) -> ModelVersion:
        """The ready version asked for (version 0: the newest), held for one request; release it
        with ``ModelVersion.release``. Raises ModelNotFoundError, InvalidInputError, UnavailableError."""
        with self._lock:
            if not name:
                name = self.default_name()
                if name is None:
                    raise InvalidInputError(f"name a model: this server serves {', '.join(sorted(self._models))}")
            m = self._models.get(name)
            if m is None:
                raise ModelNotFoundError(f"unknown model {name!r}; models: {', '.join(sorted(self._models)) or 'none'}")
            if version < 0:
                raise InvalidInputError(f"version must not be negative (got {version})")
            ready = sorted((v for v, e in m.entries.items() if e.state == READY), reverse=True)
            if version:
                e = m.entries.get(version)
                if e is None:
                    raise ModelNotFoundError(f"model {name!r} has no version {version}; loaded: "
                                             f"{', '.join(map(str, ready)) or 'none'}")
                if e.state != READY:
                    raise UnavailableError(f"model {name!r} version {version} is {e.state.lower()}")
                candidates = [version]
            else:
                if not ready:
                    raise UnavailableError(f"model {name!r} has no version ready yet; retry when its health "
                                           f"says SERVING")
                candidates = ready
            for v in candidates:
                mv = m.entries[v].loaded
                if mv is not None and mv.acquire():
                    return mv
        raise UnavailableError(f"model {name!r} version {version or 'latest'} is being unloaded; retry")

    def is_ready(self, name: str, version: int = 0) -> bool:
        with self._lock:
            m = self._models.get(name)
            if m is None:
                return False
            return any(e.state == READY and (not version or v == version) for v, e in m.entries.items())

    def loaded_versions(self) -> list[ModelVersion]:
        with self._lock:
            return [e.loaded for m in self._models.values() for e in m.entries.values() if e.state == READY]

    def status(self) -> pb.ListModelsResponse:
        resp = pb.ListModelsResponse()
        default = self.default_name()
        with self._lock:
            for name in sorted(self._models):
                m = resp.models.add(name=name, is_default=name == default)
                for v in sorted(self._models[name].entries, reverse=True):
                    e = self._models[name].entries[v]
                    m.versions.add(version=v, state=e.state, bundle_id=e.loaded.bundle_id if e.loaded else "",
                                   reason=e.reason)
        return resp

    def close(self) -> None:
        """Unload everything (waiting for held requests up to the grace period)."""
        with self._lock:
            self._closed = True
            versions = self.loaded_versions()
            self._models.clear()
        self._loads.shutdown(wait=False, cancel_futures=True)
        for mv in versions:
            mv.unload(timeout=self.config.grace_s)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
