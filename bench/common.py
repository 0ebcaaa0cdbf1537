"""Shared by the benchmarks: real EfficientNet-Lite0 activations over CIFAR-10 images (cached)."""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from conceptlens.precompute.datasets import open_dataset, shared_data_dir

DATA = shared_data_dir()
CACHE = Path(os.environ.get("CONCEPTLENS_BENCH_CACHE", Path(tempfile.gettempdir()) / "conceptlens-bench"))


def cifar_jpegs(n: int, shard: str = "train-000.tar.gz") -> list[bytes]:
    """The first ``n`` CIFAR-10 JPEGs of a shard in ../shared/data/cifar10."""
    return [s.data for s in itertools.islice(open_dataset(DATA / "cifar10" / shard), n)]


def lite0_onnx() -> Path:
    """EfficientNet-Lite0 exported to ONNX (features, logits), cached."""
    path = CACHE / "efficientnet-lite0.onnx"
    if not path.is_file():
        from conceptlens.precompute.models import load_model

        CACHE.mkdir(parents=True, exist_ok=True)
        load_model("efficientnet-lite0").export_onnx(path)
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


def rss_mib(pid: int | str = "self") -> float:
    """A process's resident memory (VmRSS from /proc), MiB; OSError once it is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def publish_version(repo_model: Path, bundle: Path, version: int) -> None:
    """Copy ``bundle`` into a model repository as version ``version``, atomically (copy beside, then rename)."""
    tmp = repo_model / f".{version}.incoming"
    shutil.copytree(bundle, tmp)
    os.replace(tmp, repo_model / str(version))


def parse_torch_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``ap`` with the torch benchmarks' --threads and --device added; applies --threads."""
    import torch

    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def subset_shard(n: int) -> Path:
    """The first ``n`` samples of CIFAR-10's first training shard as a tar (cached), with classes.txt."""
    import tarfile

    dest = CACHE / f"cifar-train-{n}.tar"
    if dest.is_file():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "classes.txt").write_bytes((DATA / "cifar10" / "classes.txt").read_bytes())
    tmp = dest.with_suffix(".tmp")
    with tarfile.open(DATA / "cifar10" / "train-000.tar.gz") as tin, tarfile.open(tmp, "w") as tout:
        index: dict[str, int] = {}
        for m in tin:
            if index.setdefault(m.name.split(".", 1)[0], len(index)) >= n:
                break
            tout.addfile(m, tin.extractfile(m))
    tmp.rename(dest)
    return dest
