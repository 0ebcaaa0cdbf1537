"""Shared by the benchmarks: real EfficientNet-Lite0 activations over CIFAR-10 images (cached)."""
from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np

def _find_data() -> Path:
    """../shared/data beside the checkout (or CONCEPTLENS_DATA); /work/shared/data for clones elsewhere."""
    if os.environ.get("CONCEPTLENS_DATA"):
        return Path(os.environ["CONCEPTLENS_DATA"])
    for cand in (Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")):
        if cand.is_dir():
            return cand
    return Path(__file__).resolve().parents[2] / "shared" / "data"


DATA = _find_data()
CACHE = Path(os.environ.get("CONCEPTLENS_BENCH_CACHE", Path(tempfile.gettempdir()) / "conceptlens-bench"))


def cifar_jpegs(n: int, shard: str = "train-000.tar.gz") -> list[bytes]:
    """The first ``n`` CIFAR-10 JPEGs of a shard in ../shared/data/cifar10."""
    out = []
    with tarfile.open(DATA / "cifar10" / shard) as tar:
        for m in tar:
            if m.name.endswith(".jpg"):
                out.append(tar.extractfile(m).read())
                if len(out) == n:
                    break
    return out


def lite0_onnx() -> Path:
    """EfficientNet-Lite0 exported to ONNX (features, logits), cached."""
    path = CACHE / "efficientnet-lite0.onnx"
    if not path.is_file():
        from conceptlens.precompute.models import export_onnx, load_model

        CACHE.mkdir(parents=True, exist_ok=True)
        export_onnx(load_model("efficientnet-lite0"), path)
    return path


def lite0_activations(n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(features (N,1280,7,7) float32, logits (N,1000)) of the first CIFAR-10 training images, cached."""
    path = CACHE / f"lite0-cifar-{n_images}.npz"
    if path.is_file():
        z = np.load(path)
        return z["features"], z["logits"]
    from conceptlens.service.bundle import Preprocessing
    from conceptlens.service.preprocess import preprocess_bytes
    from conceptlens.service.runtime import OnnxRuntime

    pre = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3)
    x = np.stack([preprocess_bytes(b, pre)[0] for b in cifar_jpegs(n_images)])
    runtime = OnnxRuntime(lite0_onnx(), device="cpu")
    feats, logits = [], []
    for i in range(0, len(x), 32):
        f, l = runtime.run(x[i:i + 32])
        feats.append(f)
        logits.append(l)
    feats, logits = np.concatenate(feats), np.concatenate(logits)
    np.savez(path, features=feats, logits=logits)
    return feats, logits
