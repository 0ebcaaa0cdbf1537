"""A precompute run's configuration (what the CLI and the Kubernetes Jobs set) and its hash.

Its own module so that the job, the class pipeline and the merge read one typed config without
importing each other.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..service.bundle import sha256_file

# Fields that change what is learned; the rest (paths, shard, device, batch size) do not.
_HASHED = ("model", "weights", "layer", "labels", "preprocessing", "data", "group_by", "method", "concepts",
           "min_images", "max_images", "held_out", "prototypes", "prototype_cells", "prototypes_exclude_class", "prototype_ranking",
           "prototype_box",
           "classes", "seed", "nmf_max_iter", "nmf_tol", "method_params", "stability_folds", "contrast_samples",
           "examples", "importance", "attribution", "logit_weight")
AUTO_METHOD = "auto"  # nmf on a non-negative layer, seminmf on a signed one
NEEDS_NON_NEGATIVE = ("nmf", "face", "attribution", "directions")  # their directions are >= 0


class JobError(ValueError):
    """A precompute run that cannot go on: the message says why and what to do."""


@dataclass
class PrecomputeConfig:
    model: str
    data: str
    out: str
    weights: str | None = None
    layer: str | None = None
    labels: str | None = None  # file: one class name per output
    preprocessing: dict = field(default_factory=dict)  # overrides: resize, crop, mean, std, interpolation
    work: str | None = None
    group_by: str = "predicted"  # "label" | "predicted"
    method: str = AUTO_METHOD
    method_params: dict = field(default_factory=dict)
    concepts: int | str = "auto"  # k, or "auto": chosen per class (precompute/selection.py)
    importance: str = "contribution"  # concept order for deletion/insertion: contribution | sobol
    attribution: str = "gradxact"  # attribution for --method attribution and contrast pixels: gradxact | deeplift
    min_images: int = 20
    max_images: int = 200
    held_out: float = 0.2
    prototypes: int = 5
    prototype_cells: int = 2
    prototypes_exclude_class: bool = False
    prototype_ranking: str = "evidence"  # evidence | code | cosine (precompute/prototypes.py)
    prototype_box: str = "fitted"  # window | fitted: a crop cut to its concept's extent (prototypes.fit_boxes)
    # the served projection's weight on each pixel's class logit (service/nnls.py; a linear head only)
    logit_weight: float = 30.0
    classes: list[str] | None = None
    seed: int = 0
    nmf_max_iter: int = 200
    nmf_tol: float = 1e-4
    stability_folds: int = 3
    contrast_samples: int = 512
    examples: int = 2
    batch_size: int = 32
    extract_memory_mib: int = 256  # feature maps a shard holds before spilling to disk (not hashed: same result)
    device: str = "auto"
    shard: tuple[int, int] = (0, 1)

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work else Path(str(self.out).rstrip("/") + ".work")

    def config_hash(self) -> str:
        d = asdict(self)
        d["weights_sha"] = _file_sha(self.weights)  # a missing file is the model loader's clear error
        d["labels_sha"] = _file_sha(self.labels)
        _, _, path = self.model.partition(":")
        d["model_sha"] = _file_sha(path) if self.model.split(":")[0] in ("onnx", "torchscript") else None
        keys = (*_HASHED, "weights_sha", "labels_sha", "model_sha")
        return hashlib.sha256(json.dumps({k: d[k] for k in keys}, sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]


def _file_sha(path: str | None) -> str | None:
    return sha256_file(path) if path and Path(path).is_file() else None


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(p) for p in str(text).split("/"))
    except ValueError:
        raise JobError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise JobError(f"--shard {text}: need 0 <= I < N")
    return i, n


