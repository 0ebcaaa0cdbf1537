"""The gRPC server on a real port with a real (tiny) bundle and real ONNX Runtime.

Answers match the explain core run locally; the identity holds; errors map to the right codes and
leave the server serving; health, reflection, auth, drain, queue limits and deadlines behave.
"""
from __future__ import annotations

import io
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image
from service_conftest import (ServerThread, assert_identity, bad_inputs, cmyk_jpeg_bytes, jpeg_bytes,
                              png16_bytes)

from conceptlens.service.bundle import load_bundle
from conceptlens.service.client import ExplainClient, heatmap_array
from conceptlens.service.config import ServerConfig
from conceptlens.service.explain import Explainer
from conceptlens.service.metrics import metric_value
from conceptlens.service.preprocess import preprocess_bytes
from conceptlens.service.runtime import OnnxRuntime
from conceptlens.service.serve_process import free_port
from conceptlens.v1 import explain_service_pb2 as pb

IMAGE = jpeg_bytes(7, (320, 240))


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = ServerThread(ServerConfig(bundle=str(tiny_bundle), port=0, metrics_port=free_port(),
                                    metrics_host="127.0.0.1", max_message_bytes=2 << 20, workers=2))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with ExplainClient(server.target, max_message_bytes=8 << 20) as c:
        yield c


@pytest.fixture(scope="module")
def local(tiny_bundle):
    """The explain core run directly on the same bundle, for comparison."""
    bundle = load_bundle(tiny_bundle)
    runtime = OnnxRuntime(bundle.model_path, device="cpu")
    explainer = Explainer(bundle)

    def explain(image: bytes, cid: int, contrast=None):
        x, _ = preprocess_bytes(image, bundle.preprocessing)
        f, lg = runtime.run(x[None])
        return explainer.explain(f[0], lg[0], cid, contrast=contrast), lg[0]
    return explain


@pytest.fixture(scope="module")
def own_logits(tiny_bundle):
    """image -> (W . GAP(A) + b (K,), GAP(A) (C,)), float64, from the model's features and the bundle's
    head computed here: the logits every answer must carry, independently of the explain code."""
    bundle = load_bundle(tiny_bundle)
    runtime = OnnxRuntime(bundle.model_path, device="cpu")
    w, b = bundle.head_weight.astype(np.float64), bundle.head_bias.astype(np.float64)

    def logits(image: bytes):
        x, _ = preprocess_bytes(image, bundle.preprocessing)
        f, _ = runtime.run(x[None])
        gap = f[0].astype(np.float64).mean(axis=(1, 2))
        return w @ gap + b, gap
    return logits


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_health_and_model_info(client, tiny_bundle):
    assert client.health() == "SERVING"
    assert client.health("conceptlens.v1.ExplainService") == "SERVING"
    info = client.model_info()
    bundle = load_bundle(tiny_bundle)
    assert info.bundle_id == bundle.bundle_id and info.num_classes == 10 and info.num_explained_classes == 8
    assert list(info.feature_shape) == [8, 7, 7] and info.providers == ["CPUExecutionProvider"]
    assert info.runtime == "onnxruntime" and info.head_kind == "linear" and info.crop == 224


def test_explain_matches_the_core_and_the_identity_holds(client, local, own_logits):
    resp = client.explain(IMAGE, classes=[3, "thing5"], heatmaps="raw")
    assert [x.class_id for x in resp.explanations] == [3, 5]
    assert_identity(resp)
    own, _ = own_logits(IMAGE)
    for x in resp.explanations:
        want, logits = local(IMAGE, x.class_id)
        assert x.logit == pytest.approx(float(logits[x.class_id]), abs=1e-4)
        assert x.logit == pytest.approx(float(own[x.class_id]), rel=1e-4, abs=1e-4)
        assert x.bias == pytest.approx(want.bias, abs=1e-6)
        assert x.residual == pytest.approx(want.residual, abs=1e-4)
        assert [c.concept_id for c in x.concepts] == [c.concept for c in want.concepts]
        for got, exp in zip(x.concepts, want.concepts):
            assert got.contribution == pytest.approx(exp.contribution, abs=1e-4)
            assert got.presence == pytest.approx(exp.presence, abs=1e-5)
            grid = heatmap_array(got.heatmap)
            assert grid.shape == (7, 7)
            np.testing.assert_allclose(grid, exp.heatmap, atol=got.heatmap.scale * 0.51 + 1e-6)
    assert [p.class_id for p in resp.predictions] == list(np.argsort(-own, kind="stable")[:5])
    probs = np.exp(own - own.max()) / np.exp(own - own.max()).sum()
    np.testing.assert_allclose([p.probability for p in resp.predictions], probs[[p.class_id for p in resp.predictions]],
                               rtol=1e-3)
    assert len(resp.predictions) == 5 and resp.bundle_id
    t = resp.timings
    assert t.batch_size >= 1 and t.total_seconds > 0 and not resp.cache_hit
    assert resp.image.width == 320 and resp.image.height == 240
    crop = resp.image.crop  # resize 256 -> 341x256, center 224 crop, mapped back to 320x240
    assert (crop.x0, crop.y0, crop.x1, crop.y1) == (54, 15, 265, 225)


def test_default_is_top_1_and_top_k_0_is_predictions_only(client, own_logits):
    own, _ = own_logits(jpeg_bytes(11))
    top1 = int(np.argmax(own))  # the argmax of the logits computed here, not the answer's own ranking
    one = client.explain(jpeg_bytes(11))
    assert len(one.explanations) == 1 and one.explanations[0].class_id == one.predictions[0].class_id == top1
    assert one.explanations[0].logit == pytest.approx(float(own[top1]), rel=1e-4, abs=1e-4)
    assert_identity(one)
    alone = client.explain(jpeg_bytes(11), num_predictions=0)  # the top class found without a ranking
    assert len(alone.predictions) == 0 and [x.class_id for x in alone.explanations] == [top1]
    plain = client.explain(jpeg_bytes(11), top_k=0, num_predictions=3)
    assert len(plain.explanations) == 0
    assert [p.class_id for p in plain.predictions] == list(np.argsort(-own, kind="stable")[:3])


def test_top_k_class_without_concepts_is_all_residual(client, own_logits, tiny_bundle):
    """A class without concepts answers its logit W[y] . GAP(A) + b[y] as residual W[y] . GAP(A) plus
    bias b[y], both computed here (the identity alone holds for it by construction)."""
    resp = client.explain(IMAGE, top_k=10)
    assert len(resp.explanations) == 10
    assert_identity(resp)
    own, gap = own_logits(IMAGE)
    bundle = load_bundle(tiny_bundle)
    assert [x.class_id for x in resp.explanations] == list(np.argsort(-own, kind="stable"))
    lonely = [x for x in resp.explanations if x.class_id in (8, 9)]
    assert len(lonely) == 2
    assert all("no_concepts" in x.flags and not x.concepts and x.relative_residual == 1.0 for x in lonely)
    for x in lonely:
        assert x.logit == pytest.approx(float(own[x.class_id]), rel=1e-4, abs=1e-4)
        assert x.bias == pytest.approx(float(bundle.head_bias[x.class_id]), abs=1e-6)
        assert x.residual == pytest.approx(float(bundle.head_weight[x.class_id].astype(np.float64) @ gap),
                                           rel=1e-4, abs=1e-4)


def test_contrast_max_concepts_flags_and_prototypes(client, local, tiny_bundle):
    resp = client.explain(IMAGE, classes=["thing2"], contrast="thing4", max_concepts=1, prototypes=1,
                          prototype_jpeg=True)
    (x,) = resp.explanations
    assert x.contrast_class_id == 4 and x.contrast_class_name == "thing4"
    assert len(x.concepts) == 1 and x.num_concepts == 3 and x.omitted_contribution != 0
    assert_identity(resp)
    want, logits = local(IMAGE, 2, contrast=4)
    assert x.logit == pytest.approx(float(logits[2] - logits[4]), abs=1e-4)
    assert x.flags == ["failed_stitched_prototype_test"]  # class 2 failed its evaluation
    (proto,) = x.concepts[0].prototypes
    assert proto.jpeg == (tiny_bundle / proto.file).read_bytes()
    assert Image.open(io.BytesIO(proto.jpeg)).format == "JPEG" and proto.box.x1 == 32
    refs = client.explain(IMAGE, classes=[0])  # default: 3 per concept, references only
    assert all(len(c.prototypes) == 2 and not c.prototypes[0].jpeg for c in refs.explanations[0].concepts)
    assert all(not c.prototypes for c in client.explain(IMAGE, classes=[0], prototypes=0).explanations[0].concepts)


def test_png_overlay_is_at_image_size_and_transparent_outside_the_crop(client):
    resp = client.explain(IMAGE, classes=[1], heatmaps="png")
    c = resp.explanations[0].concepts[0]
    assert c.heatmap.format == pb.HEATMAP_FORMAT_PNG_OVERLAY and c.heatmap.scale > 0
    png = Image.open(io.BytesIO(c.heatmap.data))
    assert png.format == "PNG" and png.size == (320, 240) == (c.heatmap.width, c.heatmap.height)
    alpha = np.asarray(png.convert("RGBA"))[..., 3]
    box = resp.image.crop
    assert alpha[:, :box.x0].max() == 0 and alpha[:, box.x1:].max() == 0 and alpha[:box.y0].max() == 0
    assert alpha[box.y0:box.y1, box.x0:box.x1].max() > 0


def test_png_overlay_of_a_large_image_is_capped_keeping_the_aspect_ratio(client):
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((2048, 1536)).convert("RGB").save(buf, format="JPEG")
    resp = client.explain(buf.getvalue(), classes=[1], heatmaps="png", max_concepts=1)
    hm = resp.explanations[0].concepts[0].heatmap
    assert (hm.width, hm.height) == (1024, 768) == Image.open(io.BytesIO(hm.data)).size
    assert (resp.image.width, resp.image.height) == (2048, 1536)


def test_cmyk_and_16_bit_images_are_explained(client):
    for data in (cmyk_jpeg_bytes(3), png16_bytes(4)):
        resp = client.explain(data, top_k=2)
        assert len(resp.explanations) == 2
        assert_identity(resp)


def test_bad_inputs_get_the_right_codes_and_the_server_keeps_serving(client, server):
    def counted(code: str) -> float:
        return metric_value(server.metrics_text(), "conceptlens_requests_total", method="Explain", code=code)
    before = {code: counted(code) for code in ("INVALID_ARGUMENT", "NOT_FOUND")}
    for name, data in bad_inputs(IMAGE).items():
        assert code_of(lambda: client.explain(data)) == grpc.StatusCode.INVALID_ARGUMENT, name
    big = Image.new("L", (8000, 6000))  # declared 48 MP > the 40 MP limit (never decoded)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(grpc.RpcError) as e:
        client.explain(buf.getvalue())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pixels" in e.value.details()
    cases = {
        "unknown class name": (dict(classes=["no such class"]), grpc.StatusCode.NOT_FOUND),
        "class id out of range": (dict(classes=[999]), grpc.StatusCode.NOT_FOUND),
        "class without concepts": (dict(classes=["lonely"]), grpc.StatusCode.NOT_FOUND),
        "unknown contrast": (dict(classes=[1], contrast="nope"), grpc.StatusCode.NOT_FOUND),
        "contrast equals class": (dict(classes=[1], contrast=1), grpc.StatusCode.INVALID_ARGUMENT),
        "negative top_k": (dict(top_k=-1), grpc.StatusCode.INVALID_ARGUMENT),
        "too many classes": (dict(top_k=100), grpc.StatusCode.INVALID_ARGUMENT),
    }
    for name, (opts, code) in cases.items():
        with pytest.raises(grpc.RpcError) as e:
            client.explain(IMAGE, **opts)
        assert e.value.code() == code, name
        assert "Traceback" not in e.value.details() and e.value.details(), name
    huge = b"\xff\xd8\xff" + bytes(3 << 20)  # over the server's 2 MiB message limit
    assert code_of(lambda: client.explain(huge)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    bad_enum = pb.ExplainRequest(image=IMAGE, options=pb.ExplainOptions(heatmap_format=42))
    assert code_of(lambda: client.stub.Explain(bad_enum, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    assert client.health() == "SERVING"
    assert_identity(client.explain(IMAGE, top_k=3))
    # each refusal counted once under its code: 6 bad images, the 48 MP PNG, 3 bad options, the bad enum
    assert counted("INVALID_ARGUMENT") == before["INVALID_ARGUMENT"] + len(bad_inputs(IMAGE)) + 5
    assert counted("NOT_FOUND") == before["NOT_FOUND"] + 4


def test_same_image_twice_hits_the_cache(client, server):
    image = jpeg_bytes(12345, (100, 80))
    before = metric_value(server.metrics_text(), "conceptlens_cache_hits_total", backend="memory")
    first = client.explain(image, top_k=2, heatmaps="raw")
    second = client.explain(image, top_k=2, heatmaps="raw")
    other_options = client.explain(image, top_k=1)
    assert not first.cache_hit and second.cache_hit and not other_options.cache_hit
    assert list(second.explanations) == list(first.explanations)
    assert list(second.predictions) == list(first.predictions)
    assert second.timings.decode_seconds == 0 and second.timings.total_seconds > 0
    assert metric_value(server.metrics_text(), "conceptlens_cache_hits_total", backend="memory") == before + 1


def test_class_catalog(client):
    listed = client.list_classes()
    assert [c.class_name for c in listed.classes][:2] == ["thing0", "thing1"] and len(listed.classes) == 10
    assert [c.class_id for c in client.list_classes(with_concepts_only=True).classes] == list(range(8))
    cc = client.class_concepts("thing2", prototypes=1, jpeg=True)
    assert cc.class_id == 2 and len(cc.concepts) == 3 and cc.flags == ["failed_stitched_prototype_test"]
    assert cc.metrics["held_out.ice_fidelity"] == pytest.approx(0.12)  # the keys real bundles have
    assert all(len(c.prototypes) == 1 and c.prototypes[0].jpeg for c in cc.concepts)
    assert code_of(lambda: client.class_concepts("lonely")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.stub.GetClassConcepts(pb.GetClassConceptsRequest(), timeout=5)) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_stream_answers_each_item_and_survives_bad_ones(client):
    items = [(f"img{i}", jpeg_bytes(100 + i)) for i in range(6)] + [("bad", b"nope")]
    answers = {r.item_id: r for r in client.explain_many(items, top_k=1)}
    assert set(answers) == {i for i, _ in items}
    assert answers["bad"].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "decoded" in answers["bad"].status.message
    for i in range(6):
        r = answers[f"img{i}"]
        assert r.status.code == 0 and len(r.response.explanations) == 1
        assert_identity(r.response)


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5)
        names = {s.name for s in answer.list_services_response.service}
    assert {"conceptlens.v1.ExplainService", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint(server, client):
    client.explain(jpeg_bytes(5), top_k=1)
    port = server.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in ("conceptlens_requests_total", "conceptlens_stage_duration_seconds_bucket",
                 "conceptlens_batch_size_bucket", "conceptlens_queue_depth", "conceptlens_concept_presence_bucket",
                 "conceptlens_relative_residual_bucket", "conceptlens_residual_bucket", "conceptlens_ready",
                 "conceptlens_bundle_info"):
        assert name in text, name
    for stage in ("decode", "queue", "inference", "explain", "encode", "cache"):
        assert metric_value(text, "conceptlens_stage_duration_seconds_count", stage=stage) > 0, stage
    assert metric_value(text, "conceptlens_ready") == 1


def test_per_class_series_are_bounded_the_rest_are_other():
    """The first N classes explained keep their own presence and residual series for good; later
    classes add their residuals to class_id="other" and no presences (concept j differs per class)."""
    from conceptlens.service.metrics import Metrics

    m = Metrics(concept_metrics_classes=3)
    for cid in (4, 0, 7, 4, 9, 1, 9, 0):  # 4, 0, 7 come first; 9 and 1 come after the bound is reached
        m.explanation(cid, f"c{cid}", np.full(2, 0.5), residual=0.25, relative=0.1)
    text = m.text().decode()
    labelled = {ln.split('class_id="')[1].split('"')[0] for ln in text.splitlines()
                if 'class_id="' in ln and not ln.startswith("#")}
    assert labelled == {"4", "0", "7", "other"}
    assert metric_value(text, "conceptlens_residual_count", class_id="4") == 2
    assert metric_value(text, "conceptlens_residual_count", class_id="0") == 2
    assert metric_value(text, "conceptlens_residual_count", class_id="other", class_name="other") == 3
    assert metric_value(text, "conceptlens_relative_residual_count", class_id="other") == 3
    assert metric_value(text, "conceptlens_concept_presence_count", class_id="7", concept="1") == 1
    assert metric_value(text, "conceptlens_concept_presence_count", class_id="other") == 0
    with pytest.raises(ValueError):
        Metrics(concept_metrics_classes=-1)
    none = Metrics(concept_metrics_classes=0)  # 0: every class in "other"
    none.explanation(2, "c2", np.ones(3), residual=1.0, relative=0.5)
    assert metric_value(none.text().decode(), "conceptlens_residual_count", class_id="other") == 1
    assert 'class_id="2"' not in none.text().decode()


def test_server_bounds_per_class_series(tiny_bundle):
    srv = ServerThread(ServerConfig(bundle=str(tiny_bundle), port=0, metrics_port=0, cache_size=0,
                                    concept_metrics_classes=2, no_warmup=True))
    try:
        with ExplainClient(srv.target) as c:
            c.explain(IMAGE, classes=[5, 3, 0, 1])
            c.explain(jpeg_bytes(3), classes=[1, 5])
        text = srv.metrics_text()
        assert metric_value(text, "conceptlens_residual_count", class_id="5") == 2
        assert metric_value(text, "conceptlens_residual_count", class_id="3") == 1
        assert metric_value(text, "conceptlens_residual_count", class_id="other") == 3  # 0, 1 and 1 again
        assert 'class_id="0"' not in text and 'class_id="1"' not in text
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="concept-metrics-classes"):
        ServerConfig(bundle="b", concept_metrics_classes=-1).validate()


# -- servers of their own: auth, drain, queue limits, deadlines ------------------------------------
class GatedRuntime:
    """The real ONNX runtime behind a gate the test opens and closes."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.providers, self.max_batch_size = inner.name, inner.providers, inner.max_batch_size
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run(self, batch):
        self.entered.set()
        assert self.gate.wait(30)
        return self.inner.run(batch)

    def close(self):
        self.inner.close()


def gated_server(bundle_dir, **settings):
    bundle = load_bundle(bundle_dir)
    runtime = GatedRuntime(OnnxRuntime(bundle.model_path, device="cpu"))
    cfg = ServerConfig(bundle=str(bundle_dir), port=0, metrics_port=0, cache_size=0, **settings)
    return ServerThread(cfg, bundle=bundle, runtime=runtime), runtime


def test_bearer_token(tiny_bundle):
    srv = ServerThread(ServerConfig(bundle=str(tiny_bundle), port=0, metrics_port=0, auth_token="s3cret",
                                    no_warmup=True))
    try:
        with ExplainClient(srv.target) as anonymous, ExplainClient(srv.target, token="wrong") as wrong, \
                ExplainClient(srv.target, token="s3cret") as good:
            assert anonymous.health() == "SERVING"  # health checks need no token
            assert code_of(lambda: anonymous.explain(IMAGE)) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda: wrong.model_info()) == grpc.StatusCode.UNAUTHENTICATED
            assert_identity(good.explain(IMAGE, top_k=2))
    finally:
        srv.stop()


def test_metrics_behind_the_token_on_loopback(tiny_bundle):
    """--metrics-auth: /metrics answers 401 without the token or with a wrong one, the text with it;
    --metrics-host 127.0.0.1 binds it to loopback only."""
    import urllib.error
    import urllib.request

    from conceptlens.service.serve_process import free_port

    cfg = ServerConfig(bundle=str(tiny_bundle), port=0, metrics_port=free_port(), metrics_host="127.0.0.1",
                       auth_token="s3cret", metrics_auth=True, no_warmup=True)
    srv = ServerThread(cfg)
    try:
        port = srv.server.metrics_port
        url = f"http://127.0.0.1:{port}/metrics"

        def scrape(header: str | None):
            req = urllib.request.Request(url, headers={"Authorization": header} if header else {})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.headers.get("WWW-Authenticate")

        assert scrape(None) == (401, "Bearer")
        assert scrape("Bearer wrong") == (401, "Bearer")
        assert scrape("Bearer s3cret!")[0] == 401  # a prefix match is not a match
        status, text = scrape("Bearer s3cret")
        assert status == 200 and "conceptlens_ready 1.0" in text
        bound = srv.server.metrics._http.server_address[0]
        assert bound == "127.0.0.1"
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="metrics-auth needs a token"):
        ServerConfig(bundle=str(tiny_bundle), metrics_auth=True).validate()


def test_full_queue_is_resource_exhausted(tiny_bundle):
    srv, runtime = gated_server(tiny_bundle, max_batch_size=1, max_queue_size=1)
    try:
        with ExplainClient(srv.target) as c:
            runtime.gate.clear()
            runtime.entered.clear()
            first = c.stub.Explain.future(pb.ExplainRequest(image=IMAGE), timeout=30)
            assert runtime.entered.wait(10)  # first is inside the model
            second = c.stub.Explain.future(pb.ExplainRequest(image=IMAGE), timeout=30)
            deadline = time.monotonic() + 10
            while srv.server.batcher.depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert code_of(lambda: c.explain(IMAGE)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            runtime.gate.set()
            assert len(first.result().explanations) == 1 and len(second.result().explanations) == 1
            assert metric_value(srv.metrics_text(), "conceptlens_dropped_total", reason="queue_full") == 1
    finally:
        runtime.gate.set()
        srv.stop()


def test_expired_deadline_is_dropped_before_inference(tiny_bundle):
    srv, runtime = gated_server(tiny_bundle, max_batch_size=4)
    try:
        with ExplainClient(srv.target) as c:
            runtime.gate.clear()
            runtime.entered.clear()
            first = c.stub.Explain.future(pb.ExplainRequest(image=IMAGE), timeout=30)
            assert runtime.entered.wait(10)
            assert code_of(lambda: c.explain(IMAGE, timeout=0.3)) == grpc.StatusCode.DEADLINE_EXCEEDED
            runtime.gate.set()
            first.result()
            batches_before = metric_value(srv.metrics_text(), "conceptlens_batch_size_count")  # the first's
            c.explain(IMAGE)  # the queue moved on
            text = srv.metrics_text()
            assert metric_value(text, "conceptlens_dropped_total") == 1  # cancelled or deadline
            assert metric_value(text, "conceptlens_batch_size_sum") == batches_before + 1  # expired never inferred
            assert metric_value(text, "conceptlens_inflight_requests") == 0  # the dropped call gave its place back
            assert srv.server._admitted == 0
    finally:
        runtime.gate.set()
        srv.stop()


def test_drain_finishes_in_flight_and_refuses_new_calls(tiny_bundle):
    srv, runtime = gated_server(tiny_bundle, drain_delay_s=1.0)
    try:
        with ExplainClient(srv.target) as c:
            runtime.gate.clear()
            runtime.entered.clear()
            in_flight = c.stub.Explain.future(pb.ExplainRequest(image=IMAGE), timeout=30)
            assert runtime.entered.wait(10)
            import asyncio

            stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(grace=20), srv.loop)
            deadline = time.monotonic() + 10
            while c.health() != "NOT_SERVING" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert c.health() == "NOT_SERVING"  # announced for drain_delay_s, then the port closes
            assert code_of(lambda: c.explain(IMAGE, timeout=5)) == grpc.StatusCode.UNAVAILABLE
            runtime.gate.set()
            assert len(in_flight.result().explanations) == 1  # finished, not cut off
            stopping.result(30)
    finally:
        runtime.gate.set()
        srv.stop()
