"""Writes a bundle directory atomically: everything goes to a temporary sibling, then one rename.

torch-free, so tests and tools can write small bundles without the precompute extras.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..service.bundle import (SCHEMA_VERSION, Preprocessing, atomic_write_json, compute_bundle_id, staged_dir,
                              sha256_file)


def write_bundle(out: str | os.PathLike, *, model_onnx: str | os.PathLike, model_info: dict,
                 class_names: list[str], preprocessing: Preprocessing,
                 head_weight: np.ndarray | None, head_bias: np.ndarray | None,
                 head_onnx: str | os.PathLike | None,
                 classes: dict[int, dict], tensors: dict[str, np.ndarray],
                 prototypes: dict[int, list[list[dict]]], prototype_jpegs: dict[str, bytes],
                 method: dict, extra: dict | None = None) -> Path:
    """Assemble and atomically publish a bundle at ``out``; returns its path.

    model_info: name, sha256, layer, feature_shape [C, H, W], num_classes (and anything else useful).
    classes: class id -> {"name", "k", "metrics", "flags", "method", ...} for the manifest.
    tensors: at least basis/<id> (k, C) and weights/<id> (k,) for each class.
    prototypes: class id -> [concept][rank] -> {"file", "source", "box", "score"}; the files are
    the keys of ``prototype_jpegs`` (relative paths under prototypes/).
    An existing bundle at ``out`` is replaced only once the new one is complete.
    """
    from safetensors.numpy import save_file

    out = Path(out)
    with staged_dir(out) as tmp:
        shutil.copyfile(model_onnx, tmp / "model.onnx")
        head: dict = {"kind": "linear" if head_weight is not None else "generic"}
        if head_weight is not None:
            save_file({"weight": np.ascontiguousarray(head_weight, np.float32),
                       "bias": np.ascontiguousarray(head_bias, np.float32)}, str(tmp / "head.safetensors"))
            head["file"] = "head.safetensors"
        else:
            if head_onnx is None:
                raise ValueError("a bundle without a linear head needs head.onnx")
            shutil.copyfile(head_onnx, tmp / "head.onnx")
            head["file"] = "head.onnx"
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "concepts.safetensors"))
        for rel, data in prototype_jpegs.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        (tmp / "prototypes.json").write_text(json.dumps({str(k): v for k, v in prototypes.items()}))
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "bundle_id": compute_bundle_id(files),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {**model_info, "onnx": "model.onnx", "head": head,
                      "outputs": ["features", "logits"], "input": "image"},
            "preprocessing": preprocessing.to_dict(),
            "class_names": list(class_names),
            "method": method,
            "classes": {str(k): v for k, v in sorted(classes.items())},
            "files": files,
            **(extra or {}),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return out


