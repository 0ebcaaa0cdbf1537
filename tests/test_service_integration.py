"""End to end: `conceptlens serve` as a process on a real port, the real EfficientNet-Lite0 CIFAR-10
bundle (``cifar_bundle``), real ONNX Runtime, a real Redis (a private redis-server) and the real
Prometheus endpoint.

CMYK JPEGs and 16-bit PNGs are *accepted* (converted to RGB, 16-bit scaled to 8 bits) and
explained; everything undecodable or too large is INVALID_ARGUMENT (RESOURCE_EXHAUSTED for a
message over the size limit).
"""
from __future__ import annotations

import concurrent.futures
import io
from html import escape
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import cifar_test_jpegs
from PIL import Image
from service_conftest import RedisProcess, assert_identity, bad_inputs, png16_bytes

from conceptlens.service import cli
from conceptlens.service.bundle import load_bundle
from conceptlens.service.client import ExplainClient
from conceptlens.service.metrics import metric_value
from conceptlens.service.preprocess import preprocess_bytes
from conceptlens.service.runtime import open_session
from conceptlens.service.serve_process import ServeProcess
from conceptlens.v1 import explain_service_pb2 as pb

pytestmark = pytest.mark.slow

MAX_MESSAGE = 4 << 20




@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    r = RedisProcess(tmp_path_factory.mktemp("redis"))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def served(cifar_bundle, redis, tmp_path_factory):
    srv = ServeProcess(cifar_bundle, "--max-message-bytes", str(MAX_MESSAGE), "--redis-retry-s", "0.3",
                       "--max-batch-size", "8", "--drain-delay-s", "0.3",
                       "--cache-size", "0",  # Redis alone: these tests are about Redis
                       log=tmp_path_factory.mktemp("serve") / "serve.log",
                       env={"CONCEPTLENS_REDIS_URL": redis.url})  # flags also come from the environment
    try:
        srv.wait_ready(180)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(served):
    with ExplainClient(served.target, max_message_bytes=16 << 20) as c:
        yield c


@pytest.fixture(scope="module")
def images():
    return cifar_test_jpegs(24)


def test_identity_holds_in_every_answer(client, images, cifar_bundle):
    info = client.model_info()
    assert info.model_name == "efficientnet-lite0" and list(info.feature_shape) == [1280, 7, 7]
    assert info.num_explained_classes >= 1
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent: the batcher forms batches
        answers = list(pool.map(lambda im: client.explain(im, top_k=3, heatmaps="raw", prototypes=1,
                                                          prototype_jpeg=True), images))
    # the model at hand: its own logits on the same images, and its head W . GAP(A) + b computed here
    bundle = load_bundle(cifar_bundle)
    x = np.stack([preprocess_bytes(im, bundle.preprocessing)[0] for im in images])
    feats, own = open_session(bundle.model_path, ["CPUExecutionProvider"]).run(["features", "logits"], {"image": x})
    gaps = feats.astype(np.float64).mean(axis=(2, 3))
    w, b = bundle.head_weight.astype(np.float64), bundle.head_bias.astype(np.float64)
    np.testing.assert_allclose(own, gaps @ w.T + b, rtol=1e-4, atol=1e-4 * float(np.abs(own).max()))
    explained = 0
    for resp, lg, gap in zip(answers, own.astype(np.float64), gaps):
        assert resp.bundle_id == info.bundle_id and len(resp.explanations) == 3 and len(resp.predictions) == 5
        assert_identity(resp)
        tol = 1e-4 * max(1.0, float(np.abs(lg).max()))
        assert lg[resp.predictions[0].class_id] >= lg.max() - tol  # top-1 is the model's argmax
        for x in resp.explanations:
            assert abs(x.logit - lg[x.class_id]) <= tol, (x.class_id, x.logit, lg[x.class_id])
            if "no_concepts" in x.flags:  # all residual, with the bias: both from the head computed here
                assert x.bias == pytest.approx(b[x.class_id], abs=1e-6)
                assert abs(x.residual - w[x.class_id] @ gap) <= tol
        for x in resp.explanations:
            if x.concepts:
                explained += 1
                assert x.concepts[0].heatmap.height == 7 and len(x.concepts[0].heatmap.data) == 49
                assert all(p.jpeg[:2] == b"\xff\xd8" for c in x.concepts for p in c.prototypes)
    assert explained > 0
    with_concepts = [c.class_id for c in client.list_classes(with_concepts_only=True).classes]
    a, b = with_concepts[0], (with_concepts[1] if len(with_concepts) > 1 else (with_concepts[0] + 1) % 1000)
    contrast = client.explain(images[0], classes=[a], contrast=b, max_concepts=2)
    assert_identity(contrast)
    assert contrast.explanations[0].contrast_class_id == b
    cc = client.class_concepts(a, prototypes=2, jpeg=True)
    assert len(cc.concepts) == 5 and all(len(c.prototypes) <= 2 for c in cc.concepts)


def test_same_image_twice_hits_the_cache(client, served, images):
    image = images[5]
    before = metric_value(served.metrics(), "conceptlens_cache_hits_total", backend="redis")
    first = client.explain(image, top_k=2, heatmaps="png")
    second = client.explain(image, top_k=2, heatmaps="png")
    assert not first.cache_hit and second.cache_hit
    assert list(first.explanations) == list(second.explanations)
    assert_identity(second)
    after = metric_value(served.metrics(), "conceptlens_cache_hits_total", backend="redis")
    assert after == before + 1
    text = served.metrics()
    assert metric_value(text, "conceptlens_concept_presence_count") > 0
    assert metric_value(text, "conceptlens_batch_size_count") > 0


def test_redis_stopped_mid_test_costs_no_failed_request(client, served, redis, images):
    failures, answers, stop = [], [], threading.Event()

    def load():
        i = 0
        while not stop.is_set():
            try:
                resp = client.explain(images[i % 8], top_k=1)  # repeats: hits while Redis is up
                assert_identity(resp)
                answers.append(resp.cache_hit)
            except Exception as e:  # noqa: BLE001 - any failure counts
                failures.append(repr(e))
            i += 1

    def wait_for(condition, what: str, timeout: float = 30.0) -> None:
        """Poll the test's own state (answers, the server's metrics): no fixed sleep decides anything."""
        end = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            time.sleep(0.05)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    wait_for(lambda: any(answers), "a cache hit while Redis is up")
    errors_before = metric_value(served.metrics(), "conceptlens_cache_errors_total")
    redis.stop()
    n_down = len(answers)
    wait_for(lambda: metric_value(served.metrics(), "conceptlens_cache_errors_total") > errors_before,
             "the server to notice Redis is gone")
    wait_for(lambda: len(answers) >= n_down + 20, "20 answers served without Redis")
    redis.start()  # same port, empty
    n_up = len(answers)
    wait_for(lambda: any(answers[n_up:]), "a cache hit after Redis came back (it reconnects by itself)")
    stop.set()
    for w in workers:
        w.join(30)
    assert failures == []


def _cmyk(image: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("CMYK").save(out, format="JPEG")
    return out.getvalue()


def test_bad_inputs_get_the_right_codes_and_the_server_keeps_serving(client, images):
    def code(**kw):
        with pytest.raises(grpc.RpcError) as e:
            client.explain(**kw)
        assert "Traceback" not in (e.value.details() or "")
        return e.value.code()

    for name, data in bad_inputs(images[0]).items():
        assert code(image=data) == grpc.StatusCode.INVALID_ARGUMENT, name
        assert client.health() == "SERVING"
    for accepted in (_cmyk(images[1]), png16_bytes(3, (64, 48))):  # accepted and explained
        resp = client.explain(accepted, top_k=2)
        assert len(resp.explanations) == 2
        assert_identity(resp)
    assert code(image=images[0], classes=["no such class"]) == grpc.StatusCode.NOT_FOUND
    assert code(image=images[0], classes=[5000]) == grpc.StatusCode.NOT_FOUND
    cid = client.list_classes(with_concepts_only=True).classes[0].class_id
    assert code(image=images[0], classes=[cid], contrast=cid) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(image=b"\xff\xd8\xff" + bytes(MAX_MESSAGE + 1024)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.health() == "SERVING"
    assert_identity(client.explain(images[2], top_k=3))


def test_explain_cli_against_the_real_server(served, images, tmp_path, capsys):
    image = tmp_path / "cifar.jpg"
    image.write_bytes(images[3])
    page = tmp_path / "page.html"
    assert cli.main(["explain", "--server", served.target, str(image), "--top-k", "2", "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "contribution" in out and "(residual)" in out
    with ExplainClient(served.target) as c:  # what the page shows, class by class
        shown = c.explain(images[3], top_k=2).explanations
    html = page.read_text()
    for x in shown:
        assert escape(x.class_name) in html
    assert ("data:image/png;base64," in html) == any(x.concepts for x in shown)  # heatmaps of explained classes
    assert ("no concepts" in html) == any(not x.concepts for x in shown)


def test_sigterm_drains_in_flight_requests_and_exits_0(served, images):
    """Last in this module: stops the shared server. SIGTERM goes once the server reports requests in
    flight (its own gauge, polled: no fixed sleep); every request it had admitted then is answered."""
    with ExplainClient(served.target) as c:
        # images and options not asked before: no cached answer cuts a request short
        futures = [c.stub.Explain.future(pb.ExplainRequest(image=im), timeout=60) for im in images[8:24]]
        deadline = time.monotonic() + 30
        while (in_flight := metric_value(served.metrics(), "conceptlens_inflight_requests")) < 1:
            assert time.monotonic() < deadline and not all(f.done() for f in futures), "no request seen in flight"
            time.sleep(0.005)
        served.proc.send_signal(signal.SIGTERM)
        outcomes = []
        for f in futures:
            try:
                outcomes.append(len(f.result().predictions) > 0)
            except grpc.RpcError as e:  # not yet admitted when the drain began
                assert e.code() == grpc.StatusCode.UNAVAILABLE
                outcomes.append(None)
        assert served.proc.wait(60) == 0
    assert sum(o is True for o in outcomes) >= in_flight  # those in flight at SIGTERM were finished
    assert "stopped" in served.log_path.read_text()
