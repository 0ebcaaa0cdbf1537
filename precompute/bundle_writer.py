"""Writes a bundle directory atomically: everything goes to a temporary sibling, then one rename.

torch-free, so tests and tools can write small bundles without the precompute extras.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..service.bundle import atomic_write_json, compute_bundle_id, sha256_file, staged_dir
from ..service.manifest import ClassEntry, HeadCard, Manifest, MethodCard, ModelCard, Preprocessing
from .features import SAFETENSORS_DTYPES


_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass
class StreamedTensors:
    """The bundle's tensors when they do not all fit in memory at once: ``specs`` name -> (numpy
    dtype, shape) in file order, and ``items()`` yielding ("tensor", name, array) in that same order
    and ("file", relative path, bytes) for the bundle's other files (prototype and example JPEGs),
    one source (a class) at a time. :func:`write_bundle` writes concepts.safetensors from it in one
    pass, holding one array at a time."""

    specs: dict[str, tuple[np.dtype, tuple[int, ...]]]
    items: Callable[[], Iterator[tuple[str, str, Any]]]


def write_safetensors_streamed(path: Path, tensors: StreamedTensors, files_dir: Path) -> None:
    """concepts.safetensors from ``tensors`` (a header from the specs, then each array's bytes as it
    comes; every array must match its spec, in order), and the files it yields under ``files_dir``."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.specs.items():
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": [int(v) for v in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    names = iter(tensors.specs)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for kind, name, value in tensors.items():
            if kind == "file":
                target = files_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(value)
                continue
            want = next(names, None)
            arr = np.ascontiguousarray(value)
            dtype, shape = tensors.specs.get(name, (None, None))
            if name != want or arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
                raise ValueError(f"streamed tensor {name} {arr.dtype}{tuple(arr.shape)} does not match the next "
                                 f"spec {want} {tensors.specs.get(want)}")
            f.write(arr.tobytes())
        missing = next(names, None)
        if missing is not None:
            raise ValueError(f"streamed tensors ended before {missing}")


def write_bundle(out: str | os.PathLike, *, model_onnx: str | os.PathLike, model: ModelCard,
                 class_names: list[str], preprocessing: Preprocessing,
                 head_weight: np.ndarray | None, head_bias: np.ndarray | None,
                 head_onnx: str | os.PathLike | None,
                 classes: dict[int, ClassEntry], tensors: dict[str, np.ndarray] | StreamedTensors,
                 prototypes: dict[int, list[list[dict]]], prototype_jpegs: dict[str, bytes],
                 method: MethodCard, data: dict | None = None, config_hash: str = "") -> Path:
    """Assemble and atomically publish a bundle at ``out``; returns its path.

    model: the model card (its ``head`` is set here from ``head_weight`` / ``head_onnx``).
    head_weight (K, C), head_bias (K,): a GAP+linear head; else ``head_onnx`` (features -> logits).
    classes: class id -> its manifest entry. tensors: at least basis/<id> (k, C) and weights/<id>
    (k,) for each class, as a dict or streamed (:class:`StreamedTensors`, whose items also carry
    the JPEG files). prototypes: class id -> [concept][rank] -> {"file", "source", "box",
    "score"}; the files are the keys of ``prototype_jpegs`` (relative paths under prototypes/).
    An existing bundle at ``out`` is replaced only once the new one is complete.
    """
    from safetensors.numpy import save_file

    out = Path(out)
    with staged_dir(out) as tmp:
        shutil.copyfile(model_onnx, tmp / "model.onnx")
        if head_weight is not None:
            save_file({"weight": np.ascontiguousarray(head_weight, np.float32),
                       "bias": np.ascontiguousarray(head_bias, np.float32)}, str(tmp / "head.safetensors"))
            head = HeadCard("linear", "head.safetensors")
        else:
            if head_onnx is None:
                raise ValueError("a bundle without a linear head needs head.onnx")
            shutil.copyfile(head_onnx, tmp / "head.onnx")
            head = HeadCard("generic", "head.onnx")
        if isinstance(tensors, StreamedTensors):
            write_safetensors_streamed(tmp / "concepts.safetensors", tensors, tmp)
        else:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "concepts.safetensors"))
        for rel, jpeg in prototype_jpegs.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(jpeg)
        (tmp / "prototypes.json").write_text(json.dumps({str(k): v for k, v in prototypes.items()}))
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = Manifest(
            model=dataclasses.replace(model, head=head, onnx="model.onnx"), preprocessing=preprocessing,
            class_names=list(class_names), method=method, classes=dict(sorted(classes.items())), files=files,
            bundle_id=compute_bundle_id(files),
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            data=dict(data or {}), config_hash=config_hash)
        atomic_write_json(tmp / "manifest.json", manifest.to_dict())
    return out
