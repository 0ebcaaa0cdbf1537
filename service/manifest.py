"""The bundle's manifest as one typed schema: written by the bundle writer, read by ``load_bundle``,
the server, the report and the TorchServe handler. Nothing else parses ``manifest.json``.

Schema 2 (this conceptlens) adds the model card (source, file hash, signed features), the
preprocessing's interpolation and labels travelling from the user. A manifest of another schema
version gets a clear :class:`ManifestError`, never a KeyError deep in the server.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 2
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
HEAD_KINDS = ("linear", "generic")


class ManifestError(ValueError):
    """A manifest that is not of this schema, or a field of the wrong type or value."""


def _need(d: dict, key: str, where: str):
    if not isinstance(d, dict):
        raise ManifestError(f"{where} must be an object, not {type(d).__name__}")
    if key not in d:
        raise ManifestError(f"{where}.{key} is missing")
    return d[key]


def _triple(v, what: str) -> tuple[float, float, float]:
    try:
        t = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise ManifestError(f"{what} must be three numbers, got {v!r}") from None
    if len(t) != 3:
        raise ManifestError(f"{what} must be three numbers (R, G, B), got {len(t)}")
    return t


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: resize the short side to ``resize`` pixels with
    ``interpolation``, center crop ``crop`` x ``crop``, scale to [0, 1], subtract ``mean`` and
    divide by ``std`` per channel (torchvision's Resize(int) / CenterCrop / Normalize semantics)."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"

    def __post_init__(self):
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        if int(self.crop) < 1 or int(self.resize) < int(self.crop):
            raise ManifestError(f"preprocessing needs resize >= crop >= 1, got resize {self.resize}, crop {self.crop}")
        if any(s <= 0 for s in self.std):
            raise ManifestError(f"std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ManifestError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        object.__setattr__(self, "resize", int(self.resize))
        object.__setattr__(self, "crop", int(self.crop))

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(_need(d, "resize", "preprocessing")), int(_need(d, "crop", "preprocessing")),
                   _need(d, "mean", "preprocessing"), _need(d, "std", "preprocessing"),
                   str(d.get("interpolation", "bilinear")))

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    def describe(self) -> str:
        f = lambda v: "/".join(f"{x:g}" for x in v)  # noqa: E731
        return (f"resize {self.resize} ({self.interpolation}), crop {self.crop}, mean {f(self.mean)}, "
                f"std {f(self.std)}")


@dataclass(frozen=True)
class HeadCard:
    """The head h: features -> logits. ``linear``: W, b in ``file`` (safetensors), h(A) = W GAP(A) + b;
    ``generic``: an ONNX graph in ``file``."""

    kind: str
    file: str

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ManifestError(f"model.head.kind must be one of {', '.join(HEAD_KINDS)}, not {self.kind!r}")


@dataclass(frozen=True)
class ModelCard:
    """What the service needs to know of the model: where it came from and what it explains."""

    source: str  # as given to --model: efficientnet-lite0, torchvision:NAME, timm:NAME, onnx:PATH, torchscript:PATH
    name: str  # architecture or file name, for display
    file_sha256: str  # sha256 of the weights or model file the user handed over ("" for random weights)
    layer: str  # the explained layer (module name or graph tensor)
    feature_shape: tuple[int, int, int]  # C, H, W at the crop size
    num_classes: int
    head: HeadCard
    signed_features: bool = False  # the layer's activations take negative values (semi-NMF)
    onnx: str = "model.onnx"  # image (N,3,S,S) -> features (N,C,H,W), logits (N,K)

    def __post_init__(self):
        shape = tuple(int(v) for v in self.feature_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ManifestError(f"model.feature_shape must be C, H, W, got {list(self.feature_shape)}")
        object.__setattr__(self, "feature_shape", shape)
        if int(self.num_classes) < 1:
            raise ManifestError(f"model.num_classes must be positive, got {self.num_classes}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCard":
        head = _need(d, "head", "model")
        return cls(source=str(_need(d, "source", "model")), name=str(_need(d, "name", "model")),
                   file_sha256=str(_need(d, "file_sha256", "model")), layer=str(_need(d, "layer", "model")),
                   feature_shape=tuple(_need(d, "feature_shape", "model")),
                   num_classes=int(_need(d, "num_classes", "model")),
                   head=HeadCard(str(_need(head, "kind", "model.head")), str(_need(head, "file", "model.head"))),
                   signed_features=bool(d.get("signed_features", False)), onnx=str(d.get("onnx", "model.onnx")))


@dataclass(frozen=True)
class MethodCard:
    """How the concepts were learned (the precompute settings that shape them)."""

    name: str
    params: dict = field(default_factory=dict)
    group_by: str = "predicted"
    max_images: int = 0
    held_out: float = 0.0
    seed: int = 0
    # alpha of the logit-aware NNLS projection (service/nnls.py) of a linear head's bundle; 0: plain NNLS
    logit_weight: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> "MethodCard":
        return cls(name=str(_need(d, "name", "method")), params=dict(d.get("params") or {}),
                   group_by=str(d.get("group_by", "predicted")), max_images=int(d.get("max_images", 0)),
                   held_out=float(d.get("held_out", 0.0)), seed=int(d.get("seed", 0)),
                   logit_weight=float(d.get("logit_weight", 0.0)))


@dataclass
class ClassEntry:
    """One explained class: what the report and the service show of it beside its tensors."""

    name: str
    k: int
    method: str
    images: int = 0
    images_seen: int = 0
    held_out_images: int = 0
    metrics: dict = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassEntry":
        return cls(name=str(_need(d, "name", "class")), k=int(_need(d, "k", "class")),
                   method=str(_need(d, "method", "class")), images=int(d.get("images", 0)),
                   images_seen=int(d.get("images_seen", 0)), held_out_images=int(d.get("held_out_images", 0)),
                   metrics=dict(d.get("metrics") or {}), flags=[str(f) for f in d.get("flags") or []])

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Manifest:
    """``manifest.json`` of a bundle."""

    model: ModelCard
    preprocessing: Preprocessing
    class_names: list[str]
    method: MethodCard
    classes: dict[int, ClassEntry]
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    bundle_id: str = ""
    created_at: str = ""
    data: dict = field(default_factory=dict)  # where the images came from
    config_hash: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if len(self.class_names) != self.model.num_classes:
            raise ManifestError(f"{len(self.class_names)} class names for a model of {self.model.num_classes} outputs")
        for cid, entry in self.classes.items():
            if not 0 <= int(cid) < self.model.num_classes:
                raise ManifestError(f"class {cid} is out of range for a model of {self.model.num_classes} outputs")

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError("the manifest must be a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            older = isinstance(version, int) and version < SCHEMA_VERSION
            raise ManifestError(
                f"schema version {version!r}; this conceptlens reads schema {SCHEMA_VERSION}"
                + (": the bundle was written by an older conceptlens, run `conceptlens precompute` again "
                   "to rebuild it" if older else ""))
        try:
            return cls(model=ModelCard.from_dict(_need(d, "model", "manifest")),
                       preprocessing=Preprocessing.from_dict(_need(d, "preprocessing", "manifest")),
                       class_names=[str(n) for n in _need(d, "class_names", "manifest")],
                       method=MethodCard.from_dict(_need(d, "method", "manifest")),
                       classes={int(k): ClassEntry.from_dict(v) for k, v in _need(d, "classes", "manifest").items()},
                       files={str(k): str(v) for k, v in (d.get("files") or {}).items()},
                       bundle_id=str(d.get("bundle_id", "")), created_at=str(d.get("created_at", "")),
                       data=dict(d.get("data") or {}), config_hash=str(d.get("config_hash", "")),
                       schema_version=int(version))
        except ManifestError:
            raise
        except (TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"malformed manifest: {type(e).__name__}: {e}") from None

    def to_dict(self) -> dict:
        model = asdict(self.model)
        model["feature_shape"] = list(self.model.feature_shape)
        return {"schema_version": self.schema_version, "bundle_id": self.bundle_id, "created_at": self.created_at,
                "model": model, "preprocessing": self.preprocessing.to_dict(), "class_names": list(self.class_names),
                "method": asdict(self.method), "classes": {str(k): v.to_dict() for k, v in sorted(self.classes.items())},
                "files": dict(self.files), "data": dict(self.data), "config_hash": self.config_hash}
