"""TorchServe: the conceptlens handler and archive, and TorchServe as the service's runtime (issue 5).

Fast (in process, tiny bundle): the archive's contents and config; the handler, run with
TorchServe's own Context on a mixed batch, answers each request with its own options exactly as
the gRPC service does, isolates a bad request, and serves feature batches and its description.

Slow (real TorchServe 0.12 on loopback ports, the real EfficientNet-Lite0 CIFAR-10 bundle): the
same images and options sent concurrently to TorchServe's REST and gRPC inference APIs and to the
conceptlens gRPC service give the same predictions and explanations; a bad image gets a clear
error and the worker keeps serving; `conceptlens serve --runtime torchserve` answers as the ONNX
Runtime service does. TorchServe is stopped at the end whatever happens.
"""
from __future__ import annotations

import base64
import concurrent.futures
import importlib
import json
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import cifar_test_jpegs
from google.protobuf import json_format
from service_conftest import TINY_CLASSES, ServerThread, jpeg_bytes

from conceptlens.handlers.conceptlens_handler import ConceptLensHandler
from conceptlens.handlers.ts_requests import npy_bytes, read_npys
from conceptlens.service import cli
from conceptlens.service.client import ExplainClient
from conceptlens.service.serve_process import ServeProcess
from conceptlens.service.config import ServerConfig
from conceptlens.v1 import explain_service_pb2 as pb

ts = pytest.importorskip("ts", reason="TorchServe is not installed (pip install '.[torchserve]')")

# TorchServe's gRPC inference API, as its frontend (model-server.jar 0.12.0) declares it; the
# wheel ships no .proto, so a client writes this one. The response's google.rpc.Status field (3)
# is left out: unknown fields are skipped.
TS_INFERENCE_PROTO = """
syntax = "proto3";
package org.pytorch.serve.grpc.inference;
import "google/protobuf/empty.proto";

message PredictionsRequest {
  string model_name = 1;
  string model_version = 2;
  map<string, bytes> input = 3;
  optional string sequence_id = 4;
}
message PredictionResponse {
  bytes prediction = 1;
  optional string sequence_id = 2;
}
message TorchServeHealthResponse {
  string health = 1;
}
service InferenceAPIsService {
  rpc Ping(google.protobuf.Empty) returns (TorchServeHealthResponse) {}
  rpc Predictions(PredictionsRequest) returns (PredictionResponse) {}
  rpc StreamPredictions(PredictionsRequest) returns (stream PredictionResponse) {}
}
"""

# Per-request options, all different, sent in one concurrent burst so that TorchServe batches them.
OPTIONS = [
    {},  # the defaults: top 1 explained, 3 prototypes, 5 predictions
    {"top_k": 0, "num_predictions": 3},  # predictions only
    {"top_k": 2, "heatmap_format": "HEATMAP_FORMAT_RAW", "prototypes_per_concept": 1},
    {"classes": [{"id": "CID0"}], "max_concepts": 2, "prototype_format": "PROTOTYPE_FORMAT_JPEG",
     "prototypes_per_concept": 2, "heatmap_format": "HEATMAP_FORMAT_RAW"},
    {"classes": [{"name": "NAME1"}], "contrast": {"id": "CID0"}, "prototypes_per_concept": 0},
]


# -- comparing answers ---------------------------------------------------------------------------
def as_dict(message) -> dict:
    d = json_format.MessageToDict(message, preserving_proto_field_name=True)
    for key in ("timings", "cache_hit", "model", "version"):  # the server's own (the handler serves one bundle)
        d.pop(key, None)
    return d


def assert_same(a, b, path: str = "answer") -> None:
    """Equal structures; floats to 1e-4 (relative or absolute); RAW heatmap bytes to one step."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, f"{path}: {a!r} vs {b!r}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        if a.get("format") == "HEATMAP_FORMAT_RAW":
            ga = np.frombuffer(base64.b64decode(a["data"]), np.uint8) * float(a["scale"])
            gb = np.frombuffer(base64.b64decode(b["data"]), np.uint8) * float(b["scale"])
            assert ga.shape == gb.shape and np.abs(ga - gb).max() <= 1.01 * max(a["scale"], b["scale"]) + 1e-6, path
            a, b = {k: v for k, v in a.items() if k != "data"}, {k: v for k, v in b.items() if k != "data"}
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a), abs(b)), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def resolve(options: dict, with_concepts: list[int], names: list[str]) -> dict:
    """OPTIONS with the placeholders replaced by classes of this bundle that have concepts."""
    text = json.dumps(options).replace('"CID0"', str(with_concepts[0]))
    return json.loads(text.replace("NAME1", names[with_concepts[-1]]))


def service_answers(target: str, images: list[bytes], options: list[dict]) -> list[dict]:
    with ExplainClient(target, max_message_bytes=64 << 20) as c:
        return [as_dict(c.stub.Explain(pb.ExplainRequest(image=im, options=json_format.ParseDict(o, pb.ExplainOptions())),
                                       timeout=60)) for im, o in zip(images, options)]


# -- fast: the archive and the handler in process -------------------------------------------------
class Harness:
    """The handler in this process with TorchServe's own Context, as a worker would run it."""

    def __init__(self, model_dir: Path):
        import yaml
        from ts.context import Context

        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        self.yaml = yaml.safe_load((model_dir / "model-config.yaml").read_text())
        self.context = Context("conceptlens", str(model_dir), manifest, self.yaml["batchSize"], None, ts.__version__,
                               model_yaml_config=self.yaml)
        self.handler = ConceptLensHandler()
        self.handler.initialize(self.context)

    def batch(self, rows: list[dict], headers: list[dict] | None = None) -> list[tuple[int, str, object]]:
        from ts.context import RequestProcessor

        headers = headers or [{} for _ in rows]
        self.context.request_processor = [RequestProcessor(dict(h)) for h in headers]
        out = self.handler.handle(rows, self.context)
        return [(self.context.get_response_status(i)[0] or 200, self.context.get_response_content_type(i), body)
                for i, body in enumerate(out)]


def build_archive(bundle: Path, store: Path, *extra: str) -> Path:
    assert cli.main(["torchserve-archive", "--bundle", str(bundle), "--out", str(store), *extra]) == 0
    return store / "conceptlens.mar"


@pytest.fixture(scope="module")
def tiny_worker(tiny_bundle, tmp_path_factory):
    mar = build_archive(tiny_bundle, tmp_path_factory.mktemp("store"), "--batch-size", "4", "--max-batch-delay-ms", "7")
    model_dir = tmp_path_factory.mktemp("model-dir")
    with zipfile.ZipFile(mar) as z:
        names = z.namelist()
        z.extractall(model_dir)
    return Harness(model_dir), names


@pytest.fixture(scope="module")
def tiny_service(tiny_bundle):
    srv = ServerThread(ServerConfig(bundle=str(tiny_bundle), port=0, metrics_port=0, cache_size=0))
    yield srv
    srv.stop()


def test_archive_holds_handler_bundle_and_batch_config(tiny_worker, tiny_bundle, tmp_path):
    harness, names = tiny_worker
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert {"conceptlens_handler.py", "model-config.yaml", "MAR-INF/MANIFEST.json", "bundle/manifest.json"} <= set(names)
    assert {f"bundle/{n}" for n in manifest["files"]} <= set(names)  # model, head, bases, prototype index, crops
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin"))]
    assert harness.yaml["batchSize"] == 4 and harness.yaml["maxBatchDelay"] == 7
    assert harness.yaml["minWorkers"] == harness.yaml["maxWorkers"] == 1 and harness.yaml["handler"]["device"] == "auto"
    # an existing archive is kept unless --force; a bundle that is not one is a usage error
    store = tmp_path / "store"
    build_archive(tiny_bundle, store)
    assert cli.main(["torchserve-archive", "--bundle", str(tiny_bundle), "--out", str(store)]) == 2
    assert cli.main(["torchserve-archive", "--bundle", str(tmp_path / "nope"), "--out", str(store)]) == 2
    # the production config template keeps token authorization on
    prod = tmp_path / "prod.properties"
    assert cli.main(["torchserve-archive", "--bundle", str(tiny_bundle), "--out", str(store), "--force",
                     "--ts-config", str(prod)]) == 0
    assert "disable_token_authorization=false" in prod.read_text().splitlines()


def test_handler_answers_a_mixed_batch_like_the_service(tiny_worker, tiny_service):
    harness, _ = tiny_worker
    images = [jpeg_bytes(s, (96 + 16 * s, 80)) for s in range(5)]
    options = resolve(OPTIONS, [3, 5], TINY_CLASSES)
    crop = 224
    tensor = np.stack([np.random.default_rng(1).standard_normal((3, crop, crop)).astype(np.float32)] * 2)
    rows = [{"body": bytearray(images[0])},                                         # defaults, raw body
            {"data": images[1], "options": json.dumps(options[1]).encode()},       # gRPC-style input map
            {"body": {"image": base64.b64encode(images[2]).decode(), "options": options[2]}},  # JSON body
            {"data": images[3], "options": options[3]},                              # form field (JSON)
            {"body": images[4]},                                                     # options in a header
            {"body": b"this is not an image"},
            {"data": images[0], "options": b'{"classes": [{"name": "no such class"}]}'},
            {"data": images[0], "options": b'{"top_k": "many"}'},
            {"tensor": npy_bytes(tensor)},
            {"describe": b"1"}]
    headers = [{} for _ in rows]
    headers[4] = {"X-Conceptlens-Options": json.dumps(options[4])}
    answers = harness.batch(rows, headers)
    expected = service_answers(tiny_service.target, images, options)
    for i in range(5):
        status, ctype, body = answers[i]
        assert status == 200 and ctype == "application/json", body
        got = json.loads(body)
        assert got["timings"]["batch_size"] == 7  # five images and the two rows of the tensor: one pass
        got.pop("timings")
        assert_same(got, expected[i], f"request {i}")
    assert answers[5][0] == 400 and "could not be decoded" in json.loads(answers[5][2])["message"]
    assert answers[6][0] == 404 and "no such class" in json.loads(answers[6][2])["message"]
    assert answers[7][0] == 400 and json.loads(answers[7][2])["message"].startswith("options:")
    features, logits = read_npys(answers[8][2], 2)
    assert answers[8][1] == "application/octet-stream" and features.shape == (2, 8, 7, 7) and logits.shape == (2, 10)
    np.testing.assert_allclose(features[0], features[1])
    assert json.loads(answers[9][2])["bundle_id"] == json.loads(answers[0][2])["bundle_id"]
    # the worker keeps serving after the bad requests
    status, _, body = harness.batch([{"body": images[0]}])[0]
    assert status == 200 and json.loads(body)["predictions"]


def test_tensor_requests_are_checked(tiny_worker):
    harness, _ = tiny_worker
    bad = [{"tensor": npy_bytes(np.zeros((1, 3, 32, 32), np.float32))},
           {"tensor": npy_bytes(np.zeros((1, 3, 224, 224), np.float64))},
           {"tensor": b"\x93NUMPY garbage"}]
    for status, _, body in harness.batch(bad):
        assert status == 400 and "tensor" in json.loads(body)["message"]


# -- slow: a real TorchServe ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0_store(cifar_bundle, tmp_path_factory):
    store = tmp_path_factory.mktemp("ts-store")
    build_archive(cifar_bundle, store, "--batch-size", "8", "--max-batch-delay-ms", "200")
    return store


@pytest.fixture(scope="module")
def torchserve(lite0_store, tmp_path_factory):
    from conceptlens.handlers.ts_process import TorchServeProcess

    server = TorchServeProcess(lite0_store, ["conceptlens.mar"], tmp_path_factory.mktemp("ts-work"),
                               token_auth=False)  # off in tests only, explicitly
    try:
        server.start()
        server.wait_ready("conceptlens")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def lite0_service(cifar_bundle):
    srv = ServerThread(ServerConfig(bundle=str(cifar_bundle), port=0, metrics_port=0, cache_size=0,
                                    max_message_bytes=64 << 20))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ts_stubs(tmp_path_factory):
    """TorchServe's inference API stubs, generated here with grpc_tools.protoc."""
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("ts-proto")
    (out / "ts_inference.proto").write_text(TS_INFERENCE_PROTO)
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    assert protoc.main(["protoc", f"-I{out}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                        str(out / "ts_inference.proto")]) == 0
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("ts_inference_pb2"), importlib.import_module("ts_inference_pb2_grpc")
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="module")
def lite0_case(lite0_service):
    images = cifar_test_jpegs(10)
    with ExplainClient(lite0_service.target) as c:
        classes = c.list_classes()
    with_concepts = [x.class_id for x in classes.classes if x.has_concepts]
    names = [x.class_name for x in classes.classes]
    options = [resolve(OPTIONS[i % len(OPTIONS)], with_concepts, names) for i in range(len(images))]
    return images, options, service_answers(lite0_service.target, images, options)


def rest(server, image: bytes, options: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/octet-stream"}
    if options is not None:
        headers["X-Conceptlens-Options"] = json.dumps(options)
    req = urllib.request.Request(f"{server.inference_url}/predictions/conceptlens", data=image, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_torchserve_rest_and_grpc_match_the_service(torchserve, ts_stubs, lite0_case):
    images, options, expected = lite0_case
    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(lambda a: rest(torchserve, *a), zip(images, options)))
    assert all(status == 200 for status, _ in answers), answers
    assert max(a["timings"]["batch_size"] for _, a in answers) > 1  # mixed options shared forward passes
    for i, (_, got) in enumerate(answers):
        got.pop("timings")
        assert_same(got, expected[i], f"REST {i}")

    pb2, pb2_grpc = ts_stubs
    with grpc.insecure_channel(torchserve.grpc_target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb2_grpc.InferenceAPIsServiceStub(ch)

        def call(i):
            inputs = {"data": images[i], "options": json.dumps(options[i]).encode()}
            return json.loads(stub.Predictions(pb2.PredictionsRequest(model_name="conceptlens", input=inputs),
                                               timeout=120).prediction)
        with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
            grpc_answers = list(pool.map(call, range(len(images))))
    for i, got in enumerate(grpc_answers):
        got.pop("timings")
        assert_same(got, expected[i], f"gRPC {i}")


@pytest.mark.slow
def test_bad_image_gets_a_clear_error_and_the_worker_keeps_serving(torchserve, ts_stubs, lite0_case):
    images = lite0_case[0]
    pid = [w["pid"] for w in torchserve.wait_ready("conceptlens")["workers"]]
    bad = [b"this is not an image", images[0][: len(images[0]) // 3], b""]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # bad and good images in the same batches
        answers = list(pool.map(lambda im: rest(torchserve, im), bad + images[:3]))
    for status, body in answers[:3]:
        assert status == 400 and body["type"] == "InvalidArgument" and "image" in body["message"], body
    assert all(status == 200 and body["predictions"] for status, body in answers[3:])

    pb2, pb2_grpc = ts_stubs
    with grpc.insecure_channel(torchserve.grpc_target) as ch:
        stub = pb2_grpc.InferenceAPIsServiceStub(ch)
        # TorchServe's gRPC Predictions drops a handler's per-request status (the call is OK), so
        # the error is in the answer: the same JSON as the REST body.
        err = stub.Predictions(pb2.PredictionsRequest(model_name="conceptlens", input={"data": b"not an image"}),
                               timeout=60)
        body = json.loads(err.prediction)
        assert body["code"] == 400 and body["type"] == "InvalidArgument" and "could not be decoded" in body["message"]
        ok = stub.Predictions(pb2.PredictionsRequest(model_name="conceptlens", input={"data": images[1]}), timeout=60)
        assert json.loads(ok.prediction)["predictions"]
    assert [w["pid"] for w in torchserve.wait_ready("conceptlens")["workers"]] == pid  # same worker, alive


@pytest.mark.slow
def test_service_on_the_torchserve_runtime_answers_the_same(cifar_bundle, lite0_case, tmp_path):
    """Through a TorchServe with token authorization on, as in production."""
    from conceptlens.handlers.ts_process import TorchServeProcess

    images, options, expected = lite0_case
    # The service batches already: its TorchServe model takes one request at a time, no batch delay.
    store = tmp_path / "store"
    build_archive(cifar_bundle, store, "--model-name", "conceptlens-features", "--batch-size", "1")
    with TorchServeProcess(store, ["conceptlens-features.mar"], tmp_path / "ts", token_auth=True) as server:
        server.wait_ready("conceptlens-features")
        req = urllib.request.Request(f"{server.inference_url}/predictions/conceptlens-features", data=images[0],
                                     headers={"Content-Type": "application/octet-stream"})
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(req, timeout=60)
        assert "InvalidKeyException" in denied.value.read().decode()  # no key, no answer
        srv = ServeProcess(cifar_bundle, "--cache-size", "0", "--runtime", "torchserve",
                           "--torchserve-address", server.grpc_target, "--torchserve-model", "conceptlens-features",
                           "--torchserve-token-file", str(server.key_file), "--max-batch-size", "8",
                           log=tmp_path / "serve.log")
        try:
            srv.wait_ready(120)
            with ExplainClient(srv.target) as c:
                info = c.model_info()
                assert info.runtime == "torchserve" and info.providers[0].startswith("torchserve://")
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                got = list(pool.map(lambda a: service_answers(srv.target, [a[0]], [a[1]])[0],
                                    zip(images, options)))
            for i, answer in enumerate(got):
                assert_same(answer, expected[i], f"--runtime torchserve {i}")
        finally:
            srv.stop()
