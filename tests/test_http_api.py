"""The HTTP/JSON API and the page (service/http_api.py, service/static/): `conceptlens serve` as a
process on real ports over the tiny bundle, plain HTTP requests, the gRPC client beside them, and
headless Chromium (Debian's, through Playwright) on the page.

Every answer is the gRPC answer in protobuf's JSON mapping, so it parses back into the message;
errors are ``{"error": {"code", "message"}}`` with the status the gRPC code maps to.
"""
from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from google.protobuf import json_format
from PIL import Image
from service_conftest import assert_identity, jpeg_bytes

from conceptlens.service.client import ExplainClient
from conceptlens.service.metrics import metric_value
from conceptlens.service.serve_process import ServeProcess
from conceptlens.v1 import explain_service_pb2 as pb

TOKEN = "s3cret-t0ken"
MAX_MESSAGE = 1 << 20
OPTIONS = {"top_k": 2, "heatmap_format": "HEATMAP_FORMAT_PNG_OVERLAY", "prototype_format": "PROTOTYPE_FORMAT_JPEG",
           "prototypes_per_concept": 2, "num_predictions": 4}
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def servers(tiny_bundle, tmp_path_factory):
    """Two servers of the tiny bundle started side by side: an open one and one with a token."""
    logs = tmp_path_factory.mktemp("http-logs")
    open_ = ServeProcess(tiny_bundle, "--no-concept-metrics", "--max-message-bytes", str(MAX_MESSAGE),
                         log=logs / "open.log")
    locked = ServeProcess(tiny_bundle, "--auth-token", TOKEN, log=logs / "locked.log")
    try:
        open_.wait_ready(60)
        locked.wait_ready(60)
        yield open_, locked
    finally:
        for s in (open_, locked):
            s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def model(server) -> str:
    status, data = call(server, "GET", "/v1/models")
    assert status == 200, data
    return next(m["name"] for m in data["models"] if m["is_default"])


def call(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         raw: bool = False):
    """(status, parsed JSON answer) of one request; the body bytes with ``raw``."""
    req = urllib.request.Request(server.http_url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, data, ctype = resp.status, resp.read(), resp.headers.get_content_type()
    except urllib.error.HTTPError as e:
        status, data, ctype = e.code, e.read(), e.headers.get_content_type()
    if raw:
        return status, data
    assert ctype == "application/json", (status, ctype, data[:200])
    return status, json.loads(data)


def post_json(server, path: str, obj, **kw):
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return call(server, "POST", path, body, {"Content-Type": "application/json"}, **kw)


def post_image(server, path: str, image: bytes, options: dict | None = None, ctype: str = "image/jpeg"):
    if options is not None:
        path += "?options=" + urllib.parse.quote(json.dumps(options))
    return call(server, "POST", path, image, {"Content-Type": ctype})


def assert_error(answer, status: int, code: str, *words: str) -> None:
    got_status, data = answer
    assert got_status == status, data
    assert set(data) == {"error"} and data["error"]["code"] == code, data
    message = data["error"]["message"]
    assert "Traceback" not in message
    for w in words:
        assert w.lower() in message.lower(), message


# -- explain -----------------------------------------------------------------------------------
def test_explain_raw_and_json_bodies_answer_as_grpc_does(server, model):
    image = jpeg_bytes(7, (80, 60))
    with ExplainClient(server.target) as client:
        want = client.explain(image, top_k=2, heatmaps="png", prototypes=2, prototype_jpeg=True, num_predictions=4)
    raw = post_image(server, f"/v1/models/{model}:explain", image, OPTIONS)
    as_json = post_json(server, f"/v1/models/{model}:explain",
                        {"image": base64.b64encode(image).decode(), "options": OPTIONS})
    versioned = post_image(server, f"/v1/models/{model}/versions/{want.version}:explain", image, OPTIONS)
    for status, data in (raw, as_json, versioned):
        assert status == 200, data
        got = json_format.ParseDict(data, pb.ExplainResponse())  # protobuf's JSON mapping, field for field
        assert got.bundle_id == want.bundle_id and (got.model, got.version) == (model, want.version)
        assert got.predictions[0].class_id == want.predictions[0].class_id
        assert [p.class_id for p in got.predictions] == [p.class_id for p in want.predictions]
        assert [x.class_id for x in got.explanations] == [x.class_id for x in want.explanations]
        assert len(got.explanations) == 2
        assert_identity(got)
        for x, w in zip(got.explanations, want.explanations):
            assert x.logit == pytest.approx(w.logit, abs=1e-5)
            assert [c.contribution for c in x.concepts] == pytest.approx([c.contribution for c in w.concepts],
                                                                         abs=1e-5)
            for c in x.concepts:
                assert c.heatmap.data.startswith(b"\x89PNG") and (c.heatmap.width, c.heatmap.height) == (80, 60)
                assert len(c.prototypes) == 2 and all(p.jpeg.startswith(b"\xff\xd8") for p in c.prototypes)
        # the JSON itself: proto field names, enum names, base64 bytes
        x = data["explanations"][0]
        assert {"class_id", "class_name", "logit", "bias", "residual", "omitted_contribution", "concepts"} <= set(x)
        assert x["concepts"][0]["heatmap"]["format"] == "HEATMAP_FORMAT_PNG_OVERLAY"


def test_explain_by_class_name_with_deadline_header_and_form_upload(server, model):
    image = jpeg_bytes(8)
    status, data = call(server, "POST", f"/v1/models/{model}:explain?timeout_s=30&options="
                        + urllib.parse.quote(json.dumps({"classes": [{"name": "thing3"}, {"id": 5}]})),
                        image, {"Content-Type": "application/octet-stream", "X-Request-Timeout-S": "20"})
    assert status == 200, data
    assert [x["class_name"] for x in data["explanations"]] == ["thing3", "thing5"]
    assert_identity(json_format.ParseDict(data, pb.ExplainResponse()))
    boundary = "xXxXboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"options\"\r\n\r\n{{\"top_k\": 0}}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    status, data = call(server, "POST", f"/v1/models/{model}:explain", form,
                        {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, data
    assert data["explanations"] == [] and len(data["predictions"]) == 5


def test_explain_errors(server, model):
    url = f"/v1/models/{model}:explain"
    image = jpeg_bytes(9)
    b64 = base64.b64encode(image).decode()
    assert_error(post_image(server, url, b""), 400, "INVALID_ARGUMENT", "empty")
    assert_error(post_image(server, url, b"this is not an image\n" * 8, ctype="text/plain"), 400, "INVALID_ARGUMENT")
    assert_error(post_image(server, url, image[: len(image) // 3]), 400, "INVALID_ARGUMENT")
    assert_error(post_json(server, url, b'{"image": "abc'), 400, "INVALID_ARGUMENT", "not valid JSON")
    assert_error(post_json(server, url, [1, 2]), 400, "INVALID_ARGUMENT", "object")
    assert_error(post_json(server, url, {"options": {}}), 400, "INVALID_ARGUMENT", "image")
    assert_error(post_json(server, url, {"image": "not base64 at all!"}), 400, "INVALID_ARGUMENT", "base64")
    assert_error(post_json(server, url, {"image": b64, "colour": 1}), 400, "INVALID_ARGUMENT", "colour")
    assert_error(post_json(server, url, {"image": b64, "options": {"top_kay": 2}}), 400, "INVALID_ARGUMENT",
                 "top_kay")
    assert_error(post_json(server, url, {"image": b64, "options": {"top_k": "many"}}), 400, "INVALID_ARGUMENT",
                 "top_k")
    assert_error(post_json(server, url, {"image": b64, "options": {"top_k": -1}}), 400, "INVALID_ARGUMENT",
                 "negative")
    assert_error(post_image(server, url + "?options=%7Bnope", image), 400, "INVALID_ARGUMENT", "options")
    assert_error(post_image(server, url + "?timeout_s=soon", image), 400, "INVALID_ARGUMENT", "timeout")
    assert_error(post_json(server, url, {"image": b64, "options": {"classes": [{"name": "unicorn"}]}}),
                 404, "NOT_FOUND", "unicorn")
    assert_error(post_image(server, url, image, {"classes": [{"name": "lonely"}]}), 404, "NOT_FOUND", "no concepts")
    assert_error(post_image(server, "/v1/models/no-such-model:explain", image), 404, "NOT_FOUND", "no-such-model")
    assert_error(post_image(server, f"/v1/models/{model}/versions/99:explain", image), 404, "NOT_FOUND", "99")
    assert_error(call(server, "POST", url, jpeg_bytes(10), {"Content-Type": "image/jpeg",
                                                            "X-Request-Timeout-S": "0.000001"}),
                 504, "DEADLINE_EXCEEDED", "deadline")
    too_big = jpeg_bytes(1) + b"\0" * MAX_MESSAGE
    assert_error(post_image(server, url, too_big), 413, "RESOURCE_EXHAUSTED")
    assert_error(post_json(server, url, {"image": base64.b64encode(too_big).decode()}), 413, "RESOURCE_EXHAUSTED")


# -- models, classes, health, admin ------------------------------------------------------------
def test_models_classes_and_info(server, model):
    with ExplainClient(server.target) as client:
        info, concepts = client.model_info(), client.class_concepts(3, prototypes=1, jpeg=True)
    status, models = call(server, "GET", "/v1/models")
    assert status == 200 and [m["name"] for m in models["models"]] == [model]
    (version,) = models["models"][0]["versions"]
    assert version["state"] == "READY" and version["bundle_id"] == info.bundle_id
    status, data = call(server, "GET", f"/v1/models/{model}")
    assert status == 200 and data["bundle_id"] == info.bundle_id and data["num_classes"] == 10
    assert data["model"] == model and data["feature_shape"] == [8, 7, 7]
    assert call(server, "GET", f"/v1/models/{model}?version={version['version']}")[1]["bundle_id"] == info.bundle_id
    status, data = call(server, "GET", f"/v1/models/{model}/classes")
    assert status == 200 and [c["class_name"] for c in data["classes"]][-2:] == ["lonely", "empty"]
    assert len(data["classes"]) == 10 and data["classes"][9]["has_concepts"] is False
    status, data = call(server, "GET", f"/v1/models/{model}/classes?with_concepts_only=true")
    assert status == 200 and len(data["classes"]) == 8
    for ref in ("3", "thing3", "THING3"):
        status, data = call(server, "GET", f"/v1/models/{model}/classes/{ref}?prototypes=1&format=jpeg")
        assert status == 200, data
        got = json_format.ParseDict(data, pb.GetClassConceptsResponse())
        assert got == concepts
    assert base64.b64decode(data["concepts"][0]["prototypes"][0]["jpeg"]).startswith(b"\xff\xd8")
    status, data = call(server, "GET", f"/v1/models/{model}/classes/2")
    assert data["flags"] == ["failed_stitched_prototype_test"] and not data["concepts"][0]["prototypes"][0].get("jpeg")
    assert_error(call(server, "GET", f"/v1/models/{model}/classes/unicorn"), 404, "NOT_FOUND", "unicorn")
    assert_error(call(server, "GET", f"/v1/models/{model}/classes/2?format=gif"), 400, "INVALID_ARGUMENT", "format")
    assert_error(call(server, "GET", f"/v1/models/{model}/classes?with_concepts_only=maybe"), 400,
                 "INVALID_ARGUMENT")
    assert_error(call(server, "GET", "/v1/models/nope"), 404, "NOT_FOUND", "nope")
    assert_error(call(server, "GET", f"/v1/models/{model}?version=x"), 400, "INVALID_ARGUMENT", "version")
    assert_error(call(server, "GET", "/v1/nothing/here"), 404, "NOT_FOUND")
    assert_error(call(server, "DELETE", "/v1/models"), 405, "UNIMPLEMENTED")


def test_health_reload_page_and_metrics(server):
    assert call(server, "GET", "/healthz") == (200, {"status": "SERVING"})
    status, data = call(server, "POST", "/v1/admin/reload")
    assert status == 200 and data == {"loading": [], "unloaded": []}
    status, page = call(server, "GET", "/", raw=True)
    assert status == 200 and b'id="model"' in page and b"static/app.js" in page
    for name in ("app.js", "style.css", "index.html"):
        status, body = call(server, "GET", f"/static/{name}", raw=True)
        assert status == 200 and len(body) > 100, name
    for path in ("/static/", "/static/../http_api.py", "/static/%2e%2e/http_api.py", "/static/nope.js"):
        status, _ = call(server, "GET", path, raw=True)
        assert status in (403, 404), path
    assert post_image(server, "/v1/models/nope:explain", jpeg_bytes(1))[0] == 404
    text = server.metrics()
    for method, code in (("HTTP ListModels", "OK"), ("HTTP ReloadModels", "OK"), ("HTTP Explain", "NOT_FOUND")):
        assert metric_value(text, "conceptlens_requests_total", method=method, code=code) >= 1, (method, code)


def test_bearer_token(servers):
    locked = servers[1]
    assert_error(call(locked, "GET", "/v1/models"), 401, "UNAUTHENTICATED", "bearer")
    assert_error(call(locked, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"}), 401,
                 "UNAUTHENTICATED")
    assert_error(post_image(locked, "/v1/models/bundle:explain", jpeg_bytes(1)), 401, "UNAUTHENTICATED")
    status, data = call(locked, "GET", "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and data["models"]
    assert_error(call(locked, "GET", "/v2/models/bundle"), 401, "UNAUTHENTICATED")  # the inference protocol too
    assert call(locked, "GET", "/healthz")[0] == 200  # probes and the page need no token
    assert call(locked, "GET", "/v2/health/ready")[0] == 200
    assert call(locked, "GET", "/", raw=True)[0] == 200
    assert call(locked, "GET", "/static/app.js", raw=True)[0] == 200
    for path in ("/static/../v1/models", "/static/%2e%2e/v1/models", "/healthz/../v1/models"):  # no way around
        assert call(locked, "GET", path, raw=True)[0] in (401, 404), path


# -- the page in a real browser ----------------------------------------------------------------
@pytest.mark.slow
def test_page_in_chromium(server, model, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian's chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    photo = tmp_path / "photo.png"
    Image.open(io.BytesIO(jpeg_bytes(11, (160, 120)))).save(photo)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.http_url + "/")
            page.wait_for_selector("#model option", state="attached", timeout=10_000)
            assert page.input_value("#model") == model
            page.set_input_files("#file", str(photo))
            page.click("#explain")
            page.wait_for_selector(".class-explanation", timeout=15_000)
            assert page.locator(".prediction").count() == 5
            assert page.locator(".class-explanation").count() == 3
            assert page.locator(".concept-row").count() >= 3
            assert "= Σ contributions" in page.inner_text(".identity >> nth=0")
            # a link to its global concepts on every class that has concepts, and only there
            assert page.evaluate("""() => [...document.querySelectorAll('.class-explanation')].every(
                x => !!x.querySelector('a.class-link') === !!x.querySelector('.concept-row'))""")
            images_ok = "sel => [...document.querySelectorAll(sel)].map(i => i.complete && i.naturalWidth > 0)"
            page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=10_000)
            heatmaps, protos = page.evaluate(images_ok, "img.heatmap"), page.evaluate(images_ok, "img.prototype")
            assert heatmaps and all(heatmaps), heatmaps
            assert protos and all(protos), protos
            assert "error" not in (page.get_attribute("#status", "class") or "")
            page.screenshot(path=str(tmp_path / "explanation.png"), full_page=True)
            page.click(".class-explanation >> nth=0 >> a.class-link")
            page.wait_for_selector(".class-concepts .global-concept", timeout=10_000)
            assert page.locator(".class-concepts img.prototype").count() >= 3
            page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=10_000)
            assert all(page.evaluate(images_ok, ".class-concepts img.prototype"))
            page.screenshot(path=str(tmp_path / "class.png"), full_page=True)
            page.go_back()
            page.wait_for_selector("#explain-view .class-explanation", state="visible")
            # an error shows its message in #status
            page.set_input_files("#file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not a png"})
            page.click("#explain")
            page.wait_for_selector("#status.error", timeout=10_000)
            assert "image" in page.inner_text("#status").lower()
            assert not errors, errors
        finally:
            browser.close()
    for name in ("explanation.png", "class.png"):
        with Image.open(tmp_path / name) as shot:
            colors = shot.convert("RGB").getcolors(1 << 24)
            assert colors is not None and len(colors) > 10, name
