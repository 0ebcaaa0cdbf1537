"""Model runtimes: provider choice without a GPU, the ONNX Runtime session, the runtime registry."""
from __future__ import annotations

import numpy as np
import pytest
from service_conftest import tiny_onnx

from conceptlens.service import runtime as rt


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "tiny.onnx"
    w, b = tiny_onnx(path)
    return path, w, b


def test_no_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(rt, "cuda_device_present", lambda: False)
    assert rt.select_providers("auto") == ["CPUExecutionProvider"]
    assert rt.select_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(rt.RuntimeSetupError, match="cuda"):
        rt.select_providers("cuda")
    with pytest.raises(ValueError):
        rt.select_providers("tpu")
    with pytest.raises(rt.RuntimeSetupError, match="cuda"):
        rt.select_providers("cuda:1")


def test_cuda_only_when_a_device_is_there(monkeypatch):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider")
    monkeypatch.setattr(rt, "cuda_device_present", lambda: True)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: None, raising=False)
    assert rt.select_providers("auto")[0] == "CUDAExecutionProvider"
    # a GPU index reaches the provider: precompute's --device cuda:1, a TorchServe worker's gpu_id
    assert rt.select_providers("cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert rt.select_providers("auto", device_id=2)[0] == ("CUDAExecutionProvider", {"device_id": 2})


def test_hidden_devices_mean_no_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert rt.cuda_device_present() is False


def test_onnx_runtime_runs_batches(tiny_model):
    path, w, b = tiny_model
    r = rt.create_runtime("onnx", path, device="cpu", intra_op_threads=1)
    assert isinstance(r, rt.Runtime)
    assert r.providers == ["CPUExecutionProvider"] and r.max_batch_size is None
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    features, logits = r.run(x)
    assert features.shape == (3, 8, 7, 7) and logits.shape == (3, 10)
    assert features.min() >= 0
    np.testing.assert_allclose(logits, features.mean(axis=(2, 3)) @ w.T + b, rtol=1e-4, atol=1e-4)
    one_f, one_l = r.run(x[1:2])  # batch 1 equals the same row of a larger batch
    np.testing.assert_allclose(one_l[0], logits[1], rtol=1e-4, atol=1e-5)
    r.close()


def test_unreadable_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(rt.RuntimeSetupError, match="cannot load"):
        rt.OnnxRuntime(bad, device="cpu")


def test_registry(tiny_model):
    with pytest.raises(ValueError, match="unknown runtime"):
        rt.create_runtime("nope", tiny_model[0])

    class Echo:
        name, providers, max_batch_size = "echo", ["none"], None

        def __init__(self, model_path, **settings):
            self.settings = settings

        def run(self, batch):
            return batch, batch[:, :, 0, 0]

        def close(self):
            pass

    rt.register_runtime("echo-test", Echo)
    try:
        made = rt.create_runtime("echo-test", tiny_model[0], device="cpu")
        assert isinstance(made, rt.Runtime) and made.settings == {"device": "cpu"}
        assert "echo-test" in rt.available_runtimes()
    finally:
        rt._RUNTIMES.pop("echo-test")
