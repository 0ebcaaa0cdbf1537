"""Image sources for precompute: an ImageFolder tree, WebDataset-style tar shards, or a flat folder.

Each yields ``Sample(key, data, label)`` with the raw encoded bytes; decoding happens in the
extractor so that one unreadable image is skipped and counted, never fatal. ``index`` is the
sample's position in the whole data set, which is what ``--shard i/n`` splits on.
"""
from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
TAR_EXTS = (".tar", ".tar.gz", ".tgz")


class DataError(ValueError):
    """A data path that does not exist or holds no usable images."""


def shared_data_dir() -> Path:
    """Where the tests and benchmarks find real data: ``CONCEPTLENS_DATA``, else ``shared/data``
    beside the checkout (``/work/shared/data`` for a clone elsewhere)."""
    if os.environ.get("CONCEPTLENS_DATA"):
        return Path(os.environ["CONCEPTLENS_DATA"])
    beside = Path(__file__).resolve().parents[2] / "shared" / "data"
    return beside if beside.is_dir() or not Path("/work/shared/data").is_dir() else Path("/work/shared/data")


@dataclass
class Sample:
    index: int
    key: str
    data: bytes
    label: int | None


@dataclass
class Dataset:
    """A data source; ``label_names`` maps label ints to names (None when unlabeled)."""

    path: Path
    kind: str  # "imagefolder" | "shards" | "flat"
    label_names: list[str] | None

    def __iter__(self) -> Iterator[Sample]:
        return {"imagefolder": self._iter_imagefolder, "shards": self._iter_shards,
                "flat": self._iter_flat}[self.kind]()

    def _iter_imagefolder(self) -> Iterator[Sample]:
        i = 0
        for label, name in enumerate(self.label_names or []):
            for f in sorted((self.path / name).iterdir()):
                if f.suffix.lower() in IMAGE_EXTS:
                    yield Sample(i, f"{name}/{f.name}", _read(f), label)
                    i += 1

    def _iter_flat(self) -> Iterator[Sample]:
        for i, f in enumerate(sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_EXTS)):
            yield Sample(i, f.name, _read(f), None)

    def _iter_shards(self) -> Iterator[Sample]:
        i = 0
        for shard in shard_files(self.path):
            for key, data, label in _iter_tar(shard):
                yield Sample(i, f"{shard.name}:{key}", data, label)
                i += 1


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        log.warning("cannot read %s: %s", path, e)
        return b""


def shard_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.name.endswith(TAR_EXTS) and p.is_file())


def _iter_tar(shard: Path) -> Iterator[tuple[str, bytes, int | None]]:
    """(key, image bytes, label) per sample of a tar shard; members of a sample are adjacent."""
    pending: dict[str, dict[str, bytes]] = {}

    def flush(key: str):
        parts = pending.pop(key)
        img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if img is None:
            log.warning("%s: sample %s has no image", shard.name, key)
            return None
        label = None
        if ".cls" in parts:
            try:
                label = int(parts[".cls"].decode().strip())
            except ValueError:
                log.warning("%s: sample %s has an unreadable label", shard.name, key)
        return key, img, label

    samples = 0
    try:
        with tarfile.open(shard, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                dot = name.find(".", name.rfind("/") + 1)
                key, ext = (name[:dot], name[dot:].lower()) if dot > 0 else (name, "")
                if pending and key not in pending:
                    for k in list(pending):
                        out = flush(k)
                        if out:
                            samples += 1
                            yield out
                f = tar.extractfile(member)
                pending.setdefault(key, {})[ext] = f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("%s is damaged after %d samples: %s", shard, samples, e)
    for k in list(pending):
        out = flush(k)
        if out:
            yield out


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Detect the layout of ``path``; raises DataError with a clear message."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_file():
        if not path.name.endswith(TAR_EXTS):
            raise DataError(f"{path} is a file but not a .tar/.tar.gz shard")
        return Dataset(path, "shards", _label_names_file(path.parent))
    if shard_files(path):
        return Dataset(path, "shards", _label_names_file(path))
    subdirs = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs and any(f.suffix.lower() in IMAGE_EXTS for d in subdirs for f in (path / d).iterdir()):
        return Dataset(path, "imagefolder", subdirs)
    if any(f.suffix.lower() in IMAGE_EXTS for f in path.iterdir()):
        return Dataset(path, "flat", None)
    raise DataError(f"{path} holds no images: expected an ImageFolder tree (CLASS/*.jpg), "
                    f"tar shards (*.tar, *.tar.gz with KEY.jpg + KEY.cls) or a folder of images")


def _label_names_file(folder: Path) -> list[str] | None:
    f = folder / "classes.txt"
    if f.is_file():
        return [line.strip() for line in f.read_text().splitlines() if line.strip()]
    return None
