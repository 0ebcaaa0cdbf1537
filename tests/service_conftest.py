"""Fixtures for the service tests (imported by tests/test_service_*.py).

``tiny_bundle``: a real bundle directory around a tiny ONNX CNN built with onnx.helper (no torch):
image (N,3,224,224) -> Conv 32x32 stride 32 -> ReLU = features (N,8,7,7) -> GAP -> Gemm = logits
(N,10). Classes 0-7 have 3 random non-negative concepts each, with prototype JPEGs; class 2 is
flagged; classes 8 and 9 have no concepts. Fast enough for unit tests of the whole server.

``redis_server``: a private redis-server on a free port (so tests may stop and restart it without
touching the shared one), with ``stop()`` and ``start()``.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptlens.service.serve_process import RedisProcess, free_port  # noqa: F401 (RedisProcess: re-exported)

TINY_CLASSES = [f"thing{i}" for i in range(8)] + ["lonely", "empty"]
TINY_C = 8


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def tiny_onnx(path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write the tiny two-output model; returns the head (W (10, 8), b (10,))."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv_w = (rng.standard_normal((TINY_C, 3, 32, 32)) * 0.02).astype(np.float32)
    conv_b = np.full(TINY_C, 0.05, np.float32)
    fc_w = rng.standard_normal((len(TINY_CLASSES), TINY_C)).astype(np.float32)
    fc_b = (rng.standard_normal(len(TINY_CLASSES)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["pre"], kernel_shape=[32, 32], strides=[32, 32]),
        helper.make_node("Relu", ["pre"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", TINY_C, 7, 7]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(TINY_CLASSES)])],
        [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(conv_b, "conv_b"),
         numpy_helper.from_array(fc_w, "fc_w"), numpy_helper.from_array(fc_b, "fc_b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return fc_w, fc_b


def write_tiny_bundle(out: Path, seed: int = 0, extra_tensors=None) -> Path:
    """The tiny bundle (see the module docstring); ``extra_tensors(rng)`` may add tensors (samples,
    contrast pairs) drawn from the same generator after the bases."""
    from conceptlens.precompute.bundle_writer import write_bundle
    from conceptlens.service.bundle import sha256_file
    from conceptlens.service.manifest import ClassEntry, HeadCard, MethodCard, ModelCard, Preprocessing

    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_path = out.parent / f"tiny-{seed}.onnx"
    fc_w, fc_b = tiny_onnx(onnx_path, seed)
    rng = np.random.default_rng(seed + 1)
    classes, tensors, protos, jpegs = {}, {}, {}, {}
    for cid in range(8):
        k = 3
        basis = np.abs(rng.standard_normal((k, TINY_C))).astype(np.float32)
        tensors[f"basis/{cid}"] = basis
        tensors[f"weights/{cid}"] = (basis @ fc_w[cid]).astype(np.float32)
        classes[cid] = ClassEntry(name=TINY_CLASSES[cid], k=k, method="nmf",
                                  metrics={"held_out": {"ice_fidelity": 0.1 + cid / 100, "recon_error": 0.2}},
                                  flags=["failed_stitched_prototype_test"] if cid == 2 else [])
        protos[cid] = []
        for j in range(k):
            refs = []
            for r in range(2):
                rel = f"prototypes/{cid}/{j}_{r}.jpg"
                jpegs[rel] = jpeg_bytes(1000 * cid + 10 * j + r, (32, 32))
                refs.append({"file": rel, "source": f"train/{cid:03d}{j}{r}", "box": [0, 0, 32, 32],
                             "score": 0.9 - 0.1 * r})
            protos[cid].append(refs)
    if extra_tensors is not None:
        tensors.update(extra_tensors(rng))
    return write_bundle(out, model_onnx=onnx_path,
                        model=ModelCard(source=f"onnx:{onnx_path.name}", name="tiny-cnn",
                                        file_sha256=sha256_file(onnx_path), layer="features",
                                        feature_shape=(TINY_C, 7, 7), num_classes=len(TINY_CLASSES),
                                        head=HeadCard("linear", "head.safetensors")),
                        class_names=TINY_CLASSES, preprocessing=Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3),
                        head_weight=fc_w, head_bias=fc_b, head_onnx=None, classes=classes, tensors=tensors,
                        prototypes=protos, prototype_jpegs=jpegs, method=MethodCard("nmf", {"concepts": 3}))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    r = RedisProcess(tmp_path)
    r.start()
    yield r
    r.stop()


class ServerThread:
    """An ExplainServer on a real port, run by its own event loop in a background thread.

    Lets synchronous tests (and module-scoped fixtures) use the real server with blocking clients.
    """

    def __init__(self, config, bundle=None, runtime=None, http: bool = False):
        import asyncio
        import dataclasses
        import threading

        from conceptlens.service.server import ExplainServer

        # HTTP on a free port only when a test asks for it (the default 8080 would collide)
        config = dataclasses.replace(config, http_port=free_port() if http else 0, http_host="127.0.0.1")

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-server")
        self.thread.start()
        self.server = self.call(self._make(ExplainServer, config, bundle, runtime))
        self.port = self.call(self.server.start())

    @staticmethod
    async def _make(cls, config, bundle, runtime):
        return cls(config, bundle=bundle, runtime=runtime)

    def call(self, coro, timeout: float = 60):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics_text(self) -> str:
        return self.server.metrics.text().decode()

    def stop(self, grace: float = 5.0) -> None:
        if self.loop.is_running():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def assert_identity(resp) -> None:
    """Every explanation of an ExplainResponse adds up: sum of contributions + residual + bias = logit.

    A check of the answer's own numbers against each other: for a linear head it also says that the
    served logit is W . GAP(A) + b, but for a non-linear head, and for a class without concepts,
    the residual (or the bias) is what makes it add up, so it holds by construction. Tests check the
    logits against the model's own where they have it (tests/test_explain_core.py: the split too)."""
    from conceptlens.service.client import identity_gap

    for x in resp.explanations:
        assert identity_gap(x) <= 1e-4 * max(1.0, abs(x.logit)), (x.class_name, identity_gap(x))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb's calling card)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png16_bytes(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    """A 16-bit grayscale PNG."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 65535, (size[1], size[0]), dtype=np.uint16)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")  # uint16 -> mode I;16
    return out.getvalue()


def cmyk_jpeg_bytes(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    return jpeg_bytes(seed, size, mode="CMYK")


def bad_inputs(good_jpeg: bytes) -> dict[str, bytes]:
    """Image payloads that must be rejected with INVALID_ARGUMENT."""
    return {
        "zero bytes": b"",
        "text": b"this is not an image, it is a sentence.\n" * 4,
        "truncated jpeg": good_jpeg[: len(good_jpeg) // 3],
        "jpeg header only": good_jpeg[:20],
        "png declaring 30000x30000": png_declaring(30000, 30000),
        "gif": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
    }
