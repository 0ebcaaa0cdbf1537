"""precompute.onnx_graph: a user's ONNX / TorchScript classifier cut at the explained layer.

Real models (torchvision resnet18 with random weights, tiny CNNs, hand-built ONNX graphs), real
ONNX Runtime on CPU, no mocks.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conceptlens.precompute import onnx_graph as og
from conceptlens.precompute.models import ModelError

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
nn = torch.nn


def _export(net, path, shape=(1, 3, 224, 224), dynamic=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(*shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "N"}, "output": {0: "N"}} if dynamic else None)
    return path


def _run(model: onnx.ModelProto, x: np.ndarray, outputs=None) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {sess.get_inputs()[0].name: x})


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(1e-12, np.abs(b).max()))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4).eval()
    path = _export(net, tmp_path_factory.mktemp("resnet") / "resnet18.onnx")
    return net, og.load_onnx(path)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)


def _torch_layers(net, x: np.ndarray, names=("layer3", "layer4")) -> dict[str, np.ndarray]:
    got = {}
    hooks = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.numpy()))
             for n in names]
    with torch.no_grad():
        got["logits"] = net(torch.from_numpy(x)).numpy()
    for h in hooks:
        h.remove()
    return got


def test_resnet_default_layer_two_outputs_and_head(resnet, image):
    net, model = resnet
    layer = og.find_layer(model)
    pool = next(n for n in model.graph.node if n.op_type == "GlobalAveragePool")
    assert layer == pool.input[0]
    assert og.layer_name(model, layer) == "layer4"
    assert og.input_size(model) == 224 and og.fixed_batch(model) is None

    two = og.two_output_model(model, layer)
    onnx.checker.check_model(two)
    assert [i.name for i in two.graph.input] == ["image"]
    assert [o.name for o in two.graph.output] == ["features", "logits"]
    assert og.onnx_feature_shape(two, 224) == (512, 7, 7)
    assert og.num_outputs(two, 224) == og.num_outputs(model, 224) == 4

    feats, logits = _run(two, image, ["features", "logits"])
    (orig,) = _run(model, image)
    ref = _torch_layers(net, image)
    assert _rel(logits, orig) < 1e-5
    assert _rel(feats, ref["layer4"]) < 1e-4
    assert _rel(logits, ref["logits"]) < 1e-4

    head = og.head_model(model, layer)
    onnx.checker.check_model(head)
    assert [i.name for i in head.graph.input] == ["features"] and [o.name for o in head.graph.output] == ["logits"]
    assert _rel(og.onnx_head_fn(head)(feats), logits) < 1e-5

    wb = og.linear_head_params(og.onnx_head_fn(head), (512, 7, 7))
    assert wb is not None
    w, b = wb
    assert w.shape == (4, 512) and b.shape == (4,)
    np.testing.assert_allclose(w, net.fc.weight.detach().numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(b, net.fc.bias.detach().numpy(), atol=1e-4, rtol=1e-4)


def test_resnet_layer_by_module_path(resnet, image):
    net, model = resnet
    layer = og.find_layer(model, "layer3")
    assert og.layer_name(model, layer) == "layer3"
    two = og.two_output_model(model, layer)
    assert og.onnx_feature_shape(two, 224) == (256, 14, 14)
    feats, logits = _run(two, image, ["features", "logits"])
    ref = _torch_layers(net, image)
    assert _rel(feats, ref["layer3"]) < 1e-4
    head = og.head_model(model, layer)
    assert _rel(og.onnx_head_fn(head)(feats), logits) < 1e-4
    assert og.linear_head_params(og.onnx_head_fn(head), (256, 14, 14)) is None  # layer4 is in the head
    # a node name and a tensor name name the same layers
    node = next(n for n in model.graph.node if n.output[0] == layer)
    assert og.find_layer(model, node.name) == layer == og.find_layer(model, layer)
    assert og.find_layer(model, "layer4") == og.find_layer(model)


def test_bad_layers(resnet):
    _, model = resnet
    with pytest.raises(ModelError, match="layer4") as e:
        og.find_layer(model, "layer5")
    assert "unknown layer 'layer5'" in str(e.value) and "\n" not in str(e.value)
    flatten = next(n.name for n in model.graph.node if n.op_type == "Flatten")
    with pytest.raises(ModelError, match="C×H×W"):
        og.find_layer(model, flatten)
    inside = og.find_layer(model, "layer4.1.conv1")  # a residual block's inside: the skip bypasses it
    with pytest.raises(ModelError, match="not a cut point: the head also uses '/layer4/layer4.0/"):
        og.head_model(model, inside)
    with pytest.raises(ModelError, match="not a tensor computed"):
        og.two_output_model(model, "no-such-tensor")


def test_bad_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        og.load_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ModelError, match="junk.onnx"):
        og.load_onnx(junk)
    with pytest.raises(ModelError, match="does not exist"):
        og.torchscript_to_onnx(tmp_path / "missing.pt", 224)
    with pytest.raises(ModelError, match="not a TorchScript model"):
        og.torchscript_to_onnx(junk, 224)


def _graph_model(path, inputs, outputs, opset=17, nodes=None):
    nodes = nodes or [helper.make_node("Identity", [inputs[0].name], [o.name]) for o in outputs]
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                          opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.save(m, str(path))
    return path


def test_load_onnx_checks_inputs_and_outputs(tmp_path):
    f = TensorProto.FLOAT
    two_in = _graph_model(tmp_path / "a.onnx", [helper.make_tensor_value_info("x", f, ["N", 3, 8, 8]),
                                                helper.make_tensor_value_info("y", f, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("o", f, ["N", 3, 8, 8])])
    with pytest.raises(ModelError, match="a.onnx has 2 graph inputs"):
        og.load_onnx(two_in)
    gray = _graph_model(tmp_path / "b.onnx", [helper.make_tensor_value_info("x", f, ["N", 1, 8, 8])],
                        [helper.make_tensor_value_info("o", f, ["N", 3, 8, 8])])
    with pytest.raises(ModelError, match="3 channels"):
        og.load_onnx(gray)
    flat = _graph_model(tmp_path / "c.onnx", [helper.make_tensor_value_info("x", f, ["N", 192])],
                        [helper.make_tensor_value_info("o", f, ["N", 3, 8, 8])])
    with pytest.raises(ModelError, match="NCHW"):
        og.load_onnx(flat)
    two_out = _graph_model(tmp_path / "d.onnx", [helper.make_tensor_value_info("x", f, ["N", 3, 8, 8])],
                           [helper.make_tensor_value_info("o", f, ["N", 3, 8, 8]),
                            helper.make_tensor_value_info("p", f, ["N", 3, 8, 8])])
    with pytest.raises(ModelError, match="2 outputs"):
        og.load_onnx(two_out)
    segmenter = _graph_model(tmp_path / "e.onnx", [helper.make_tensor_value_info("x", f, ["N", 3, 8, 8])],
                             [helper.make_tensor_value_info("o", f, ["N", 3, 8, 8])])
    with pytest.raises(ModelError, match="logits"):
        og.load_onnx(segmenter)


def _pooled_model(pool: str, rng) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x (N,3,8,8) -> Conv -> 'features' (a clashing name) -> Relu -> pool -> Gemm -> 'out'."""
    f = TensorProto.FLOAT
    w, b = rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 3, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(w, "fw"), numpy_helper.from_array(b, "fb")]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["features"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["features"], ["act"], name="relu")]
    opset = 17
    if pool == "gap":
        nodes.append(helper.make_node("GlobalAveragePool", ["act"], ["p4"]))
    elif pool == "avgpool":
        nodes.append(helper.make_node("AveragePool", ["act"], ["p4"], kernel_shape=[8, 8]))
    elif pool == "reducemean_attr":
        opset = 13
        nodes.append(helper.make_node("ReduceMean", ["act"], ["p4"], axes=[2, 3]))
    elif pool == "reducemean_input":
        opset = 18
        inits.append(numpy_helper.from_array(np.array([-2, -1], np.int64), "axes"))
        nodes.append(helper.make_node("ReduceMean", ["act", "axes"], ["p4"]))
    nodes += [helper.make_node("Flatten", ["p4"], ["p"]),
              helper.make_node("Gemm", ["p", "fw", "fb"], ["out"], transB=1)]
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", f, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", f, ["N", 5])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9), w, b


@pytest.mark.parametrize("pool", ["gap", "avgpool", "reducemean_attr", "reducemean_input"])
def test_default_layer_by_pooling_kind(pool, tmp_path):
    rng = np.random.default_rng(1)
    model, w, b = _pooled_model(pool, rng)
    onnx.save(model, str(tmp_path / "m.onnx"))
    model = og.load_onnx(tmp_path / "m.onnx")
    layer = og.find_layer(model)
    assert layer == "act"
    two = og.two_output_model(model, layer)  # renames the inner 'features' out of the way
    onnx.checker.check_model(two)
    assert [o.name for o in two.graph.output] == ["features", "logits"]
    x = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    feats, logits = _run(two, x, ["features", "logits"])
    (orig,) = _run(model, x)
    assert _rel(logits, orig) < 1e-6
    assert feats.shape == (3, 6, 8, 8) and feats.min() >= 0
    np.testing.assert_allclose(feats.mean(axis=(2, 3)) @ w.T + b, logits, rtol=1e-4, atol=1e-4)
    assert og.onnx_feature_shape(two, 8) == (6, 8, 8)
    head = og.head_model(model, layer)
    assert _rel(og.onnx_head_fn(head)(feats), logits) < 1e-5
    wb = og.linear_head_params(og.onnx_head_fn(head), (6, 8, 8))
    assert wb is not None
    np.testing.assert_allclose(wb[0], w, atol=1e-4)
    np.testing.assert_allclose(wb[1], b, atol=1e-4)


def test_no_pooling_asks_for_layer(tmp_path):
    f = TensorProto.FLOAT
    path = _graph_model(tmp_path / "m.onnx", [helper.make_tensor_value_info("x", f, ["N", 3, 8, 8])],
                        [helper.make_tensor_value_info("o", f, ["N", 3])],
                        nodes=[helper.make_node("GlobalMaxPool", ["x"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["o"])])
    with pytest.raises(ModelError, match="--layer"):
        og.find_layer(og.load_onnx(path))


class _TinyCNN(nn.Module):
    def __init__(self, nonlinear_head: bool):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = (nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)) if nonlinear_head
                           else nn.Linear(16, 3))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def test_tiny_cnns_nonlinear_head_and_fixed_batch(tmp_path):
    torch.manual_seed(0)
    x = np.random.default_rng(2).normal(size=(3, 3, 32, 32)).astype(np.float32)
    nonlin = _TinyCNN(True).eval()
    model = og.load_onnx(_export(nonlin, tmp_path / "nonlin.onnx", (1, 3, 32, 32)))
    layer = og.find_layer(model)
    assert og.layer_name(model, layer) == "features"
    assert og.find_layer(model, "features.3") == layer  # module paths down to the Sequential's children
    head = og.head_model(model, layer)
    two = og.two_output_model(model, layer)
    assert og.onnx_feature_shape(two, 32) == (16, 16, 16)
    feats, logits = _run(two, x, ["features", "logits"])
    with torch.no_grad():
        np.testing.assert_allclose(logits, nonlin(torch.from_numpy(x)).numpy(), atol=1e-5)
    assert _rel(og.onnx_head_fn(head)(feats), logits) < 1e-5
    assert og.linear_head_params(og.onnx_head_fn(head), (16, 16, 16)) is None

    fixed = _TinyCNN(False).eval()  # a hand export: batch 1, 32x32, no dynamic axes
    model = og.load_onnx(_export(fixed, tmp_path / "fixed.onnx", (1, 3, 32, 32), dynamic=False))
    assert og.input_size(model) == 32 and og.fixed_batch(model) == 1
    layer = og.find_layer(model)
    two = og.two_output_model(model, layer)
    assert og.onnx_feature_shape(two, 32) == (16, 16, 16) and og.num_outputs(two, 32) == 3
    with pytest.raises(ModelError, match="use --crop 32"):
        og.onnx_feature_shape(two, 64)
    head_fn = og.onnx_head_fn(og.head_model(model, layer))  # runs batch-1 chunks
    feats = np.concatenate([_run(two, x[i:i + 1], ["features"])[0] for i in range(3)])
    with torch.no_grad():
        np.testing.assert_allclose(head_fn(feats), fixed(torch.from_numpy(x)).numpy(), atol=1e-5)
    wb = og.linear_head_params(head_fn, (16, 16, 16))
    assert wb is not None
    np.testing.assert_allclose(wb[0], fixed.classifier.weight.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(wb[1], fixed.classifier.bias.detach().numpy(), atol=1e-4)


def test_torchscript_traced_and_scripted(resnet, image, tmp_path):
    net, _ = resnet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(net, torch.zeros(1, 3, 224, 224), check_trace=False).save(str(tmp_path / "traced.pt"))
        torch.jit.script(net).save(str(tmp_path / "scripted.pt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = og.torchscript_to_onnx(tmp_path / "traced.pt", 224)
    assert not caught, [str(w.message) for w in caught]
    (logits,) = _run(model, image)
    ref = _torch_layers(net, image)
    assert _rel(logits, ref["logits"]) < 1e-4
    layer = og.find_layer(model)
    assert og.find_layer(model, "layer4") == layer and og.layer_name(model, layer) == "layer4"
    two = og.two_output_model(model, layer)
    feats, logits2 = _run(two, image, ["features", "logits"])
    assert _rel(feats, ref["layer4"]) < 1e-4 and _rel(logits2, logits) < 1e-6
    assert _rel(og.onnx_head_fn(og.head_model(model, layer))(feats), logits) < 1e-5

    scripted = og.torchscript_to_onnx(tmp_path / "scripted.pt", 224)
    feats3, _ = _run(og.two_output_model(scripted, og.find_layer(scripted, "layer3")), image,
                     ["features", "logits"])
    assert _rel(feats3, ref["layer3"]) < 1e-4
