"""Shared fixtures: real data from ../shared/data and a real bundle built once per session."""
from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import pytest

from conceptlens.precompute.datasets import open_dataset, shared_data_dir

# the service fixtures (tiny_bundle, redis_server), registered once so session-scoped ones are built once
pytest_plugins = ["service_conftest"]

DATA = shared_data_dir()
CIFAR = DATA / "cifar10"
IMAGENET = DATA / "imagenet-samples"


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one intra-op thread for a module of small batched problems (a second thread costs
    more than it saves on them)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def require_data() -> None:
    if not CIFAR.is_dir():
        pytest.skip(f"real data not found at {DATA} (set CONCEPTLENS_DATA)")


def write_subset_shard(dest: Path, n: int, src: str = "train-000.tar.gz", start: int = 0,
                       extra: dict[str, bytes] | None = None) -> Path:
    """A tar shard with samples [start, start+n) of a CIFAR-10 shard, plus ``extra`` members."""
    with tarfile.open(CIFAR / src) as tin, tarfile.open(dest, "w") as tout:
        index: dict[str, int] = {}
        for m in tin:
            i = index.setdefault(m.name.split(".", 1)[0], len(index))
            if i >= start + n:
                break
            if i >= start:
                tout.addfile(m, tin.extractfile(m))
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dest


def cifar_test_jpegs(n: int) -> list[bytes]:
    """The first ``n`` JPEGs of the CIFAR-10 test shard (never seen by the test bundles)."""
    require_data()
    return [s.data for s in itertools.islice(open_dataset(CIFAR / "test-000.tar.gz"), n)]


@pytest.fixture(scope="session")
def cifar_shard(tmp_path_factory) -> Path:
    """900 CIFAR-10 training images as one tar shard (KEY.jpg + KEY.cls)."""
    require_data()
    d = tmp_path_factory.mktemp("cifar-subset")
    (d / "classes.txt").write_bytes((CIFAR / "classes.txt").read_bytes())
    return write_subset_shard(d / "train-subset.tar", 900)


@pytest.fixture(scope="session")
def cifar_bundle_config(cifar_shard, tmp_path_factory):
    from conceptlens.precompute.job import PrecomputeConfig

    out = tmp_path_factory.mktemp("bundle") / "lite0-cifar"
    return PrecomputeConfig(model="efficientnet-lite0", data=str(cifar_shard), out=str(out), group_by="predicted",
                            concepts=5, min_images=25, max_images=80, prototypes=3, device="cpu")


@pytest.fixture(scope="session")
def cifar_bundle(cifar_bundle_config) -> Path:
    """A real bundle: EfficientNet-Lite0 over 900 CIFAR-10 images, grouped by the model's prediction,
    every class with at least 25 images, 5 concepts each."""
    from conceptlens.precompute.job import run

    out = run(cifar_bundle_config)
    assert out is not None and (out / "manifest.json").is_file()
    return out
