"""A user's ONNX (or TorchScript) classifier cut at the explained layer, without torch.

The ONNX path needs only ``onnx``, ``onnxruntime`` and ``numpy``; torch is imported inside
:func:`torchscript_to_onnx` alone, which exports a TorchScript file to ONNX so that the rest is
the ONNX path.

- :func:`load_onnx` checks the file: one input, N x 3 x H x W float; one output, (N, K) logits.
- :func:`find_layer` names the graph tensor to explain: by default the input of the last global
  average pooling; else a tensor name, a node name or a module path as PyTorch's exporter scopes
  node names (``layer4.1`` matches ``/layer4/layer4.1/...`` and, for TorchScript files,
  ``/layer4/1/...``).
- :func:`two_output_model` is the bundle's model: input ``image``, outputs ``features`` (the layer,
  N x C x H x W) and ``logits`` (N x K). :func:`head_model` is h: ``features`` -> ``logits``.
- :func:`linear_head_params` finds W, b when h(A) == W GAP(A) + b, numerically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.shape_inference
import onnx.utils
from onnx import helper

from .model_errors import ModelError

__all__ = [
    "ModelError", "load_onnx", "find_layer", "layer_name", "two_output_model", "head_model",
    "onnx_feature_shape", "num_outputs", "input_size", "fixed_batch", "linear_head_params",
    "onnx_head_fn", "torchscript_to_onnx",
]

_POOL_OPS = ("GlobalAveragePool", "ReduceMean", "AveragePool")


# ---------------------------------------------------------------------------------------------
# loading and small graph helpers


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX classifier: one input N x 3 x H x W (float), one output (N, K).

    Raises ModelError naming the file and the problem (missing, not ONNX, wrong inputs/outputs).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX model file {path} does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(str(path))  # by path: works for models with external data too
    except Exception as e:  # DecodeError, ValidationError, OSError, ...
        raise ModelError(f"{path} is not a valid ONNX model: {_first_line(e)}") from None
    if not model.graph.node:
        raise ModelError(f"{path} is not an ONNX classifier: its graph has no nodes")
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise ModelError(f"{path} has {len(inputs)} graph inputs ({', '.join(i.name for i in inputs)}); "
                         f"a classifier with one image input (N x 3 x H x W) is needed")
    inp = inputs[0]
    tt = inp.type.tensor_type
    if not inp.type.HasField("tensor_type") or tt.elem_type != onnx.TensorProto.FLOAT:
        kind = (onnx.TensorProto.DataType.Name(tt.elem_type) if inp.type.HasField("tensor_type")
                else inp.type.WhichOneof("value"))
        raise ModelError(f"{path}: input {inp.name!r} is {kind}; a float32 image tensor (N x 3 x H x W) "
                         f"is needed")
    dims = _dims(inp)
    if dims is None or len(dims) != 4 or dims[1] not in (3, None):
        shown = "no declared shape" if dims is None else f"shape {_show(dims)}"
        raise ModelError(f"{path}: input {inp.name!r} has {shown}; an NCHW image input with 3 channels "
                         f"(N x 3 x H x W) is needed")
    if len(model.graph.output) != 1:
        raise ModelError(f"{path} has {len(model.graph.output)} outputs "
                         f"({', '.join(o.name for o in model.graph.output)}); "
                         f"a classifier with one output, the logits (N x classes), is needed")
    out_dims = _dims(model.graph.output[0])
    if out_dims is not None and len(out_dims) != 2:
        raise ModelError(f"{path}: output {model.graph.output[0].name!r} has shape {_show(out_dims)}; "
                         f"a classifier's logits (N x classes) are needed")
    return model


def input_size(model: onnx.ModelProto) -> int | None:
    """The fixed square H == W of the input if the graph declares it, else None (any size).

    A fixed input that is not square raises ModelError (the crop is square).
    """
    dims = _dims(_graph_inputs(model)[0]) or []
    h, w = dims[2:4] if len(dims) == 4 else (None, None)
    if h is not None and w is not None and h != w:
        raise ModelError(f"the model's input is {h}x{w}; conceptlens feeds square crops")
    return h if h is not None and h == w else None


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the input declares (often 1 for hand-exported models), or None if dynamic."""
    dims = _dims(_graph_inputs(model)[0])
    return dims[0] if dims else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _graph_inputs(model: onnx.ModelProto) -> list:
    inits = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(vi) -> list[int | None] | None:
    """The declared dims of a ValueInfo (None for symbolic/unknown ones), or None if no shape."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in vi.type.tensor_type.shape.dim]


def _show(dims) -> str:
    parts = ["?" if d is None else str(d) for d in dims]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _producers(graph) -> dict[str, int]:
    return {o: i for i, n in enumerate(graph.node) for o in n.output if o}


def _all_names(graph) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    names |= {v.name for v in graph.value_info} | {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                names |= _all_names(g)
    names.discard("")
    return names


def _rename(graph, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` everywhere in ``graph`` (and in subgraphs that refer to it)."""
    for n in graph.node:
        for lst in (n.input, n.output):
            for i, name in enumerate(lst):
                if name == old:
                    lst[i] = new
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _rename(g, old, new)
    for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in coll:
            if item.name == old:
                item.name = new


def _fresh(base: str, used: set[str]) -> str:
    i = 0
    while f"{base}_{i}" in used:
        i += 1
    used.add(f"{base}_{i}")
    return f"{base}_{i}"


def _infer(model: onnx.ModelProto, crop: int | None = None) -> onnx.ModelProto:
    """The model with shapes inferred; with ``crop``, on a pinned 1 x 3 x crop x crop input."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if crop is not None:
        inp = _graph_inputs(m)[0]
        dims = inp.type.tensor_type.shape.dim
        for k, d in enumerate(dims):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                d.Clear()
                d.dim_value = 1 if k == 0 else crop
    try:
        return onnx.shape_inference.infer_shapes(m, data_prop=crop is not None)
    except Exception:  # custom ops, odd models: carry on without static shapes
        return m


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None] | None]:
    g = model.graph
    return {v.name: _dims(v) for v in list(g.value_info) + list(g.output) + list(g.input)}


def _default_crop(model: onnx.ModelProto) -> int:
    try:
        return input_size(model) or 224
    except ModelError:
        return 224


# ---------------------------------------------------------------------------------------------
# the explained layer


def _const_ints(graph, name: str) -> list[int] | None:
    for t in graph.initializer:
        if t.name == name:
            return [int(v) for v in onnx.numpy_helper.to_array(t).reshape(-1)]
    for n in graph.node:
        if n.op_type == "Constant" and n.output and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return [int(v) for v in onnx.numpy_helper.to_array(a.t).reshape(-1)]
                if a.name == "value_ints":
                    return list(a.ints)
                if a.name == "value_int":
                    return [a.i]
    return None


def _is_global_pool(graph, node, shapes) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "GlobalAveragePool":
        return True
    in_dims = shapes.get(node.input[0]) if node.input else None
    if node.op_type == "ReduceMean":
        attr = {a.name: a for a in node.attribute}
        if "axes" in attr:
            axes = list(attr["axes"].ints)
        elif len(node.input) > 1 and node.input[1]:
            axes = _const_ints(graph, node.input[1])
        else:
            return False  # no axes: reduces everything (or nothing), not a spatial pool
        if axes is None:
            return False
        rank = len(in_dims) if in_dims is not None else 4
        return rank == 4 and sorted(a % 4 for a in axes) == [2, 3]
    if node.op_type == "AveragePool":
        attr = {a.name: a for a in node.attribute}
        kernel = list(attr["kernel_shape"].ints) if "kernel_shape" in attr else []
        out = shapes.get(node.output[0])
        if out is not None and len(out) == 4 and out[2] == 1 and out[3] == 1:
            return True
        return (in_dims is not None and len(in_dims) == 4 and len(kernel) == 2 and None not in in_dims[2:]
                and kernel[0] >= in_dims[2] and kernel[1] >= in_dims[3])
    return False


def _scope(node_name: str) -> list[str] | None:
    """Module paths a node belongs to, outermost first, from PyTorch's scoped node names.

    ``/layer4/layer4.1/conv1/Conv`` (nn.Module export) and ``/layer4/1/conv1/Conv`` (TorchScript
    export) both give ``['layer4', 'layer4.1', 'layer4.1.conv1']``; None for unscoped names.
    """
    if not node_name.startswith("/"):
        return None
    parts = [p for p in node_name.split("/")[1:-1] if p]
    paths: list[str] = []
    for p in parts:
        if paths and not p.startswith(paths[-1] + "."):
            p = f"{paths[-1]}.{p}"  # a local attribute name (TorchScript); make it a full path
        paths.append(p)
    return paths


def _module_last_nodes(graph) -> dict[str, int]:
    """module path -> index of its last (non-Constant) node in topological order."""
    last: dict[str, int] = {}
    for i, n in enumerate(graph.node):
        if n.op_type == "Constant":
            continue
        for p in _scope(n.name) or []:
            last[p] = i
    return last


def _module_candidates(graph, limit: int = 20) -> tuple[list[str], int]:
    first: dict[str, int] = {}
    for i, n in enumerate(graph.node):
        for p in _scope(n.name) or []:
            first.setdefault(p, i)
    ordered = sorted(first, key=lambda p: (p.count("."), first[p]))
    return ordered[:limit], len(ordered)


def find_layer(model: onnx.ModelProto, layer: str | None = None, crop: int | None = None) -> str:
    """The name of the graph tensor to explain (an N x C x H x W feature map).

    ``layer`` None: the input of the last global average pooling (GlobalAveragePool, ReduceMean
    over the spatial axes, or an AveragePool covering the map). Else, in this order: a tensor
    name, a node name (its first output), or a module path as PyTorch's exporter scopes node
    names (``layer4`` -> the output of the last node under ``/layer4/``). The tensor must be 4-D
    at ``crop`` (default: the declared input size, else 224); ModelError otherwise.
    """
    g = model.graph
    crop = crop or _default_crop(model)
    inferred = _infer(model, crop)
    shapes = _shapes(inferred)
    produced = _producers(g)
    if layer is None:
        pools = [n for n in g.node if n.op_type in _POOL_OPS and _is_global_pool(inferred.graph, n, shapes)]
        if not pools:
            raise ModelError("no global average pooling before the head was found: name the layer to "
                             "explain with --layer (a module path such as layer4, a node or a tensor name)")
        tensor = pools[-1].input[0]
    elif layer in produced:
        tensor = layer
    elif (node := next((n for n in g.node if n.name == layer and n.output), None)) is not None:
        tensor = node.output[0]
    elif layer in (last := _module_last_nodes(g)):
        tensor = g.node[last[layer]].output[0]
    else:
        if layer in {i.name for i in g.input}:
            raise ModelError(f"layer {layer!r} is the model's input; name a layer inside the network")
        cands, total = _module_candidates(g)
        if cands:
            more = f", ... ({total - len(cands)} more)" if total > len(cands) else ""
            listing = f"layers of this model: {', '.join(cands)}{more}"
        else:
            maps = [n.output[0] for n in g.node if n.output and (d := shapes.get(n.output[0])) and len(d) == 4]
            listing = ("4-D tensors of this model (last ones): " + ", ".join(maps[-20:])) if maps else \
                "this model has no scoped node names"
        raise ModelError(f"unknown layer {layer!r}; {listing}. --layer takes a module path (e.g. layer4), "
                         f"a node name or a tensor name as shown by Netron")
    dims = shapes.get(tensor)
    if dims is not None and len(dims) != 4:
        shown = _show(dims[1:]) if dims else "()"
        raise ModelError(f"layer {layer or tensor!r} gives shape {shown} per image; explaining needs a "
                         f"C×H×W feature map (N x C x H x W tensor): pick a convolutional layer before "
                         f"the pooling")
    return tensor


def layer_name(model: onnx.ModelProto, tensor: str) -> str:
    """A readable name for ``tensor``: the shortest module path whose last node outputs it
    (``layer4`` rather than ``/layer4/layer4.1/relu_1/Relu_output_0``), else the tensor name."""
    g = model.graph
    last = _module_last_nodes(g)
    idx = _producers(g).get(tensor)
    if idx is None:
        return tensor
    for p in sorted((p for p in _scope(g.node[idx].name) or []), key=lambda p: p.count(".")):
        if last.get(p) == idx:
            return p
    return tensor


# ---------------------------------------------------------------------------------------------
# cutting


def _check_tensor(model: onnx.ModelProto, layer: str) -> None:
    if layer not in _producers(model.graph):
        raise ModelError(f"{layer!r} is not a tensor computed by the model; use find_layer() to name it")


def _resolve_names(m: onnx.ModelProto, roles: dict[str, str]) -> dict[str, str]:
    """Free the target names (e.g. 'features') where another tensor already uses them."""
    used = _all_names(m.graph)
    roles = dict(roles)
    for target, source in list(roles.items()):
        if source != target and target in used:
            new = _fresh(target, used)
            _rename(m.graph, target, new)
            roles = {k: (new if v == target else v) for k, v in roles.items()}
    return roles


def _value_info(shapes_model: onnx.ModelProto, tensor: str, name: str, rank: int):
    for v in list(shapes_model.graph.value_info) + list(shapes_model.graph.output):
        if v.name == tensor:
            out = onnx.ValueInfoProto()
            out.CopyFrom(v)
            out.name = name
            return out
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None] * rank)


def _check(m: onnx.ModelProto, what: str) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(m)
    except Exception as e:
        raise ModelError(f"the {what} cut from this model is not valid ONNX: {_first_line(e)}") from None
    return m


def two_output_model(model: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """The bundle's model: input ``image`` (N x 3 x H x W) -> outputs ``features`` (the layer
    tensor, N x C x h x w) and ``logits`` (the original output, N x K); batch axes as declared."""
    _check_tensor(model, layer)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    roles = _resolve_names(m, {"image": _graph_inputs(m)[0].name, "features": layer,
                               "logits": g.output[0].name})
    inferred = _infer(m)
    features_vi = _value_info(inferred, roles["features"], "features", 4)
    if roles["image"] != "image":
        inp = next(i for i in g.input if i.name == roles["image"])
        inp.name = "image"
        g.node.insert(0, helper.make_node("Identity", ["image"], [roles["image"]], name="conceptlens/image"))
    if roles["logits"] != "logits":
        g.node.append(helper.make_node("Identity", [roles["logits"]], ["logits"], name="conceptlens/logits"))
        g.output[0].name = "logits"
    if roles["features"] != "features":
        g.node.append(helper.make_node("Identity", [roles["features"]], ["features"],
                                       name="conceptlens/features"))
    g.output.insert(0, features_vi)
    return _check(m, "two-output model")


def head_model(model: onnx.ModelProto, layer: str) -> onnx.ModelProto:
    """The head h: input ``features`` (the layer tensor, N x C x h x w) -> output ``logits`` (N x K).

    ModelError if the head also needs the image (a skip connection around the cut).
    """
    _check_tensor(model, layer)
    g = model.graph
    out = g.output[0].name
    image = _graph_inputs(model)[0].name
    produced = _producers(g)
    # which tensors depend on the layer (forward), and which the output needs (backward to the cut)
    after = {layer}
    for n in g.node:
        if any(i in after for i in n.input):
            after.update(o for o in n.output if o)
    needed, stack, seen = set(), [out], set()
    while stack:
        t = stack.pop()
        if t in seen or t == layer:
            continue
        seen.add(t)
        if t in produced:
            needed.add(produced[t])
            stack.extend(i for i in g.node[produced[t]].input if i)
    if image in seen:
        before = _depends_on(g, image)
        culprit = next((i for k in sorted(needed) for i in g.node[k].input
                        if g.node[k].output and g.node[k].output[0] in after
                        and i and i not in after and i in before), image)
        raise ModelError(f"layer {layer_name(model, layer)!r} is not a cut point: the head also uses "
                         f"{culprit!r} (a skip connection around it); explain a block's output instead "
                         f"(e.g. the default layer)")
    m = _infer(model)
    if not any(v.name == layer for v in m.graph.value_info):
        m.graph.value_info.append(helper.make_tensor_value_info(layer, onnx.TensorProto.FLOAT, [None] * 4))
    head = onnx.utils.Extractor(m).extract_model([layer], [out])
    io_names = {layer, out}
    keep = [v for v in head.graph.value_info if v.name not in io_names]
    del head.graph.value_info[:]
    head.graph.value_info.extend(keep)
    roles = _resolve_names(head, {"features": layer, "logits": out})
    hg = head.graph
    if roles["features"] != "features":
        hg.input[0].name = "features"
        hg.node.insert(0, helper.make_node("Identity", ["features"], [roles["features"]],
                                           name="conceptlens/features"))
    if roles["logits"] != "logits":
        hg.node.append(helper.make_node("Identity", [roles["logits"]], ["logits"], name="conceptlens/logits"))
        hg.output[0].name = "logits"
    return _check(head, "head")


def _depends_on(graph, tensor: str) -> set[str]:
    dep = {tensor}
    for n in graph.node:
        if any(i in dep for i in n.input):
            dep.update(o for o in n.output if o)
    return dep


# ---------------------------------------------------------------------------------------------
# running


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"ONNX Runtime cannot load the model: {_first_line(e)}") from None


def _run_zeros(model: onnx.ModelProto, crop: int) -> dict[str, np.ndarray]:
    sess = _session(model)
    x = np.zeros((fixed_batch(model) or 1, 3, crop, crop), np.float32)
    try:
        outs = sess.run(None, {sess.get_inputs()[0].name: x})
    except Exception as e:
        size = input_size(model)
        hint = f" (it takes {size}x{size} inputs: use --crop {size})" if size and size != crop else ""
        raise ModelError(f"the model does not run on a {crop}x{crop} image{hint}: {_first_line(e)}") from None
    return {o.name: v for o, v in zip(sess.get_outputs(), outs)}


def onnx_feature_shape(two_output: onnx.ModelProto, crop: int) -> tuple[int, int, int]:
    """(C, H, W) of ``features`` for one crop x crop image, by running ONNX Runtime (CPU)."""
    shape = tuple(int(s) for s in _run_zeros(two_output, crop)["features"].shape[1:])
    if len(shape) != 3:
        raise ModelError(f"the explained layer gives shape {shape} per image; a C×H×W feature map is needed")
    return shape  # type: ignore[return-value]


def num_outputs(model: onnx.ModelProto, crop: int) -> int:
    """K, the number of logits per image (of output ``logits`` if present, else the last output)."""
    outs = _run_zeros(model, crop)
    logits = outs.get("logits", list(outs.values())[-1])
    if logits.ndim != 2:
        raise ModelError(f"the model's output has shape {tuple(logits.shape[1:])} per image; "
                         f"a classifier's logits (N x classes) are needed")
    return int(logits.shape[1])


def onnx_head_fn(head: onnx.ModelProto) -> Callable[[np.ndarray], np.ndarray]:
    """h as a numpy function: (N, C, H, W) float32 -> (N, K), on an ONNX Runtime CPU session.
    A head with a fixed batch (e.g. 1) is run in chunks of that batch."""
    sess = _session(head)
    name = sess.get_inputs()[0].name
    batch = fixed_batch(head)

    def fn(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if batch is None:
            return sess.run(None, {name: a})[0]
        n = a.shape[0]
        pad = (-n) % batch
        if pad:
            a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), np.float32)])
        return np.concatenate([sess.run(None, {name: a[i:i + batch]})[0]
                               for i in range(0, len(a), batch)])[:n]

    return fn


def linear_head_params(head_fn: Callable[[np.ndarray], np.ndarray], feature_shape: tuple[int, int, int],
                       rtol: float = 1e-4, seed: int = 0,
                       max_bytes: int = 64 << 20) -> tuple[np.ndarray, np.ndarray] | None:
    """(W (K, C), b (K,)) float32 if h(A) == W GAP(A) + b, found numerically; else None.

    First two cheap necessary checks on random maps (h sees only the spatial mean; h is affine),
    then b = h(0), W[:, c] = h(map constant 1 on channel c, 0 elsewhere) - b, in chunks of at most
    ``max_bytes`` of input; then checked on 3 non-negative and 3 signed random maps. ``head_fn``:
    numpy (N, C, H, W) float32 -> (N, K). Tolerance: rtol, and atol = rtol * max |logit| (>= 1).
    """
    c, hh, ww = (int(s) for s in feature_shape)
    rng = np.random.default_rng(seed)

    def close(x, y) -> bool:
        return x.shape == y.shape and np.allclose(x, y, rtol=rtol, atol=rtol * max(1.0, float(np.abs(y).max())))

    # cheap necessary conditions first (6 maps, not C): h(A) == h(GAP(A) spread), h affine
    a = rng.uniform(0, 3, (2, c, hh, ww)).astype(np.float32)
    spread = np.broadcast_to(a.mean(axis=(2, 3), keepdims=True), a.shape)
    probe = np.concatenate([np.zeros((1, c, hh, ww), np.float32), a, spread, a[:1] + a[1:]])
    out = np.asarray(head_fn(probe), np.float64)
    if out.ndim != 2 or out.shape[0] != len(probe):
        return None
    b, h_a, h_spread, h_sum = out[0], out[1:3], out[3:5], out[5]
    if not (close(h_spread, h_a) and close(h_a[0] + h_a[1] - b, h_sum)):
        return None
    chunk = max(1, max_bytes // (c * hh * ww * 4))
    cols = []
    for c0 in range(0, c, chunk):
        n = min(chunk, c - c0)
        a = np.zeros((n, c, hh, ww), np.float32)
        a[np.arange(n), c0 + np.arange(n)] = 1.0
        cols.append(np.asarray(head_fn(a), np.float64) - b)
    weight = np.concatenate(cols).T  # (K, C)
    tests = np.concatenate([rng.uniform(0, 3, (3, c, hh, ww)), rng.normal(0, 1.5, (3, c, hh, ww))]).astype(np.float32)
    out = np.asarray(head_fn(tests), np.float64)
    if not close(tests.astype(np.float64).mean(axis=(2, 3)) @ weight.T + b, out):
        return None
    return weight.astype(np.float32), b.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# TorchScript


def torchscript_to_onnx(path: str | os.PathLike, crop: int, opset: int = 17) -> onnx.ModelProto:
    """A TorchScript classifier (scripted or traced, image -> logits) exported to ONNX in memory:
    input ``image`` (dynamic batch), output ``logits``. Node names carry module scopes
    (``/layer4/1/...``), so :func:`find_layer` takes module paths such as ``layer4.1``."""
    import tempfile
    import warnings

    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"TorchScript model file {path} does not exist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise ModelError(f"{path} is not a TorchScript model (torch.jit.save): {_first_line(e)}") from None
        module.eval()
        with tempfile.TemporaryDirectory(prefix="conceptlens-onnx-") as tmp:
            out = Path(tmp) / "model.onnx"
            try:
                with torch.no_grad():
                    torch.onnx.export(module, (torch.zeros(1, 3, crop, crop),), str(out), dynamo=False,
                                      opset_version=opset, input_names=["image"], output_names=["logits"],
                                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
            except Exception as e:
                raise ModelError(f"cannot export TorchScript model {path} to ONNX at a {crop}x{crop} "
                                 f"input: {_first_line(e)}") from None
            model = onnx.load(str(out))  # loads external data (models > 2 GB) before tmp goes
    if len(model.graph.output) != 1:
        raise ModelError(f"TorchScript model {path} returns {len(model.graph.output)} outputs; "
                         f"a classifier returning one logits tensor is needed")
    return model
