"""Feature extraction: images -> per-class bounded reservoirs of feature maps.

Memory is bounded by ``max_per_class`` images per class (bottom-k sampling by a seeded hash of the key),
whatever the size of the data. Each kept image carries its feature map (float16), the model's
predicted class, its label and the 224x224 view the model saw (JPEG bytes, for prototype crops).
"""
from __future__ import annotations

import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from ..service.bundle import Preprocessing
from ..service.preprocess import ImageError, preprocess_bytes
from .datasets import Dataset, Sample

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One kept image."""

    key: str
    features: np.ndarray  # (C, H, W) float16
    predicted: int
    label: int | None
    view_jpeg: bytes  # the crop x crop RGB view the model saw, JPEG


def sample_rank(key: str, seed: int) -> int:
    """A sample's place in the seeded random order of the data: a hash of (seed, key)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest(), "big")


@dataclass
class Reservoir:
    """The ``capacity`` offered records of smallest :func:`sample_rank` (bottom-k sampling: a uniform
    random sample of the ``seen`` offered ones). The choice depends on the keys only, not on the
    order or on how the data is sharded: the union of the shards' reservoirs holds the one-process
    reservoir, which :class:`.feature_store.FeatureStore` takes back out, so a sharded run learns
    from exactly the images a single run does."""

    capacity: int
    seed: int = 0
    seen: int = 0
    heap: list = field(default_factory=list)  # (-rank, key, record): the largest kept rank on top

    seen_spilled: int = 0  # of ``seen``, the offers counted in spill files already

    def offer(self, rec: Record) -> int:
        """Offer one record; returns the change in records held in memory (1 or 0)."""
        import heapq

        self.seen += 1
        item = (-sample_rank(rec.key, self.seed), rec.key, rec)
        if len(self.heap) < self.capacity:
            heapq.heappush(self.heap, item)
            return 1
        if item[:2] > self.heap[0][:2]:
            out = heapq.heapreplace(self.heap, item)
            return 0 if out[2] is not None else 1
        return 0

    @property
    def items(self) -> list[Record]:
        """The kept records still in memory (not spilled), in key order."""
        return [rec for _, _, rec in sorted(self.heap, key=lambda t: t[1]) if rec is not None]

    def spill(self) -> "Reservoir":
        """A copy holding the in-memory records and the offers since the last spill (what a spill file
        stores); here only their ranks stay, to keep choosing the bottom-k (records chosen now and
        evicted later stay on disk, and :class:`.feature_store.FeatureStore` takes the bottom-k back)."""
        out = Reservoir(self.capacity, self.seed, seen=self.seen - self.seen_spilled,
                        heap=[t for t in self.heap if t[2] is not None])
        self.heap = [(r, k, None) for r, k, _ in self.heap]  # same order: a heap still
        self.seen_spilled = self.seen
        return out


@dataclass
class ExtractResult:
    reservoirs: dict[int, Reservoir]
    processed: int = 0
    skipped: int = 0
    skipped_keys: list[str] = field(default_factory=list)
    in_memory: int = 0  # records held in memory (not spilled)

    def spill(self) -> "ExtractResult":
        """The in-memory records of every class as a result of their own (a spill file's content),
        dropped here (:meth:`Reservoir.spill`); totals stay here for the final part."""
        out = ExtractResult({c: r.spill() for c, r in self.reservoirs.items()})
        out.reservoirs = {c: r for c, r in out.reservoirs.items() if r.heap or r.seen}
        self.in_memory = 0
        return out


class Progress:
    """Logs a line every ``every`` seconds: done, rate, and whatever ``extra`` says."""

    def __init__(self, what: str, total: int | None = None, every: float = 5.0):
        self.what, self.total, self.every = what, total, every
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int = 1, extra: str = "", force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            of = f"/{self.total}" if self.total else ""
            log.info("%s: %d%s (%.1f/s)%s", self.what, self.done, of, rate, f", {extra}" if extra else "")


def _encode_view(view: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(view).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _decode(sample: Sample, pre: Preprocessing):
    try:
        x, view = preprocess_bytes(sample.data, pre)
        return sample, x, _encode_view(view), None
    except ImageError as e:
        return sample, None, None, str(e)


def _bounded_map(pool: ThreadPoolExecutor, fn, items: Iterator, ahead: int) -> Iterator:
    """Like pool.map, in order, but with at most ``ahead`` items in flight (Executor.map submits all)."""
    from collections import deque

    window: deque = deque()
    for item in items:
        window.append(pool.submit(fn, item))
        if len(window) >= ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def _batches(it: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # (N,3,S,S) -> features, logits


def extract(dataset: Dataset, forward: Forward, preprocessing: Preprocessing, *,
            group_of: Callable[[int | None, int], int | None], shard: tuple[int, int] = (0, 1),
            batch_size: int = 32, max_per_class: int = 200, seed: int = 0, workers: int = 2,
            spill: Callable[[ExtractResult], None] | None = None, spill_records: int = 0) -> ExtractResult:
    """Run the model over the shard's samples (index % n == i) and keep per-class reservoirs.

    Memory: where ``spill`` is given, whenever ``spill_records`` records are held it is called with
    :meth:`ExtractResult.spill`'s result (to write to disk), so a shard holds at most that many
    maps whatever the data's size.

    ``forward`` is the exported model (the same ONNX the service runs, so precompute sees exactly
    the features the service will). ``group_of(label, predicted)`` gives the class an image
    belongs to (None: drop it). An image that cannot be decoded is skipped, logged and counted.
    """
    i, n = shard
    result = ExtractResult(reservoirs={})
    progress = Progress("extract images")
    samples = (s for s in dataset if s.index % n == i)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = _bounded_map(pool, lambda s: _decode(s, preprocessing), samples, ahead=2 * batch_size)
        for batch in _batches(decoded, batch_size):
            ok = []
            for sample, x, jpeg, err in batch:
                if err is None:
                    ok.append((sample, x, jpeg))
                else:
                    result.skipped += 1
                    if len(result.skipped_keys) < 100:
                        result.skipped_keys.append(sample.key)
                    log.warning("skipping %s: %s", sample.key, err)
            if not ok:
                continue
            feats, logits = forward(np.stack([x for _, x, _ in ok]))
            preds = logits.argmax(axis=1)
            feats16 = feats.astype(np.float16)
            for (sample, _, jpeg), f, p in zip(ok, feats16, preds):
                cls = group_of(sample.label, int(p))
                if cls is None:
                    continue
                res = result.reservoirs.setdefault(cls, Reservoir(max_per_class, seed))
                result.in_memory += res.offer(Record(sample.key, f, int(p), sample.label, jpeg))
            result.processed += len(ok)
            if spill is not None and spill_records and result.in_memory >= spill_records:
                spill(result.spill())
            progress.update(len(ok), extra=f"{result.skipped} skipped, {len(result.reservoirs)} classes")
    progress.update(0, extra=f"{result.skipped} skipped, {len(result.reservoirs)} classes", force=True)
    return result


def save_part(path: Path, result: ExtractResult, config_hash: str, cells: int = 2, spills: list[str] = ()) -> None:
    """Write one extraction part as a single safetensors file (atomic): per class the feature maps
    ``feat/<cls>``, the crop windows' mean activations ``win/<cls>`` (prototype mining's pool, see
    :mod:`.windows`) and the views ``jpeg/<cls>/<j>``; read per class by :mod:`.feature_store`."""
    from safetensors.numpy import save

    from ..service.bundle import atomic_write_bytes
    from .windows import window_means

    tensors: dict[str, np.ndarray] = {}
    info: dict = {"config_hash": config_hash, "processed": result.processed, "skipped": result.skipped,
                  "skipped_keys": result.skipped_keys, "classes": {}, "spills": list(spills)}
    for cls, res in result.reservoirs.items():
        if not res.items:  # all spilled: only the count of offers since
            info["classes"][str(cls)] = {"seen": res.seen - res.seen_spilled, "keys": [], "predicted": [], "labels": []}
            continue
        feats = np.stack([r.features for r in res.items])
        tensors[f"feat/{cls}"] = feats
        tensors[f"win/{cls}"] = np.concatenate([window_means(feats[i:i + 256], cells)
                                                for i in range(0, len(feats), 256)]).astype(np.float16)
        for j, r in enumerate(res.items):
            tensors[f"jpeg/{cls}/{j}"] = np.frombuffer(r.view_jpeg, dtype=np.uint8)
        info["classes"][str(cls)] = {"seen": res.seen - res.seen_spilled, "min": float(feats.min()), "keys": [r.key for r in res.items],
                                     "predicted": [r.predicted for r in res.items],
                                     "labels": [r.label for r in res.items]}
    atomic_write_bytes(path, save(tensors, metadata={"info": json.dumps(info)}))


# safetensors' dtype names of the arrays we store, as numpy dtypes
SAFETENSORS_DTYPES = {"F16": np.dtype(np.float16), "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
                      "U8": np.dtype(np.uint8), "I32": np.dtype(np.int32), "I64": np.dtype(np.int64)}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(the JSON header, the offset where the tensors' data starts) of a safetensors file, reading
    the header only (the format: an 8-byte little-endian header length, then the JSON header)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def safetensors_info(source: bytes | Path) -> dict:
    """The JSON ``info`` kept in the metadata of a safetensors file: from its bytes, read already,
    or from its path, reading the header only (:func:`safetensors_header`)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        n = int.from_bytes(source[:8], "little")
        header = json.loads(bytes(source[8:8 + n]))
    else:
        header, _ = safetensors_header(source)
    return json.loads((header.get("__metadata__") or {})["info"])
