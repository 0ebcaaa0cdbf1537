"""The Open Inference Protocol (KServe v2) against a real server process, through the stock
clients: tritonclient.http (REST, binary tensor extension) and tritonclient.grpc
(inference.GRPCInferenceService). The answers must equal the ExplainService's predictions."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptlens.service.bundle import load_bundle
from conceptlens.service.client import ExplainClient
from conceptlens.service.preprocess import preprocess
from conceptlens.service.serve_process import ServeProcess, free_port
from service_conftest import TINY_CLASSES, jpeg_bytes

tritonclient = pytest.importorskip("tritonclient")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

K = len(TINY_CLASSES)
SIZE = (320, 240)  # (w, h): resized to 341x256 and cropped, no reduced-size JPEG decode
IMAGES = [jpeg_bytes(seed, SIZE) for seed in (11, 12, 13)]
STATUS = {"http": {"not_found": "404", "invalid": "400"},
          "grpc": {"not_found": "StatusCode.NOT_FOUND", "invalid": "StatusCode.INVALID_ARGUMENT"}}


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("oip") / "serve.log"
    http_port = free_port()
    s = ServeProcess(tiny_bundle, "--http-host", "127.0.0.1", "--http-port", str(http_port), log=log)
    s.wait_ready(120)
    s.model = Path(tiny_bundle).resolve().name  # --bundle: the model is named after its directory
    s.http = f"127.0.0.1:{http_port}"
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(server):
    """The ExplainService's predictions of IMAGES: (logits (3, K), top-1 ids)."""
    with ExplainClient(server.target) as client:
        answers = [client.explain(img, top_k=0, num_predictions=K) for img in IMAGES]
    logits = np.zeros((len(IMAGES), K), np.float64)
    for i, a in enumerate(answers):
        assert len(a.predictions) == K
        for p in a.predictions:
            logits[i, p.class_id] = p.logit
    return logits, np.array([a.predictions[0].class_id for a in answers])


@pytest.fixture(scope="module")
def preprocessing(tiny_bundle):
    return load_bundle(tiny_bundle, verify=False).preprocessing


@pytest.fixture(scope="module", params=["http", "grpc"])
def transport(request, server):
    """(its name, the tritonclient module, a client) for each transport."""
    if request.param == "http":
        module, client = httpclient, httpclient.InferenceServerClient(url=server.http)
    else:
        module, client = grpcclient, grpcclient.InferenceServerClient(url=server.target)
    yield request.param, module, client
    client.close()


def infer(module, client, model, name, datatype, data, outputs=None, binary=True, **kw):
    x = module.InferInput(name, list(data.shape), datatype)
    if module is httpclient:
        x.set_data_from_numpy(data, binary_data=binary)
    else:
        x.set_data_from_numpy(data)
    return client.infer(model, [x], outputs=outputs, **kw)


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_health_and_metadata(server, transport):
    kind, module, client = transport
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(server.model)
    assert client.is_model_ready(server.model, "1")
    assert not client.is_model_ready("no-such-model")
    meta = client.get_server_metadata()
    name = meta["name"] if module is httpclient else meta.name
    assert name == "conceptlens"
    m = client.get_model_metadata(server.model)
    if module is grpcclient:  # tritonclient's own protobuf messages: the wire format matches
        m = {"name": m.name, "versions": list(m.versions), "platform": m.platform,
             "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in m.inputs],
             "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in m.outputs]}
    assert m["name"] == server.model and m["versions"] == ["1"]
    assert {o["name"]: o["shape"] for o in m["outputs"]} == {"logits": [-1, K], "probabilities": [-1, K]}
    assert {i["name"]: (i["datatype"], i["shape"]) for i in m["inputs"]} == {
        "image": ("BYTES", [-1]), "pixels": ("FP32", [-1, 3, 224, 224]), "rgb": ("UINT8", [-1, -1, -1, 3])}


def test_bytes_input_equals_explain(server, transport, reference):
    kind, module, client = transport
    logits_ref, top1 = reference
    r = infer(module, client, server.model, "image", "BYTES", np.array(IMAGES, dtype=np.object_))
    logits, probs = r.as_numpy("logits"), r.as_numpy("probabilities")
    assert logits.shape == probs.shape == (3, K) and logits.dtype == probs.dtype == np.float32
    np.testing.assert_allclose(logits, logits_ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(logits.argmax(1), top1)
    np.testing.assert_allclose(probs, softmax(logits_ref), atol=1e-6)
    resp = r.get_response()
    assert (resp["model_version"] if kind == "http" else resp.model_version) == "1"


def test_tensor_inputs_equal_bytes_path(server, transport, reference, preprocessing):
    kind, module, client = transport
    logits_ref, _ = reference
    pixels = np.stack([preprocess(img, preprocessing).input for img in IMAGES])  # (3, 3, 224, 224) float32
    r = infer(module, client, server.model, "pixels", "FP32", pixels)
    np.testing.assert_allclose(r.as_numpy("logits"), logits_ref, atol=1e-5, rtol=0)
    rgb = np.stack([np.asarray(Image.open(io.BytesIO(img)).convert("RGB")) for img in IMAGES])  # (3, 240, 320, 3)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, SIZE[1], SIZE[0], 3)
    r = infer(module, client, server.model, "rgb", "UINT8", rgb)
    np.testing.assert_allclose(r.as_numpy("logits"), logits_ref, atol=1e-5, rtol=0)


def test_requested_outputs_and_classification(server, transport, reference):
    kind, module, client = transport
    logits_ref, _ = reference
    outputs = [module.InferRequestedOutput("probabilities"), module.InferRequestedOutput("logits", class_count=3)]
    r = infer(module, client, server.model, "image", "BYTES", np.array(IMAGES, dtype=np.object_), outputs=outputs)
    np.testing.assert_allclose(r.as_numpy("probabilities"), softmax(logits_ref), atol=1e-6)
    top3 = r.as_numpy("logits")  # BYTES "value:index:label", highest first
    assert top3.shape == (3, 3)
    for i in range(3):
        ids = [int(e.decode().split(":")[1]) for e in top3[i]]
        assert ids == list(np.argsort(-logits_ref[i], kind="stable")[:3])
        assert [e.decode().split(":", 2)[2] for e in top3[i]] == [TINY_CLASSES[j] for j in ids]
        assert float(top3[i][0].decode().split(":")[0]) == pytest.approx(logits_ref[i].max(), abs=1e-5)
    r = infer(module, client, server.model, "image", "BYTES", np.array(IMAGES[:1], dtype=np.object_),
              outputs=[module.InferRequestedOutput("probabilities")])
    assert r.as_numpy("logits") is None and r.as_numpy("probabilities").shape == (1, K)


def test_http_json_tensors(server, reference):
    """REST without the binary extension: UINT8 data and the outputs as JSON (a gzipped request)."""
    logits_ref, _ = reference
    rgb = np.asarray(Image.open(io.BytesIO(IMAGES[0])).convert("RGB"))[None]
    client = httpclient.InferenceServerClient(url=server.http)
    try:
        r = infer(httpclient, client, server.model, "rgb", "UINT8", rgb, binary=False,
                  outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)], request_id="abc",
                  request_compression_algorithm="gzip")
        resp = r.get_response()
        assert resp["id"] == "abc" and "data" in resp["outputs"][0]
        np.testing.assert_allclose(r.as_numpy("logits"), logits_ref[:1], atol=1e-5, rtol=0)
    finally:
        client.close()


def test_errors(server, transport):
    kind, module, client = transport
    status = STATUS[kind]
    image = np.array(IMAGES[:1], dtype=np.object_)
    with pytest.raises(InferenceServerException) as e:
        infer(module, client, "no-such-model", "image", "BYTES", image)
    assert e.value.status() == status["not_found"] and "no-such-model" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        infer(module, client, server.model, "image", "BYTES", image, model_version="7")
    assert e.value.status() == status["not_found"]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no-such-model")
    assert e.value.status() == status["not_found"]
    bad = np.array([IMAGES[0], b"this is not an image, it is a sentence."], dtype=np.object_)
    with pytest.raises(InferenceServerException) as e:
        infer(module, client, server.model, "image", "BYTES", bad)
    assert e.value.status() == status["invalid"] and "image" in e.value.message()
    with pytest.raises(InferenceServerException) as e:  # not the model's input size
        infer(module, client, server.model, "pixels", "FP32", np.zeros((1, 3, 32, 32), np.float32))
    assert e.value.status() == status["invalid"] and "224" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        infer(module, client, server.model, "x", "INT32", np.zeros((1, 4), np.int32))
    assert e.value.status() == status["invalid"]
    with pytest.raises(InferenceServerException) as e:
        infer(module, client, server.model, "image", "BYTES", image, outputs=[module.InferRequestedOutput("nope")])
    assert e.value.status() == status["invalid"] and "nope" in e.value.message()


def test_plain_json_and_typed_contents(server, reference):
    """Without tritonclient's defaults: REST with base64 BYTES in JSON (MLServer's content_type) and
    the error object; gRPC with typed contents (bytes_contents) instead of raw_input_contents."""
    import base64
    import json
    import urllib.error
    import urllib.request

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    logits_ref, _ = reference
    body = {"id": "q", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {
        "content_type": "base64"}, "data": [base64.b64encode(img).decode() for img in IMAGES[:2]]}]}
    url = f"http://{server.http}/v2/models/{server.model}/infer"
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    resp = json.loads(urllib.request.urlopen(req, timeout=30).read())
    out = {o["name"]: o for o in resp["outputs"]}
    assert resp["model_name"] == server.model and resp["id"] == "q" and out["logits"]["shape"] == [2, K]
    np.testing.assert_allclose(np.array(out["logits"]["data"]).reshape(2, K), logits_ref[:2], atol=1e-5, rtol=0)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{server.http}/v2/models/no-such-model", timeout=30)
    assert e.value.code == 404 and "no-such-model" in json.loads(e.value.read())["error"]

    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name=server.model)
        x = request.inputs.add(name="image", datatype="BYTES", shape=[1])
        x.contents.bytes_contents.append(IMAGES[2])
        answer = stub.ModelInfer(request, timeout=30)
    names = [o.name for o in answer.outputs]
    logits = np.frombuffer(answer.raw_output_contents[names.index("logits")], np.float32)
    np.testing.assert_allclose(logits, logits_ref[2], atol=1e-5, rtol=0)
