"""The extraction parts on disk, read one class at a time: memory bounded by a class, not by the data.

Each part (``features/part-i-of-n.safetensors``, :func:`.features.save_part`) holds, per class, the
kept images' feature maps ``feat/<cls>`` (n, C, H, W) float16, their crop windows' mean activations
``win/<cls>`` (n, G, C) float16 (prototype mining's pool) and their views ``jpeg/<cls>/<j>``; its JSON
header lists keys, predictions and labels. The store reads only the headers at open; a class's
records are read when the class is learned, and the crop pool is streamed part by part.

The class's images over all parts are, past ``max_images``, the bottom-k by
:func:`.features.sample_rank` (as each part's reservoir), sorted by key: the same records as a single
run's, whichever process (shard) reads them.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .features import Record, safetensors_info, sample_rank


@dataclass(frozen=True)
class ImageRef:
    """Where one kept image lives: part, class, row in the class's tensors; and what we know of it."""

    part: int
    cls: int
    row: int
    key: str
    predicted: int
    label: int | None


@dataclass
class WindowChunk:
    """One part's windows for one class, the pool's unit of streaming."""

    vectors: np.ndarray  # (n, G, C) float32 mean activation of each window (not normalised)
    images: list[ImageRef]  # (n,)


class FeatureStore(Mapping):
    """class id -> its records (:class:`.features.Record`), read from the parts on access."""

    def __init__(self, parts: list[Path], max_images: int, seed: int):
        self.parts = [Path(p) for p in parts]
        self.infos = [safetensors_info(p) for p in self.parts]
        refs: dict[int, list[ImageRef]] = {}
        self.seen: dict[int, int] = {}
        for pi, info in enumerate(self.infos):
            for key, c in info["classes"].items():
                cls = int(key)
                self.seen[cls] = self.seen.get(cls, 0) + c["seen"]
                refs.setdefault(cls, []).extend(
                    ImageRef(pi, cls, j, k, int(p), lab) for j, (k, p, lab) in
                    enumerate(zip(c["keys"], c["predicted"], c["labels"])))
        self.refs: dict[int, list[ImageRef]] = {}
        for cls, rs in sorted(refs.items()):
            if len(rs) > max_images:  # the same bottom-k as extraction's reservoirs: a single run's images
                rs = sorted(rs, key=lambda r: (sample_rank(r.key, seed), r.key))[:max_images]
            self.refs[cls] = sorted(rs, key=lambda r: r.key)

    # --- Mapping: class -> records, read on access ---
    def __getitem__(self, cls: int) -> list[Record]:
        from safetensors import safe_open

        refs = self.refs[cls]
        loaded: dict[ImageRef, Record] = {}
        for pi in sorted({r.part for r in refs}):  # each part opened once
            with safe_open(str(self.parts[pi]), framework="numpy") as f:
                feats = f.get_slice(f"feat/{cls}")
                for r in (r for r in refs if r.part == pi):
                    loaded[r] = Record(r.key, feats[r.row:r.row + 1][0], r.predicted, r.label,
                                       f.get_tensor(f"jpeg/{cls}/{r.row}").tobytes())
        return [loaded[r] for r in refs]  # in key order

    def __iter__(self) -> Iterator[int]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def count(self, cls: int) -> int:
        return len(self.refs.get(cls, ()))

    @property
    def totals(self) -> dict:
        return {"processed": sum(i["processed"] for i in self.infos), "skipped": sum(i["skipped"] for i in self.infos),
                "skipped_keys": [k for i in self.infos for k in i["skipped_keys"]], "seen": dict(self.seen)}

    def min_activation(self) -> float:
        """The smallest activation over the kept images (a signed layer has negative ones)."""
        lows = []
        for info in self.infos:
            for c in info["classes"].values():
                if "min" in c:
                    lows.append(float(c["min"]))
        if len(lows) == sum(len(i["classes"]) for i in self.infos):
            return min(lows, default=0.0)
        return min((float(r.features.min()) for cls in self for r in self[cls]), default=0.0)  # older parts

    # --- the crop pool, streamed ---
    def window_chunks(self) -> Iterator[WindowChunk]:
        """Every kept image's windows, one (part, class) block at a time (never the whole pool)."""
        from safetensors import safe_open

        for pi, info in enumerate(self.infos):
            with safe_open(str(self.parts[pi]), framework="numpy") as f:
                for key in info["classes"]:
                    cls = int(key)
                    rows = [r for r in self.refs.get(cls, ()) if r.part == pi]
                    if not rows:
                        continue
                    win = f.get_tensor(f"win/{cls}")
                    idx = np.array([r.row for r in rows])
                    yield WindowChunk(win[idx].astype(np.float32), rows)

    def view_jpeg(self, ref: ImageRef) -> bytes:
        from safetensors import safe_open

        with safe_open(str(self.parts[ref.part]), framework="numpy") as f:
            return f.get_tensor(f"jpeg/{ref.cls}/{ref.row}").tobytes()
