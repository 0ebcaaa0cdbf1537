"""Explainer bundle: the directory that precompute writes and the service loads.

Layout (DESIGN.md, "Conventions")::

    BUNDLE/
      manifest.json          schema version, model, preprocessing, classes, method, metrics,
                             flags, and a sha256 per file below
      model.onnx             the CNN with two outputs: features (N,C,H,W) and logits (N,K)
      head.safetensors       W (K,C), b (K,) for a GAP+linear head
      head.onnx              the head h: features -> logits, for any other head
      concepts.safetensors   per class y: basis/y (k,C), weights/y (k,), decoding/y (k,C) for direction
                             pairs (--method directions), plus contrast tensors
      prototypes.json        per class, per concept: the top crops (file, source, box, score)
      prototypes/*.jpg       the crops

No pickle anywhere: JSON, safetensors, ONNX and JPEG only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import SCHEMA_VERSION, Manifest, ManifestError, Preprocessing  # noqa: F401 (re-exported)

MANIFEST = "manifest.json"


class BundleError(Exception):
    """A bundle that is missing, incomplete, corrupted or of another schema."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike):
    """A temporary sibling of ``out`` to write a whole directory into: published as ``out``
    (:func:`publish_dir`) when the block ends, removed when it raises."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where
    the system or the file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out`` (readable by all, like any published
    directory). An existing ``out`` is swapped with ``tmp`` in one atomic step where the system
    can (Linux), so ``out`` always exists and readers see the old directory or the new one; else it
    is moved aside first (``out`` is then missing for an instant) and removed after."""
    os.chmod(tmp, 0o755)  # mkdtemp made it 0700
    if out.exists() and out.is_dir() and _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if old.exists():  # left by a crashed earlier run of this pid
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class PrototypeRef:
    """One prototype crop of a concept: the JPEG in the bundle and where it came from."""

    file: str  # path relative to the bundle
    source: str  # dataset key of the source image
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the model's input pixels (crop×crop)
    score: float  # cosine similarity of the crop's mean activation to the concept


@dataclass
class ClassConcepts:
    """What precompute learned for one class."""

    class_id: int
    name: str
    basis: np.ndarray  # (k, C) float32: rows >= 0, or signed (semi-NMF; the encoding directions of direction
    # pairs); the codes are >= 0 either way
    weights: np.ndarray  # (k,) float32, d logit_y / d presence_j
    metrics: dict = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    prototypes: list[list[PrototypeRef]] = field(default_factory=list)  # [concept][rank]
    method: str = "nmf"
    # (k, C) float32 decoding directions (filters) of direction pairs: the codes are then the latent
    # factors max(V D^T, 0) and ``basis`` holds the encoding directions (service/projection.py)
    decoding: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.basis.shape[0])


@dataclass
class Bundle:
    """A loaded, verified bundle."""

    root: Path
    manifest: Manifest
    classes: dict[int, ClassConcepts]
    class_names: list[str]
    head_weight: np.ndarray | None  # (K, C) for a linear head, else None
    head_bias: np.ndarray | None  # (K,)
    preprocessing: Preprocessing
    tensors: dict[str, np.ndarray]  # every tensor of concepts.safetensors, by name

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model.onnx

    @property
    def head_path(self) -> Path:
        return self.root / self.manifest.model.head.file

    @property
    def head_kind(self) -> str:
        return self.manifest.model.head.kind

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return self.manifest.model.feature_shape

    def class_id(self, key: int | str) -> int:
        """See :func:`class_index`."""
        return class_index(self.class_names, key)


def class_index(class_names: list[str], key: int | str) -> int:
    """Resolve a class id or name (exact, case-insensitive) to the model's class index.

    Raises KeyError with a clear message if no such class exists in the model.
    """
    if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.strip().isdigit()):
        idx = int(key)
        if 0 <= idx < len(class_names):
            return idx
        raise KeyError(f"class id {idx} is out of range (the model has {len(class_names)} classes)")
    want = str(key).strip().lower()
    for i, name in enumerate(class_names):
        if name.lower() == want:
            return i
    raise KeyError(f"unknown class {key!r}")


def compute_bundle_id(files: dict[str, str]) -> str:
    """Bundle id: sha256 over the sorted (name, checksum) list, first 16 hex digits."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return h.hexdigest()[:16]


def load_manifest(root: Path) -> Manifest:
    """The typed manifest of the bundle at ``root``; BundleError naming the file when it is
    missing, not JSON, of another schema version or malformed."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle directory {root} does not exist")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {root} is not a bundle (or precompute did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from e
    try:
        return Manifest.from_dict(manifest)
    except ManifestError as e:
        raise BundleError(f"{path}: {e}") from None


SAFE_SUFFIXES = (".json", ".safetensors", ".onnx", ".jpg", ".jpeg", ".png")


def refuse_unsafe_files(root: Path, manifest: Manifest) -> None:
    """Refuse a bundle that lists a file of a format that can run code when loaded (a pickle, a
    torch zip archive, or anything but JSON, safetensors, ONNX and images): nothing is unpickled,
    ever, and a bundle that carries a pickle is a bundle someone tampered with."""
    for name in sorted(manifest.files):
        path = Path(root) / name
        if not name.lower().endswith(SAFE_SUFFIXES):
            raise BundleError(f"bundle {root}: {name} is not a JSON, safetensors, ONNX or image file: refused")
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            continue  # a missing file is verify_files' error
        if (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(b"PK\x03\x04"):
            raise BundleError(f"bundle {root}: {name} holds a pickle or a torch archive: refused "
                              f"(conceptlens never unpickles)")


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check every file listed in the manifest against its sha256; raise BundleError naming the bad ones."""
    root = Path(root)
    bad = []
    for name, digest in sorted(manifest.files.items()):
        path = root / name
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif sha256_file(path) != digest:
            bad.append(f"{name} (checksum mismatch)")
    if bad:
        raise BundleError(f"bundle {root} does not match its manifest: " + ", ".join(bad))
    if compute_bundle_id(manifest.files) != manifest.bundle_id:
        raise BundleError(f"bundle {root}: bundle_id does not match the file checksums in manifest.json")


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise BundleError(f"{path} is not a readable safetensors file: {e}") from e


def load_bundle(root: str | os.PathLike, verify: bool = True) -> Bundle:
    """Load a bundle directory; with ``verify`` every file's checksum is checked first.

    Raises BundleError with the offending file named if anything is missing or altered, and for a
    manifest or tensors of the wrong shape.
    """
    root = Path(root)
    manifest = load_manifest(root)
    refuse_unsafe_files(root, manifest)
    if verify:
        verify_files(root, manifest)
    try:
        return _read_bundle(root, manifest)
    except BundleError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, OSError) as e:
        raise BundleError(f"bundle {root} is incomplete or malformed: {type(e).__name__}: {e}") from e


def _read_bundle(root: Path, manifest: Manifest) -> Bundle:
    tensors = _load_safetensors(root / "concepts.safetensors")
    head_w = head_b = None
    head = manifest.model.head
    if head.kind == "linear":
        ht = _load_safetensors(root / head.file)
        head_w, head_b = ht["weight"].astype(np.float32), ht["bias"].astype(np.float32)
        k, c = manifest.model.num_classes, manifest.model.feature_shape[0]
        if head_w.shape != (k, c) or head_b.shape != (k,):
            raise BundleError(f"{root / head.file}: weight {head_w.shape} and bias {head_b.shape} do not fit "
                              f"{k} classes of {c} channels")
    protos = {}
    if (root / "prototypes.json").is_file():
        protos = json.loads((root / "prototypes.json").read_text())
        if not isinstance(protos, dict):
            raise BundleError(f"{root / 'prototypes.json'} must be a JSON object of classes, not {type(protos).__name__}")
    classes = {}
    for cid, info in manifest.classes.items():
        refs = [[PrototypeRef(p["file"], p["source"], tuple(p["box"]), float(p["score"])) for p in concept]
                for concept in protos.get(str(cid), [])]
        for ref in (r for concept in refs for r in concept):
            if not (root / ref.file).resolve().is_relative_to(root.resolve()):
                raise BundleError(f"bundle {root}: prototype {ref.file!r} lies outside the bundle")
        classes[cid] = ClassConcepts(
            class_id=cid, name=info.name,
            basis=np.ascontiguousarray(tensors[f"basis/{cid}"], dtype=np.float32),
            weights=np.ascontiguousarray(tensors[f"weights/{cid}"], dtype=np.float32),
            metrics=info.metrics, flags=list(info.flags), prototypes=refs, method=info.method)
        if classes[cid].basis.shape[1] != manifest.model.feature_shape[0]:
            raise BundleError(f"bundle {root}: basis of class {cid} has {classes[cid].basis.shape[1]} channels, "
                              f"the layer {manifest.model.feature_shape[0]}")
        decoding = tensors.get(f"decoding/{cid}")
        if decoding is not None:
            if decoding.shape != classes[cid].basis.shape:
                raise BundleError(f"bundle {root}: decoding directions of class {cid} have shape {decoding.shape}, "
                                  f"its basis {classes[cid].basis.shape}")
            classes[cid].decoding = np.ascontiguousarray(decoding, dtype=np.float32)
    return Bundle(root=root, manifest=manifest, classes=classes, class_names=list(manifest.class_names),
                  head_weight=head_w, head_bias=head_b, preprocessing=manifest.preprocessing, tensors=tensors)
