"""The extraction parts on disk, read one class at a time: memory bounded by a class, not by the data.

Each part (``features/part-i-of-n.safetensors``, :func:`.features.save_part`) holds, per class, the
kept images' feature maps ``feat/<cls>`` (n, C, H, W) float16, their crop windows' mean activations
``win/<cls>`` (n, G, C) float16 (prototype mining's pool) and their views ``jpeg/<cls>/<j>``; its JSON
header lists keys, predictions and labels (and a shard's spill files, ``features/spill/``: the same
layout, maps written out past the extraction's memory budget). The store reads only the headers at
open; a class's records are read when the class is learned, and the crop pool is streamed in blocks
of whole classes (:meth:`FeatureStore.window_blocks`), all by explicit reads (:class:`PartFile`).

The class's images over all parts and spill files are, past ``max_images``, the bottom-k by
:func:`.features.sample_rank` (as each part's reservoir), sorted by key: the same records as a single
run's, whichever process (shard) reads them.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .features import SAFETENSORS_DTYPES, Record, safetensors_header, sample_rank


class PartFile:
    """A safetensors file read by explicit reads (``os.pread``) of the rows asked for, never mapped:
    what a read returns is the process's memory, and nothing more of the file becomes resident
    (a mapped part's touched pages count in the process's RSS until it is closed)."""

    def __init__(self, path: Path):
        import json

        self.path = Path(path)
        header, self.base = safetensors_header(self.path)
        meta = header.pop("__metadata__", None) or {}
        self.info = json.loads(meta["info"]) if "info" in meta else {}  # what save_part wrote
        self.tensors = header  # name -> {"dtype", "shape", "data_offsets": [begin, end]}

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor ``name``, or its rows ``rows`` (a step-1 slice of the first axis), as a new array."""
        import os

        t = self.tensors[name]
        dtype = SAFETENSORS_DTYPES.get(t["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {t['dtype']}")
        shape = list(t["shape"])
        begin, end = t["data_offsets"]
        if rows is not None and shape:
            lo, hi, _ = rows.indices(shape[0])
            row_bytes = (end - begin) // max(1, shape[0])
            begin, end, shape[0] = begin + lo * row_bytes, begin + max(lo, hi) * row_bytes, max(0, hi - lo)
        out = np.empty(end - begin, np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            view, done = memoryview(out), 0
            while done < len(out):
                got = os.preadv(fd, [view[done:]], self.base + begin + done)
                if got <= 0:
                    raise OSError(f"{self.path}: short read of tensor {name}")
                done += got
        finally:
            os.close(fd)
        return out.view(dtype).reshape(shape)


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
class WindowBlock:
    """Consecutive images of the pool (from ``first``, in pool order), the unit of streaming."""

    first: int  # index into the pool's ``images`` of the block's first image
    vectors: np.ndarray  # (n, G, C) float32 mean activation of each window (not normalised)


class FeatureStore(Mapping):
    """class id -> its records (:class:`.features.Record`), read from the parts on access."""

    def __init__(self, parts: list[Path], max_images: int, seed: int):
        self.parts = [Path(p) for p in parts]
        self.files = [PartFile(p) for p in self.parts]
        self.infos = [f.info for f in self.files]
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
        refs = self.refs[cls]
        loaded: dict[ImageRef, Record] = {}
        for pi in sorted({r.part for r in refs}):
            f = self.files[pi]
            rows = [r for r in refs if r.part == pi]
            lo, hi = min(r.row for r in rows), max(r.row for r in rows) + 1
            feats = f.read(f"feat/{cls}", slice(lo, hi))  # one read of the rows' span
            for r in rows:
                loaded[r] = Record(r.key, feats[r.row - lo], r.predicted, r.label,
                                   f.read(f"jpeg/{cls}/{r.row}").tobytes())
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
        if len(lows) == sum(1 for i in self.infos for c in i["classes"].values() if c["keys"]):
            return min(lows, default=0.0)
        return min((float(r.features.min()) for cls in self for r in self[cls]), default=0.0)  # older parts

    # --- the crop pool, streamed ---
    @cached_property
    def images(self) -> list[ImageRef]:
        """Every kept image, in pool order: classes in order, a class's images in key order (the same
        whichever parts hold them)."""
        return [r for cls in self.refs for r in self.refs[cls]]

    def window_blocks(self, block_images: int) -> Iterator[WindowBlock]:
        """The pool's windows in blocks of whole classes, each at least ``block_images`` images (but
        the last): read into memory and dropped, nothing of a part stays resident. The blocks do
        not depend on how the data was sharded."""
        first, pending, size = 0, [], 0
        for cls, refs in self.refs.items():
            wins = {pi: self.files[pi].read(f"win/{cls}") for pi in {r.part for r in refs}}  # one class's
            pending.append(np.stack([wins[r.part][r.row] for r in refs]).astype(np.float32))
            size += len(refs)
            if size >= block_images:
                yield WindowBlock(first, np.concatenate(pending))
                first, pending, size = first + size, [], 0
        if pending:
            yield WindowBlock(first, np.concatenate(pending))

    def view_jpeg(self, ref: ImageRef) -> bytes:
        return self.files[ref.part].read(f"jpeg/{ref.cls}/{ref.row}").tobytes()

    def view_features(self, ref: ImageRef) -> np.ndarray:
        """One kept image's feature map (C, H, W) float32 (one read of its row)."""
        return self.files[ref.part].read(f"feat/{ref.cls}", slice(ref.row, ref.row + 1))[0].astype(np.float32)
