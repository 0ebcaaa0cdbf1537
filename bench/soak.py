"""Soak: N clients for T seconds of mixed requests against a server with Redis, faults landing during the load.

The server (`conceptlens serve --repository`, its own process) serves a real bundle (by default the
demo's: EfficientNet-Lite0 fine-tuned on Fashion-MNIST, NMF concepts, prototype crops) with a
private redis-server as its cache. Clients (asyncio, one gRPC channel each, one shared HTTP
session) send a mix: top-k, explicit classes, contrast, raw and PNG heatmaps, JPEG prototypes,
ExplainStream, GetClassConcepts, the HTTP/JSON API and the inference protocol's REST infer.
Half the images come from a fixed pool (cache hits), half are new (misses).

Every answer is checked, not just counted:
  - the identity: sum of contributions + omitted + residual + bias = logit (1e-4 relative);
  - the explained logit equals the model's own logit in the same answer's predictions (all classes
    are asked for), minus the contrast class's logit for a contrast;
  - the same pool image always gets the same logits, over gRPC, HTTP and the inference protocol,
    cache hit or miss, before and after a version swap (the versions are copies of one model);
  - after a version swap has settled, answers come from the new version (no cached answer of the
    old one); heatmaps and prototype crops are what was asked for (raw grid size, PNG, JPEG).

Faults during the load, each expected to cost 0 failed requests: Redis SIGKILLed and restarted
(--redis-kills, 2), a new bundle version swapped in (--swaps, 2; the old one unloaded with requests on it),
/metrics scraped by 4 tasks in a loop, clients that send and never read (a gRPC stream, pipelined
HTTP requests, a request header left half-sent). Then an overload burst (RESOURCE_EXHAUSTED is
the only error allowed there), then SIGTERM under load: requests in flight complete, new ones get
UNAVAILABLE (gRPC) or a refused connection (HTTP), the server exits 0.

The server's RSS is sampled every 2 s; growth is measured from the end of the warm-up (median of
its last 30 s) to the end of the load phase (median of its last 60 s, before the overload burst),
and judged net of the in-process answer cache's
own growth (it fills by design, up to 256 MiB or --cache-size answers; its bytes come from
/metrics). SIGTERM is sent while 4 streams are being answered (each has had its first item): all
their items must be answered too (unary requests sent just before it may be refused as new:
UNAVAILABLE, as the client cannot know whether the server had taken them).

    .venv/bin/python bench/soak.py [--duration 600] [--clients 8] [--bundle DIR] [--out soak.json]

Exit status 0 when every criterion holds (--max-rss-growth-pct, 5 by default), 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import gzip
import io
import json
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish_version, rss_mib  # noqa: E402


# -- the parts: a private Redis, the bundle, the images ---------------------------------------------------
def demo_bundle(workdir: Path) -> Path:
    """The demo's bundle (Lite0 fine-tuned on Fashion-MNIST), built once under ``workdir``."""
    bundle = workdir / "demo" / "bundle"
    if not (bundle / "manifest.json").is_file():
        print(f"building the demo bundle under {workdir / 'demo'} (a few minutes, once)", flush=True)
        subprocess.run([sys.executable, "-m", "conceptlens.service.demo", "--out", str(workdir / "demo"),
                        "--images", "1000", "--explain", "1"], check=True, stdout=subprocess.DEVNULL)
    return bundle


def image_pool(n: int, seed: int) -> list[np.ndarray]:
    """``n`` real images as uint8 arrays: Fashion-MNIST test images, else ../shared/data's
    ImageNet samples, else random pixels (the soak's checks do not depend on what they show)."""
    if (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        with gzip.open(FASHION / "t10k-images-idx3-ubyte.gz") as f:
            _, count, rows, cols = struct.unpack(">IIII", f.read(16))
            return list(np.frombuffer(f.read(n * rows * cols), np.uint8).reshape(-1, rows, cols))
    from PIL import Image

    samples = sorted((ROOT.parent / "shared" / "data" / "imagenet-samples").glob("*.jpg"))[:n]
    if samples:
        return [np.asarray(Image.open(p).convert("RGB").resize((96, 96))) for p in samples]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48, 64, 3), np.uint8) for _ in range(n)]


def encode(arr: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# -- bookkeeping --------------------------------------------------------------------------------------------
@dataclass
class Record:
    kind: str
    phase: str
    code: str
    seconds: float
    sent_at: float


@dataclass
class State:
    t0: float = field(default_factory=time.monotonic)
    phase: str = "warm-up"
    min_version: int = 1                     # every answer must come from this version or a newer one
    records: list = field(default_factory=list)
    check_failures: list = field(default_factory=list)
    logits: dict = field(default_factory=dict)   # pool index -> all logits, from the first answer
    events: list = field(default_factory=list)
    stop_clients: bool = False
    sigterm_at: float | None = None
    drain_s: float | None = None
    marked_streams: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # (sent at, phase, kind, message), the first 50
    metrics_scrapes: Counter = field(default_factory=Counter)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, text: str) -> None:
        self.events.append((round(self.now(), 1), text))
        print(f"[{self.now():6.1f} s] {text}", flush=True)

    def fail(self, kind: str, text: str) -> None:
        self.check_failures.append(f"{kind} at {self.now():.1f} s: {text}")


class CheckError(AssertionError):
    pass


def close(a: float, b: float, scale: float = 1.0, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * (1.0 + abs(scale))


def check_answer(resp, opts, state: State, pool_index: int | None, num_classes: int, model: str,
                 min_version: int) -> None:
    """Raise CheckError unless ``resp`` (an ExplainResponse) is right for ``opts``; see the module doc.
    ``min_version``: the version that had settled when the request was sent."""
    from conceptlens.v1 import explain_service_pb2 as pb

    if resp.model != model:
        raise CheckError(f"answered by model {resp.model!r}, not {model!r}")
    if resp.version < min_version:
        raise CheckError(f"answered by version {resp.version}, sent after version {min_version} had settled")
    preds = {p.class_id: p.logit for p in resp.predictions}
    if len(preds) != num_classes:
        raise CheckError(f"{len(preds)} predictions, asked for all {num_classes}")
    order = [p.logit for p in resp.predictions]
    if order != sorted(order, reverse=True):
        raise CheckError("predictions not in descending logit order")
    if pool_index is not None:
        vec = np.array([preds[c] for c in range(num_classes)])
        seen = state.logits.setdefault(pool_index, vec)
        if not np.allclose(seen, vec, rtol=0, atol=1e-4 * (1 + np.abs(seen).max())):
            raise CheckError(f"pool image {pool_index}: logits differ from its first answer by "
                             f"{np.abs(seen - vec).max():.3g}")
    contrast = opts.contrast.id if opts.HasField("contrast") else None
    if opts.classes:
        want = [c.id for c in opts.classes]
    else:
        k = opts.top_k if opts.HasField("top_k") else 1
        want = [p.class_id for p in resp.predictions if p.class_id != contrast][:k]
    got = [x.class_id for x in resp.explanations]
    if got != want:
        raise CheckError(f"explained classes {got}, expected {want}")
    for x in resp.explanations:
        terms = [c.contribution for c in x.concepts] + [x.omitted_contribution, x.residual, x.bias]
        total = sum(terms)
        if not close(total, x.logit, sum(abs(t) for t in terms)):
            raise CheckError(f"class {x.class_id}: identity gap {abs(total - x.logit):.3g}")
        expected = preds[x.class_id] - (preds[contrast] if contrast is not None else 0.0)
        if not close(x.logit, expected, abs(expected)):
            raise CheckError(f"class {x.class_id}: explained logit {x.logit} but the model's logit is {expected}")
        for c in x.concepts:
            hm = c.heatmap
            if opts.heatmap_format == pb.HEATMAP_FORMAT_RAW:
                if hm.format != pb.HEATMAP_FORMAT_RAW or len(hm.data) != hm.height * hm.width or hm.height < 1:
                    raise CheckError(f"class {x.class_id} concept {c.concept_id}: bad raw heatmap")
            elif opts.heatmap_format == pb.HEATMAP_FORMAT_PNG_OVERLAY:
                if not hm.data.startswith(PNG_SIGNATURE):
                    raise CheckError(f"class {x.class_id} concept {c.concept_id}: heatmap is not a PNG")
            elif hm.data:
                raise CheckError("a heatmap nobody asked for")
            if opts.prototype_format == pb.PROTOTYPE_FORMAT_JPEG:
                if any(not p.jpeg.startswith(b"\xff\xd8") for p in c.prototypes):
                    raise CheckError(f"class {x.class_id} concept {c.concept_id}: prototype crop is not a JPEG")


# -- the requests -------------------------------------------------------------------------------------------
class Mix:
    """Random requests: which image (pool or new), which options, which transport."""

    KINDS = {"grpc top-k": 3, "grpc classes": 2, "grpc contrast": 2, "grpc raw heatmaps": 1,
             "grpc PNG heatmaps": 1, "grpc JPEG prototypes": 1, "grpc stream (4 images)": 1,
             "grpc class concepts": 1, "http explain": 2, "http contrast + PNG": 1, "oip infer": 1}

    def __init__(self, pool: list[np.ndarray], class_ids: list[int], num_classes: int, seed: int,
                 kinds: dict[str, int] | None = None):
        self.pool, self.kinds = pool, kinds or self.KINDS
        self.encoded = [(encode(a, "PNG"), encode(a if a.ndim == 3 else np.stack([a] * 3, -1), "JPEG"))
                        for a in pool]
        self.class_ids, self.num_classes = class_ids, num_classes
        self.rng = random.Random(seed)

    def spawn(self, seed: int, kinds: dict[str, int] | None = None) -> "Mix":
        """A mix of its own (generator, kinds) over the same images, encoded once."""
        other = copy.copy(self)
        other.rng, other.kinds = random.Random(seed), kinds or self.KINDS
        return other

    def kind(self) -> str:
        return self.rng.choices(list(self.kinds), weights=list(self.kinds.values()))[0]

    def image(self) -> tuple[bytes, int | None]:
        """(image bytes, its pool key (2 x index + 1 for the JPEG) or None for a new image)."""
        i = self.rng.randrange(len(self.pool))
        if self.rng.random() < 0.5:  # the key tells the PNG (lossless) and the JPEG of an image apart
            fmt = self.rng.randrange(2)
            return self.encoded[i][fmt], 2 * i + fmt
        return self.image_new(i), None

    def image_new(self, i: int | None = None) -> bytes:
        """A pool image with one pixel changed: one the cache has never seen."""
        arr = self.pool[self.rng.randrange(len(self.pool)) if i is None else i].copy()
        arr.flat[self.rng.randrange(arr.size)] ^= 0x80
        return encode(arr, "PNG")

    def options(self, kind: str):
        from conceptlens.service.client import make_options

        rng, classes = self.rng, self.class_ids
        kw: dict = {"num_predictions": self.num_classes, "prototypes": rng.choice([0, 1, 3])}
        if kind == "grpc classes":
            kw["classes"] = rng.sample(classes, rng.randint(1, min(2, len(classes))))
        elif kind in ("grpc contrast", "http contrast + PNG"):
            a, b = rng.sample(classes, 2)
            kw.update(classes=[a], contrast=b)
            if kind == "http contrast + PNG":
                kw["heatmaps"] = "png"
        else:
            kw["top_k"] = rng.randint(0, 3)
        if kind == "grpc raw heatmaps":
            kw["heatmaps"] = "raw"
        elif kind == "grpc PNG heatmaps":
            kw["heatmaps"] = "png"
        elif kind == "grpc JPEG prototypes":
            kw.update(prototypes=2, prototype_jpeg=True)
        if rng.random() < 0.2:
            kw["max_concepts"] = rng.randint(1, 3)
        return make_options(**kw)


async def one_request(kind: str, mix: Mix, stub, http, ctx) -> None:
    """Send one request of ``kind`` and check its answer; raises grpc.aio.AioRpcError,
    HttpStatusError, aiohttp errors or CheckError."""
    from google.protobuf import json_format

    from conceptlens.v1 import explain_service_pb2 as pb

    state, model, k = ctx["state"], ctx["model"], mix.num_classes
    min_version = state.min_version
    if kind == "grpc class concepts":
        resp = await stub.GetClassConcepts(pb.GetClassConceptsRequest(
            class_ref=pb.ClassRef(id=mix.rng.choice(mix.class_ids)), prototypes_per_concept=2,
            prototype_format=pb.PROTOTYPE_FORMAT_JPEG), timeout=60)
        if not resp.concepts or any(not p.jpeg.startswith(b"\xff\xd8") for c in resp.concepts for p in c.prototypes):
            raise CheckError("GetClassConcepts: no concepts, or a crop that is not a JPEG")
        return
    if kind == "grpc stream (4 images)":
        items = []
        for i in range(4):
            img, idx = mix.image()
            opts = mix.options(mix.rng.choice(["grpc top-k", "grpc contrast", "grpc raw heatmaps"]))
            items.append((img, idx, opts))
        reqs = [pb.ExplainStreamRequest(item_id=str(i), request=pb.ExplainRequest(image=img, options=o))
                for i, (img, _, o) in enumerate(items)]
        seen = set()
        async for r in stub.ExplainStream(iter(reqs), timeout=120):
            if r.status.code != 0:
                raise StreamItemError(r.status.code, r.status.message)
            _, idx, opts = items[int(r.item_id)]
            check_answer(r.response, opts, state, idx, k, model, min_version)
            seen.add(r.item_id)
        if len(seen) != 4:
            raise CheckError(f"stream answered {len(seen)} of 4 items")
        return
    img, idx = mix.image()
    if kind == "oip infer":
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "parameters": {"content_type": "base64"}, "data": [base64.b64encode(img).decode()]}]}
        async with http.post(f"{ctx['http']}/v2/models/{model}/infer", json=body) as r:
            payload = await r.read()
            if r.status != 200:
                raise HttpStatusError(r.status, payload)
        out = {o["name"]: o for o in json.loads(payload)["outputs"]}
        logits = np.asarray(out["logits"]["data"], np.float64)
        if logits.shape != (k,):
            raise CheckError(f"inference protocol logits of shape {logits.shape}")
        if idx is not None and idx in state.logits:
            if not np.allclose(state.logits[idx], logits, rtol=0, atol=1e-4 * (1 + np.abs(logits).max())):
                raise CheckError(f"pool image {idx}: inference-protocol logits differ from gRPC's")
        return
    opts = mix.options(kind)
    if kind.startswith("http"):
        body = {"image": base64.b64encode(img).decode(),
                "options": json_format.MessageToDict(opts, preserving_proto_field_name=True)}
        async with http.post(f"{ctx['http']}/v1/models/{model}:explain", json=body) as r:
            payload = await r.read()
            if r.status != 200:
                raise HttpStatusError(r.status, payload)
        resp = json_format.ParseDict(json.loads(payload), pb.ExplainResponse(), ignore_unknown_fields=False)
    else:
        resp = await stub.Explain(pb.ExplainRequest(image=img, options=opts), timeout=60)
    check_answer(resp, opts, state, idx, k, model, min_version)


class HttpStatusError(Exception):
    def __init__(self, status: int, payload: bytes):
        try:
            code = json.loads(payload)["error"]["code"]
        except Exception:  # the inference protocol's errors are {"error": "message"}: the status says it
            code = {429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}.get(status, f"HTTP {status}")
        super().__init__(f"HTTP {status}: {payload[:200]!r}")
        self.code = code


class StreamItemError(Exception):
    def __init__(self, code: int, message: str):
        import grpc

        self.code = next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))
        super().__init__(f"stream item {self.code}: {message}")


def error_code(e: BaseException) -> str:
    import aiohttp
    import grpc

    if isinstance(e, grpc.aio.AioRpcError):
        return e.code().name
    if isinstance(e, (HttpStatusError, StreamItemError)):
        return e.code
    if isinstance(e, CheckError):
        return "CHECK FAILED"
    if isinstance(e, (aiohttp.ClientConnectorError, ConnectionRefusedError)):
        return "connection refused"
    if isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return "connection closed"
    if isinstance(e, asyncio.TimeoutError):
        return "client timeout"
    return type(e).__name__


async def client_loop(mix: Mix, ctx, seed: int) -> None:
    import grpc

    from conceptlens.service.client import channel_options
    from conceptlens.v1 import explain_service_pb2_grpc as pb_grpc

    state: State = ctx["state"]
    async with grpc.aio.insecure_channel(ctx["target"], options=channel_options()) as channel:
        stub = pb_grpc.ExplainServiceStub(channel)
        while not state.stop_clients:
            kind = mix.kind()
            sent, phase = state.now(), state.phase
            start = time.perf_counter()
            try:
                await one_request(kind, mix, stub, ctx["session"], ctx)
                code = "OK"
            except Exception as e:
                code = error_code(e)
                if code == "CHECK FAILED":
                    state.fail(kind, f"{code}: {str(e)[:300]}")
                elif phase != "overload" and len(state.errors) < 50:  # judged by summarize(): phase, sent when
                    state.errors.append((sent, phase, kind, f"{code}: {str(e)[:300]}"))
                if phase == "SIGTERM" or state.sigterm_at is not None:
                    await asyncio.sleep(0.05)  # the server is going away; do not spin
            state.records.append(Record(kind, phase, code, time.perf_counter() - start, sent))


# -- faults ---------------------------------------------------------------------------------------------------
async def hammer_metrics(ctx) -> None:
    """Scrape /metrics as fast as one task can, until the clients stop."""
    state: State = ctx["state"]
    url = f"http://127.0.0.1:{ctx['metrics_port']}/metrics"
    while not state.stop_clients and state.sigterm_at is None:
        try:
            async with ctx["session"].get(url) as r:
                text = await r.read()
                ok = r.status == 200 and b"conceptlens_" in text
        except Exception:
            ok = state.sigterm_at is not None
        state.metrics_scrapes["ok" if ok else "failed"] += 1
        if not ok and state.sigterm_at is None:
            state.fail("metrics", "a /metrics scrape failed")


def never_reading_clients(ctx, image: bytes) -> list:
    """Clients that send and never read: a gRPC stream of 64 PNG-heatmap requests, 32 pipelined
    HTTP explain requests on one connection, and an HTTP request whose header is left half-sent.
    Returns what keeps them open (closed by the caller)."""
    import grpc

    from conceptlens.service.client import channel_options, make_options
    from conceptlens.v1 import explain_service_pb2 as pb
    from conceptlens.v1 import explain_service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(ctx["target"], options=channel_options())
    opts = make_options(top_k=3, heatmaps="png", prototypes=3, prototype_jpeg=True, num_predictions=10)
    reqs = [pb.ExplainStreamRequest(item_id=str(i), request=pb.ExplainRequest(image=image, options=opts))
            for i in range(64)]
    call = pb_grpc.ExplainServiceStub(channel).ExplainStream(iter(reqs))  # the answers are never read
    host, port = ctx["http_host_port"]
    body = json.dumps({"image": base64.b64encode(image).decode(),
                       "options": {"top_k": 3, "heatmap_format": "HEATMAP_FORMAT_PNG_OVERLAY"}}).encode()
    one = (f"POST /v1/models/{ctx['model']}:explain HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    pipelined = socket.create_connection((host, port))
    pipelined.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pipelined.sendall(one * 32)
    half = socket.create_connection((host, port))
    half.sendall(f"POST /v1/models/{ctx['model']}:explain HTTP/1.1\r\nHost: {host}\r\nContent-Le".encode())
    return [call, channel, pipelined, half]


async def scrape(ctx) -> str:
    async with ctx["session"].get(f"http://127.0.0.1:{ctx['metrics_port']}/metrics") as r:
        return (await r.read()).decode()


async def marked_stream(ctx, mix: Mix, started: asyncio.Event, n: int = 8) -> list[str]:
    """An ExplainStream of ``n`` new images (PNG heatmaps); sets ``started`` once the server has
    answered its first item, so it is surely being served; returns the items' status codes."""
    import grpc

    from conceptlens.service.client import channel_options
    from conceptlens.v1 import explain_service_pb2 as pb
    from conceptlens.v1 import explain_service_pb2_grpc as pb_grpc

    opts = mix.options("grpc PNG heatmaps")
    reqs = [pb.ExplainStreamRequest(item_id=str(i), request=pb.ExplainRequest(image=mix.image_new(), options=opts))
            for i in range(n)]
    codes = []
    async with grpc.aio.insecure_channel(ctx["target"], options=channel_options()) as channel:
        try:
            async for r in pb_grpc.ExplainServiceStub(channel).ExplainStream(iter(reqs), timeout=120):
                started.set()
                codes.append("OK" if r.status.code == 0 else StreamItemError(r.status.code, "").code)
        except grpc.aio.AioRpcError as e:
            codes.append(e.code().name)
        finally:
            started.set()
    return codes + ["missing"] * (n - len(codes))


async def swap_version(ctx, version: int) -> None:
    """A new version in; waits until it is the only one loaded (the old one unloaded), then
    answers must come from it."""
    import grpc

    from conceptlens.v1 import explain_service_pb2 as pb
    from conceptlens.v1 import explain_service_pb2_grpc as pb_grpc

    state: State = ctx["state"]
    await asyncio.to_thread(publish_version, ctx["repo_model"], ctx["bundle"], version)
    state.event(f"version {version} published; ReloadModels")
    async with grpc.aio.insecure_channel(ctx["target"]) as channel:
        stub = pb_grpc.ExplainServiceStub(channel)
        await stub.ReloadModels(pb.ReloadModelsRequest(), timeout=60)
        deadline = time.monotonic() + 300
        while True:
            status = await stub.ListModels(pb.ListModelsRequest(), timeout=30)
            states = {v.version: v.state for m in status.models for v in m.versions}
            if states == {version: "READY"}:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"version {version} did not settle: {states}")
            await asyncio.sleep(0.2)
    state.min_version = version
    rss = ctx["rss"][-1][1] if ctx["rss"] else float("nan")
    state.event(f"version {version} serving alone (the old one unloaded); RSS {rss:.0f} MiB")


def rss_sampler(pid: int, samples: list, stop: threading.Event, t0: float) -> None:
    while not stop.wait(2.0):
        try:
            samples.append((time.monotonic() - t0, rss_mib(pid)))
        except (OSError, RuntimeError):  # the server is gone (or a zombie: no VmRSS)
            return


# -- the run --------------------------------------------------------------------------------------------------
async def run(args, bundle: Path, work: Path) -> dict:
    import aiohttp

    from conceptlens.service.client import ExplainClient
    from conceptlens.service.metrics import metric_value
    from conceptlens.service.serve_process import RedisProcess, ServeProcess

    redis = RedisProcess(work)
    redis.start()
    model = "soak"
    repo_model = work / "repository" / model
    repo_model.mkdir(parents=True)
    publish_version(repo_model, bundle, 1)
    flags = ["--redis-url", redis.url, "--repository-poll-s", "0", "--keep-versions", "1",
             "--grace-s", str(args.grace_s), "--max-queue-size", str(args.max_queue_size)]
    server = ServeProcess(None, *flags, repository=work / "repository", log=work / "server.log", log_level="INFO")
    state = State()
    rss: list = []
    stop_rss = threading.Event()
    try:
        server.wait_ready(300)
        with ExplainClient(server.target) as c:
            classes = c.list_classes(with_concepts_only=True)
            num_classes = len(c.list_classes().classes)
        class_ids = [x.class_id for x in classes.classes]
        pool = image_pool(args.pool, args.seed)
        mix = Mix(pool, class_ids, num_classes, args.seed)
        threading.Thread(target=rss_sampler, args=(server.proc.pid, rss, stop_rss, state.t0), daemon=True).start()
        connector = aiohttp.TCPConnector(limit=args.clients * 2)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            ctx = {"state": state, "target": server.target, "http": server.http_url, "session": session,
                   "model": model, "metrics_port": server.metrics_port, "repo_model": repo_model, "bundle": bundle,
                   "http_host_port": (server.host, server.http_port), "rss": rss}
            state.event(f"server up (pid {server.proc.pid}); {args.clients} clients, {num_classes} classes "
                        f"({len(class_ids)} with concepts), {len(pool)} pool images")
            clients = [asyncio.create_task(client_loop(mix.spawn(args.seed + i), ctx, i))
                       for i in range(args.clients)]
            T, warm = args.duration, min(60.0, 0.1 * args.duration)
            held = []

            async def at(t: float) -> None:
                await asyncio.sleep(max(0.0, t - state.now()))

            await at(warm)
            state.phase = "load"
            rss.append((state.now(), rss_mib(server.proc.pid)))  # one sample at least, however busy the sampler
            rss_start = statistics.median(m for t, m in rss[-15:])  # the last 30 s of the warm-up (requests
            # come and go: a single sample swings by 100 MiB with the heatmaps and contrasts in flight)
            cache_start = metric_value(await scrape(ctx), "conceptlens_cache_memory_bytes") / 2**20
            state.event(f"warm-up over; RSS {rss_start:.0f} MiB; /metrics hammered by 4 tasks; never-reading "
                        f"clients connected")
            scrapers = [asyncio.create_task(hammer_metrics(ctx)) for _ in range(4)]
            held = await asyncio.to_thread(never_reading_clients, ctx, mix.encoded[0][0])
            plan = sorted([((i + 0.5) / args.redis_kills * 0.9, "redis") for i in range(args.redis_kills)]
                          + [((i + 1) / (args.swaps + 0.5) * 0.9, "swap") for i in range(args.swaps)])
            version = 1
            for frac, fault in plan:
                await at(warm + frac * (T - warm))
                if fault == "redis":
                    redis.kill()
                    state.event("Redis SIGKILLed")
                    await asyncio.sleep(min(15.0, 0.03 * T))
                    await asyncio.to_thread(redis.start)
                    state.event("Redis restarted (empty)")
                else:
                    version += 1
                    await swap_version(ctx, version)
            await at(T)
            rss.append((state.now(), rss_mib(server.proc.pid)))
            rss_end = statistics.median(m for t, m in rss[-30:])  # the last 60 s of the load
            cache_end = metric_value(await scrape(ctx), "conceptlens_cache_memory_bytes") / 2**20
            state.event(f"load phase over; RSS {rss_end:.0f} MiB (in-process cache {cache_start:.0f} -> "
                        f"{cache_end:.0f} MiB)")
            if args.overload_s > 0:
                state.phase = "overload"
                state.event(f"overload: {args.overload_clients} more clients for {args.overload_s:.0f} s")
                streams = {"grpc stream (4 images)": 1}  # 4 images in flight per client
                extra = [asyncio.create_task(client_loop(mix.spawn(1000 + i, streams), ctx,
                                                         1000 + i)) for i in range(args.overload_clients)]
                await asyncio.sleep(args.overload_s)
                state.stop_clients = True
                await asyncio.gather(*clients, *extra)
                state.stop_clients = False
                state.phase = "load"
                clients = [asyncio.create_task(client_loop(mix.spawn(2000 + i), ctx, 2000 + i))
                           for i in range(args.clients)]
                await asyncio.sleep(5.0)
            # SIGTERM under load, with 4 streams that the server is surely serving (each has answered
            # its first item): all their items must still be answered
            starts = [asyncio.Event() for _ in range(4)]
            marked = [asyncio.create_task(marked_stream(ctx, mix.spawn(3000 + i), ev))
                      for i, ev in enumerate(starts)]
            await asyncio.gather(*(ev.wait() for ev in starts))
            state.phase = "SIGTERM"
            state.sigterm_at = state.now()
            server.proc.send_signal(signal.SIGTERM)
            state.event("SIGTERM sent under load")
            exit_code = await asyncio.to_thread(server.proc.wait, args.grace_s + 60)
            state.drain_s = state.now() - state.sigterm_at
            state.event(f"server exited with status {exit_code} after {state.drain_s:.1f} s")
            state.stop_clients = True
            await asyncio.gather(*clients, *scrapers)
            state.marked_streams = [Counter(codes) for codes in await asyncio.gather(*marked)]
            for h in held:
                try:
                    h.cancel() if hasattr(h, "cancel") else h.close()
                except Exception:
                    pass
        stop_rss.set()
        return summarize(args, state, rss, (rss_start, rss_end), (cache_start, cache_end), exit_code)
    finally:
        stop_rss.set()
        server.stop(timeout=30)
        redis.kill()


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summarize(args, state: State, rss, rss_ends, cache_ends, exit_code) -> dict:
    """The figures; ``rss_ends`` and ``cache_ends``: (MiB at the end of the warm-up, at the end of the load)."""
    (rss_start, rss_end), (cache_start, cache_end) = rss_ends, cache_ends
    recs = state.records
    load = [r for r in recs if r.phase in ("warm-up", "load")]
    over = [r for r in recs if r.phase == "overload"]
    term = [r for r in recs if r.phase == "SIGTERM" or (state.sigterm_at is not None and r.sent_at >= state.sigterm_at)]
    # Sent before SIGTERM and finished after it: by the client's clock only, so some may not have
    # reached the server's handler before the drain began (a starved event loop on either side) and
    # are rightly refused as new (UNAVAILABLE). The proof that in-flight work completes is the 4
    # marked streams, which the server had begun answering: every item of theirs must be OK.
    sig = state.sigterm_at
    before = [r for r in recs if r.sent_at < sig <= r.sent_at + r.seconds]
    after = [r for r in term if r.sent_at >= sig]
    load = [r for r in load if r.sent_at + r.seconds < sig]

    def codes(rs):
        return dict(Counter(r.code for r in rs).most_common())

    ok_lat = [r.seconds * 1000 for r in load if r.code == "OK"]
    per_kind = {}
    for kind in Mix.KINDS:
        rs = [r for r in load if r.kind == kind]
        lat = [r.seconds * 1000 for r in rs if r.code == "OK"]
        per_kind[kind] = {"requests": len(rs), "errors": len(rs) - len(lat),
                          "p50_ms": round(percentile(lat, 50), 1), "p99_ms": round(percentile(lat, 99), 1)}
    growth = (rss_end - rss_start) / rss_start * 100 if rss_start and rss_end else float("nan")
    # the in-process answer cache fills by design (to 256 MiB or --cache-size entries): growth net of it
    net_growth = (rss_end - rss_start - (cache_end - cache_start)) / rss_start * 100 if rss_start else float("nan")
    marked_bad = sum(n for c in state.marked_streams for code, n in c.items() if code != "OK")
    load_errors = sum(1 for r in load if r.code != "OK")
    over_bad = sum(1 for r in over if r.code not in ("OK", "RESOURCE_EXHAUSTED"))
    gone = ("OK", "UNAVAILABLE", "connection refused", "connection closed")
    in_flight_bad = sum(1 for r in before if r.code not in ("OK", "UNAVAILABLE")) + marked_bad
    after_bad = sum(1 for r in after if r.code not in gone)
    result = {
        "clients": args.clients, "duration_s": args.duration, "requests": len(load),
        "errors_by_code": codes([r for r in load if r.code != "OK"]), "p50_ms": round(percentile(ok_lat, 50), 1),
        "p99_ms": round(percentile(ok_lat, 99), 1), "throughput_rps": round(len(load) / max(1e-9, args.duration), 1),
        "per_kind": per_kind, "rss_start_mib": round(rss_start or 0, 1), "rss_end_mib": round(rss_end or 0, 1),
        "rss_growth_pct": round(growth, 2), "rss_max_mib": round(max((m for _, m in rss), default=0), 1),
        "cache_start_mib": round(cache_start, 1), "cache_end_mib": round(cache_end, 1),
        "rss_growth_net_of_cache_pct": round(net_growth, 2),
        "rss_series": [(round(t), round(m, 1)) for t, m in rss[::5]],
        "metrics_scrapes": dict(state.metrics_scrapes), "overload": {"requests": len(over), "codes": codes(over)},
        "sigterm": {"marked_streams": [dict(c) for c in state.marked_streams], "in_flight": len(before),
                    "in_flight_codes": codes(before), "after": len(after), "after_codes": codes(after),
                    "exit_status": exit_code, "drain_s": round(state.drain_s or float("nan"), 1)},
        "check_failures": len(state.check_failures), "first_failures": state.check_failures[:10],
        "first_load_errors": [f"{kind} at {t:.1f} s: {msg}" for t, phase, kind, msg in state.errors
                              if phase in ("warm-up", "load") and t < sig][:10],
        "events": state.events,
    }
    result["passed"] = bool(load_errors == 0 and over_bad == 0 and in_flight_bad == 0 and after_bad == 0
                            and exit_code == 0 and not state.check_failures
                            and state.metrics_scrapes.get("failed", 0) == 0
                            and (args.max_rss_growth_pct <= 0 or net_growth < args.max_rss_growth_pct))
    return result


def print_table(r: dict) -> None:
    print()
    print("| clients | duration | requests | errors by code | p50 | p99 | RSS start -> end (max) | in-process cache |")
    print("|---|---|---|---|---|---|---|---|")
    errs = ", ".join(f"{k} {v}" for k, v in r["errors_by_code"].items()) or "0"
    print(f"| {r['clients']} | {r['duration_s']:.0f} s | {r['requests']} ({r['throughput_rps']}/s) | {errs} | "
          f"{r['p50_ms']} ms | {r['p99_ms']} ms | {r['rss_start_mib']} -> {r['rss_end_mib']} MiB "
          f"({r['rss_growth_pct']:+.1f} %, max {r['rss_max_mib']}) | {r['cache_start_mib']} -> {r['cache_end_mib']} MiB "
          f"(RSS growth net of it {r['rss_growth_net_of_cache_pct']:+.1f} %) |")
    print()
    print("| request kind | requests | errors | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for kind, k in r["per_kind"].items():
        print(f"| {kind} | {k['requests']} | {k['errors']} | {k['p50_ms']} | {k['p99_ms']} |")
    s = r["sigterm"]
    print()
    print(f"/metrics scrapes: {r['metrics_scrapes']}")
    print(f"overload burst: {r['overload']['requests']} requests, {r['overload']['codes']}")
    print(f"SIGTERM: 4 streams being answered -> items {s['marked_streams']}; {s['in_flight']} other requests in "
          f"flight by the client's clock -> {s['in_flight_codes']}; {s['after']} sent after -> {s['after_codes']}; "
          f"exit status {s['exit_status']} after {s['drain_s']} s")
    print(f"answers failing a check: {r['check_failures']}")
    for f in r["first_failures"]:
        print(f"  {f}")
    for f in r["first_load_errors"]:
        print(f"  error: {f}")
    print("PASSED" if r["passed"] else "FAILED")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of load, warm-up included")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--bundle", help="bundle to serve (default: the demo's, built once under --workdir)")
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "soak"))
    p.add_argument("--pool", type=int, default=64, help="images in the fixed pool")
    p.add_argument("--overload-s", type=float, default=15.0, help="seconds of the overload burst (0: none)")
    p.add_argument("--overload-clients", type=int, default=48)
    p.add_argument("--max-queue-size", type=int, default=32, help="the server's --max-queue-size")
    p.add_argument("--grace-s", type=float, default=20.0)
    p.add_argument("--max-rss-growth-pct", type=float, default=5.0, help="0: report only")
    p.add_argument("--swaps", type=int, default=2, help="new versions swapped in during the load")
    p.add_argument("--redis-kills", type=int, default=2, help="times Redis is SIGKILLed and restarted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle) if args.bundle else demo_bundle(workdir)
    if not (bundle / "manifest.json").is_file():
        p.error(f"{bundle} is not a bundle (no manifest.json)")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        result = asyncio.run(run(args, bundle, Path(tmp)))
        if not result["passed"] or args.out is None:
            log = Path(tmp) / "server.log"
            print(f"server log tail:\n{log.read_text()[-3000:]}" if log.is_file() else "")
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
