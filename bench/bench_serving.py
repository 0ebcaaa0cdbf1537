"""Serving benchmark: bare ONNX Runtime vs the gRPC service, side by side in one run.

For each model (EfficientNet-Lite0 with its ImageNet weights, ResNet-50 with random weights; both
with random non-negative concept bases for all 1000 classes, which is fine for timing):

  1. bare ONNX Runtime on the already decoded tensor: batch-1 latency and batched throughput
     (batch = the server's max batch size), same session settings as the server;
  2. the server (`conceptlens serve`, a separate process, no cache): Explain and a plain
     prediction (top_k = 0, same decode, same server) at batch 1 (one client, sequential, the
     shipped blocking client), and throughput with 16 concurrent clients (grpc.aio, one channel
     each; the mean batch size comes from the server's /metrics);
  3. the server with a cache (Redis alone, i.e. a hit another replica cached, and the in-process
     LRU, i.e. a hit this replica cached: with --redis-url the server runs both, LRU first): a
     miss (new image) vs a hit (same image again);
  4. the floor under any Python gRPC service on this machine, measured, not assumed: a minimal
     grpc.aio service in its own process (one hop to a worker thread, decode + preprocess, the
     same ONNX Runtime model at batch 1, a fixed reply; no batcher, explanation, metrics or
     cache), timed in the same interleaved rounds. minimal / bare is the best Explain/bare
     latency a Python service that decodes JPEGs can reach here; Explain / minimal is what
     conceptlens itself adds. The same process answers an echo (the request parsed, a fixed
     reply, on the event loop): a gRPC round trip that does nothing, the floor under a cache hit.

Printed: ratios, with the medians they come from. Goals (issue 3): Explain latency <= 1.10x bare
inference; Explain throughput >= 0.9x bare batched inference; a cache hit >= 20x faster than a miss.

    .venv/bin/python bench/bench_serving.py [--models efficientnet-lite0,resnet50] [--quick]

Bundles are built once under --workdir (needs the precompute extras: torch, torchvision, onnx).
Clients and server share this machine's cores, as they would on one host.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA  # noqa: E402

IMAGES = Path(os.environ.get("CONCEPTLENS_BENCH_IMAGES", DATA / "imagenet-samples"))


# -- bundles -----------------------------------------------------------------------------------
def build_bundle(model_name: str, out: Path, k: int = 10, seed: int = 0) -> Path:
    """A timing bundle: the real model exported to ONNX, random non-negative bases for every class."""
    if (out / "manifest.json").is_file():
        return out
    from conceptlens.precompute.bundle_writer import write_bundle
    from conceptlens.precompute.models import load_model
    from conceptlens.service.manifest import ClassEntry, MethodCard

    model = load_model(model_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_path = out.parent / f"{out.name}.onnx"
    model.export_onnx(onnx_path)
    rng = np.random.default_rng(seed)
    w, b = model.head.weight, model.head.bias
    c = model.feature_shape[0]
    classes, tensors = {}, {}
    for cid, name in enumerate(model.class_names):
        basis = np.abs(rng.standard_normal((k, c))).astype(np.float32)
        basis *= rng.random((k, c)) < 0.2  # sparse, like NMF directions
        tensors[f"basis/{cid}"] = basis
        tensors[f"weights/{cid}"] = (basis @ w[cid]).astype(np.float32)
        classes[cid] = ClassEntry(name=name, k=k, method="random-timing")
    write_bundle(out, model_onnx=onnx_path, model=model.card(), class_names=model.class_names,
                 preprocessing=model.preprocessing, head_weight=w, head_bias=b,
                 head_onnx=None, classes=classes, tensors=tensors, prototypes={}, prototype_jpegs={},
                 method=MethodCard("random-timing", {"concepts": k}))
    onnx_path.unlink(missing_ok=True)
    return out


# -- helpers -----------------------------------------------------------------------------------
def unique(image: bytes) -> bytes:
    """The same JPEG with a nonce after its end marker: decodes the same, hashes differently."""
    return image + b"\xff\xfe" + uuid.uuid4().bytes  # trailing bytes after EOI are ignored by decoders


def timed_calls(call, args) -> list[tuple[float, object]]:
    """(seconds, result) of ``call(a)`` for each of ``args``, one after the other."""
    out = []
    for a in args:
        t = time.perf_counter()
        result = call(a)
        out.append((time.perf_counter() - t, result))
    return out


def median_ms(xs) -> float:
    return statistics.median(xs) * 1e3


def start_server(bundle: Path, args: argparse.Namespace, *extra: str):
    """``conceptlens serve`` with the benchmark's settings, ready to answer."""
    from conceptlens.service.serve_process import ServeProcess

    srv = ServeProcess(bundle, "--max-batch-size", str(args.max_batch_size), "--intra-op-threads", str(args.threads),
                       "--workers", str(args.workers), *(["--ort-spin"] if args.spin else []), *extra,
                       log_level="WARNING")
    srv.wait_ready(300)
    return srv


# -- measurements ------------------------------------------------------------------------------
class BareOnnx:
    """ONNX Runtime alone on already decoded tensors, with the server's session settings."""

    def __init__(self, bundle_dir: Path, images: list[bytes], args):
        from conceptlens.service.bundle import load_bundle
        from conceptlens.service.preprocess import preprocess_bytes
        from conceptlens.service.runtime import OnnxRuntime

        bundle = load_bundle(bundle_dir, verify=False)
        self.rt = OnnxRuntime(bundle.model_path, device=args.device, intra_op_threads=args.threads, spin=args.spin)
        self.xs = [preprocess_bytes(im, bundle.preprocessing)[0] for im in images]
        self.n = args.max_batch_size
        self.batch = np.stack([self.xs[i % len(self.xs)] for i in range(self.n)])
        for _ in range(3):
            self.rt.run(self.xs[0][None])
            self.rt.run(self.batch)

    def latencies(self, count: int, start: int = 0) -> list[float]:
        inputs = [self.xs[i % len(self.xs)][None] for i in range(start, start + count)]
        return [seconds for seconds, _ in timed_calls(self.rt.run, inputs)]

    def throughput(self, images: int) -> float:
        rounds = max(1, images // self.n)
        t = time.perf_counter()
        for _ in range(rounds):
            self.rt.run(self.batch)
        return rounds * self.n / (time.perf_counter() - t)

    def close(self):
        self.rt.close()


def _minimal_service(port_queue, bundle_dir: str, threads: int, spin: bool, device: str) -> None:
    """The least a Python gRPC service of this shape can do: grpc.aio, one hop to a worker thread,
    decode + preprocess, ONNX Runtime at batch 1 with the server's settings, a fixed 1 KB reply.
    No batcher, no explanation, no metrics, no cache."""
    import concurrent.futures

    import grpc

    from conceptlens.service.bundle import load_bundle
    from conceptlens.service.preprocess import preprocess
    from conceptlens.service.runtime import OnnxRuntime
    from conceptlens.service.server import SERVICE_NAME
    from conceptlens.v1 import explain_service_pb2 as pb

    bundle = load_bundle(bundle_dir, verify=False)
    rt = OnnxRuntime(bundle.model_path, device=device, intra_op_threads=threads, spin=spin)
    pool = concurrent.futures.ThreadPoolExecutor(2)
    reply = pb.ExplainResponse(bundle_id="x" * 1024).SerializeToString()  # about an answer's size

    def infer(request: pb.ExplainRequest) -> bytes:
        rt.run(preprocess(request.image, bundle.preprocessing).input[None])
        return reply

    async def explain(request, context) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(pool, infer, request)

    async def echo(request, context) -> bytes:
        return reply

    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Explain": grpc.unary_unary_rpc_method_handler(
                explain, request_deserializer=pb.ExplainRequest.FromString),
            "Echo": grpc.unary_unary_rpc_method_handler(echo, request_deserializer=pb.ExplainRequest.FromString)}),))
        port_queue.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()
    asyncio.run(main())


class MinimalService:
    """:func:`_minimal_service` in its own process, called with the shipped blocking client."""

    def __init__(self, bundle: Path, args):
        import multiprocessing as mp

        from conceptlens.service.client import ExplainClient
        from conceptlens.service.server import SERVICE_NAME
        from conceptlens.v1 import explain_service_pb2 as pb

        self.pb = pb
        ctx = mp.get_context("spawn")
        ports = ctx.Queue()
        self.proc = ctx.Process(target=_minimal_service, args=(ports, str(bundle), args.threads, args.spin,
                                                               args.device), daemon=True)
        self.proc.start()
        self.client = ExplainClient(f"127.0.0.1:{ports.get(timeout=300)}")
        self.echo = self.client.channel.unary_unary(f"/{SERVICE_NAME}/Echo", request_serializer=pb.ExplainRequest.SerializeToString,
                                                    response_deserializer=pb.ExplainResponse.FromString)

    def latencies(self, images: list[bytes], count: int, start: int = 0, echo: bool = False) -> list[float]:
        requests = [self.pb.ExplainRequest(image=unique(images[i % len(images)])) for i in range(start, start + count)]
        return [seconds for seconds, _ in timed_calls(self.echo if echo else self.client.stub.Explain, requests)]

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.join(10)


def mean_batch_size(srv) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    from conceptlens.service.metrics import metric_value

    text = srv.metrics()
    return metric_value(text, "conceptlens_batch_size_sum"), metric_value(text, "conceptlens_batch_size_count")


class Clients:
    """A sequential caller (the shipped blocking client) and ``clients`` concurrent grpc.aio ones."""

    def __init__(self, target: str, images: list[bytes], clients: int):
        import grpc

        from conceptlens.service.client import channel_options
        from conceptlens.v1 import explain_service_pb2 as pb
        from conceptlens.v1 import explain_service_pb2_grpc as pb_grpc

        from conceptlens.service.client import ExplainClient

        self.pb, self.images = pb, images
        self.blocking = ExplainClient(target)
        self.last: tuple = ()  # (seconds, the server's stage timings) of the last sequential answer
        self.loop = asyncio.new_event_loop()

        async def connect():  # aio channels belong to the loop they are made in
            self.channels = [grpc.aio.insecure_channel(target, options=channel_options()) for _ in range(clients)]
            self.stubs = [pb_grpc.ExplainServiceStub(ch) for ch in self.channels]
            warm = self.pb.ExplainRequest(image=unique(images[0]), options=self.pb.ExplainOptions(top_k=0))
            await asyncio.gather(*(s.Explain(warm) for s in self.stubs))
        self.loop.run_until_complete(connect())

    def sequential(self, options, count: int, fresh: bool = True, start: int = 0) -> list[float]:
        """Latencies of ``count`` requests one after the other (new image bytes each, unless not fresh)."""
        requests = [self.pb.ExplainRequest(image=unique(self.images[i % len(self.images)]) if fresh
                                           else self.images[0], options=options) for i in range(start, start + count)]
        calls = timed_calls(self.blocking.stub.Explain, requests)
        self.last = (calls[-1][0], calls[-1][1].timings)
        return [seconds for seconds, _ in calls]

    def concurrent(self, options, total: int) -> float:
        """Images per second with all clients calling at once, each on its own channel."""
        per = max(1, total // len(self.stubs))
        requests = [[self.pb.ExplainRequest(image=unique(self.images[(c * per + i) % len(self.images)]),
                                            options=options) for i in range(per)] for c in range(len(self.stubs))]

        async def one(stub, reqs):
            for r in reqs:
                await stub.Explain(r)

        async def run():
            t = time.perf_counter()
            await asyncio.gather(*(one(s, r) for s, r in zip(self.stubs, requests)))
            return len(self.stubs) * per / (time.perf_counter() - t)
        return self.loop.run_until_complete(run())

    def close(self):
        for ch in self.channels:
            self.loop.run_until_complete(ch.close())
        self.loop.close()
        self.blocking.close()


def bench_model(name: str, bundle: Path, images: list[bytes], args) -> dict:
    """All measurements of one model, interleaved round by round so that load changes hit all alike."""
    minimal = MinimalService(bundle, args)  # the floors: a minimal service and a gRPC echo
    try:
        return _measure(name, bundle, images, args, minimal)
    finally:
        minimal.close()


def _measure(name: str, bundle: Path, images: list[bytes], args, minimal: MinimalService) -> dict:
    from conceptlens.v1 import explain_service_pb2 as pb

    explain = pb.ExplainOptions(top_k=1, prototypes_per_concept=0)  # top-1 class, all its concepts
    plain = pb.ExplainOptions(top_k=0)  # predictions only: same server, same decode
    res = {"model": name}
    bare = BareOnnx(bundle, images, args)
    print(f"[{name}] bare ONNX Runtime vs the server without cache, {args.rounds} interleaved rounds ...", flush=True)
    srv = start_server(bundle, args, "--cache-size", "0")
    clients = None
    lat = {"bare": [], "explain": [], "plain": [], "minimal": []}
    thr = {"bare": [], "explain": [], "plain": []}
    batches = {"explain": [0.0, 0.0], "plain": [0.0, 0.0]}
    try:
        clients = Clients(srv.target, images, args.clients)
        minimal.latencies(images, 5)
        stages = []
        kinds = ("bare", "explain", "plain", "minimal")
        for i in range(args.latency_requests):  # one of each, in rotating order: paired under the same load
            for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
                if kind == "bare":
                    lat["bare"] += bare.latencies(1, start=i)
                elif kind == "minimal":
                    lat["minimal"] += minimal.latencies(images, 1, start=i)
                else:
                    lat[kind] += clients.sequential(explain if kind == "explain" else plain, 1, start=i)
                    if kind == "explain":
                        stages.append(clients.last)
        per_round = max(args.max_batch_size, args.throughput_requests // args.rounds)
        for r in range(args.rounds):
            order = ("bare", "explain", "plain")[r % 3:] + ("bare", "explain", "plain")[:r % 3]
            for kind in order:
                if kind == "bare":
                    thr[kind].append(bare.throughput(per_round))
                    continue
                before = mean_batch_size(srv)
                thr[kind].append(clients.concurrent(explain if kind == "explain" else plain, per_round))
                after = mean_batch_size(srv)
                batches[kind] = [batches[kind][0] + after[0] - before[0], batches[kind][1] + after[1] - before[1]]
    finally:
        if clients is not None:
            clients.close()
        srv.stop()
        bare.close()
    paired = lambda a, b: statistics.median(x / y for x, y in zip(a, b))  # noqa: E731
    res["bare"] = {"latency_ms": median_ms(lat["bare"]), "throughput": statistics.median(thr["bare"])}
    res["explain_latency_ms"], res["plain_latency_ms"] = median_ms(lat["explain"]), median_ms(lat["plain"])
    res["minimal_latency_ms"] = median_ms(lat["minimal"])
    res["explain_throughput"] = statistics.median(thr["explain"])
    res["plain_throughput"] = statistics.median(thr["plain"])
    med = lambda f: statistics.median(f(wall, t) for wall, t in stages) * 1e3  # noqa: E731
    res["explain_stages_ms"] = {
        "decode": med(lambda w, t: t.decode_seconds), "inference": med(lambda w, t: t.inference_seconds),
        "explain": med(lambda w, t: t.explain_seconds), "encode": med(lambda w, t: t.encode_seconds),
        "rest": med(lambda w, t: w - t.decode_seconds - t.inference_seconds - t.explain_seconds
                    - t.encode_seconds)}
    res["explain_mean_batch"] = batches["explain"][0] / max(batches["explain"][1], 1)
    res["plain_mean_batch"] = batches["plain"][0] / max(batches["plain"][1], 1)
    res["ratios"] = {
        "explain_vs_bare_latency": paired(lat["explain"], lat["bare"]),
        "plain_vs_bare_latency": paired(lat["plain"], lat["bare"]),
        "explain_vs_plain_latency": paired(lat["explain"], lat["plain"]),
        "minimal_vs_bare_latency": paired(lat["minimal"], lat["bare"]),
        "explain_vs_minimal_latency": paired(lat["explain"], lat["minimal"]),
        "explain_vs_bare_throughput": paired(thr["explain"], thr["bare"]),
        "plain_vs_bare_throughput": paired(thr["plain"], thr["bare"]),
        "explain_vs_bare_throughput_rounds": [e / b for e, b in zip(thr["explain"], thr["bare"])],
    }
    for backend in args.cache_backends:
        print(f"[{name}] cache misses vs hits, {backend} ...", flush=True)
        extra = ["--redis-url", args.redis_url, "--cache-namespace", f"bench-{uuid.uuid4().hex[:8]}", "--cache-size", "0"] \
            if backend == "redis" else ["--cache-size", "4096"]
        srv = start_server(bundle, args, *extra)
        clients, miss, hit, warm_hit, echo = None, [], [], [], []
        try:
            clients = Clients(srv.target, images, 1)
            clients.sequential(explain, 1, fresh=False)  # the image that will hit
            for i in range(args.cache_requests):  # alternating: paired under the same load
                miss += clients.sequential(explain, 1, fresh=True, start=i)
                hit += clients.sequential(explain, 1, fresh=False)
            for i in range(args.cache_requests):  # hits back to back, paired with a gRPC echo
                warm_hit += clients.sequential(explain, 1, fresh=False)
                echo += minimal.latencies(images, 1, start=i, echo=True)
        finally:
            if clients is not None:
                clients.close()
            srv.stop()
        res[f"{backend}_miss_ms"], res[f"{backend}_hit_ms"] = median_ms(miss), median_ms(hit)
        res[f"{backend}_warm_hit_ms"], res[f"{backend}_echo_ms"] = median_ms(warm_hit), median_ms(echo)
        res["ratios"][f"{backend}_miss_vs_hit"] = statistics.median(m / h for m, h in zip(miss, hit))
        res["ratios"][f"{backend}_miss_vs_echo"] = res[f"{backend}_miss_ms"] / res[f"{backend}_echo_ms"]
    return res


def report(results: list[dict], args) -> str:
    lines = [f"conceptlens serving benchmark — {os.cpu_count()} CPUs, device {args.device}, max batch "
             f"{args.max_batch_size}, {args.clients} concurrent clients, ORT threads "
             f"{args.threads or 'default'}, medians", ""]
    head = f"{'':44}" + "".join(f"{r['model']:>22}" for r in results)
    lines.append(head)

    def row(label, fn):
        lines.append(f"{label:44}" + "".join(f"{fn(r):>22}" for r in results))

    q = lambda key: (lambda r: f"{r['ratios'][key]:.3f}")  # noqa: E731
    row("bare ORT batch-1 latency (ms)", lambda r: f"{r['bare']['latency_ms']:.2f}")
    row("Explain batch-1 latency (ms)", lambda r: f"{r['explain_latency_ms']:.2f}")
    row("plain prediction batch-1 latency (ms)", lambda r: f"{r['plain_latency_ms']:.2f}")
    row("  Explain / bare latency   (goal <= 1.10)", q("explain_vs_bare_latency"))
    row("  plain / bare latency (serving overhead)", q("plain_vs_bare_latency"))
    row("  Explain / plain latency (explain cost)", q("explain_vs_plain_latency"))
    row("  Explain stages: decode / inference (ms)", lambda r: "{decode:.2f} / {inference:.2f}".format(
        **r["explain_stages_ms"]))
    row("  explain / encode / rest: gRPC, hops (ms)", lambda r: "{explain:.2f} / {encode:.2f} / {rest:.2f}".format(
        **r["explain_stages_ms"]))
    row("minimal service: gRPC + decode + ORT (ms)", lambda r: f"{r['minimal_latency_ms']:.2f}")
    row("  minimal / bare latency (the floor here)", q("minimal_vs_bare_latency"))
    row("  Explain / minimal latency (conceptlens's own)", q("explain_vs_minimal_latency"))
    row(f"bare ORT batch-{args.max_batch_size} throughput (img/s)", lambda r: f"{r['bare']['throughput']:.1f}")
    row(f"Explain throughput, {args.clients} clients (img/s)", lambda r: f"{r['explain_throughput']:.1f}")
    row(f"plain throughput, {args.clients} clients (img/s)", lambda r: f"{r['plain_throughput']:.1f}")
    row("  mean batch size, Explain / plain", lambda r: f"{r['explain_mean_batch']:.1f} / {r['plain_mean_batch']:.1f}")
    row("  Explain / bare throughput (goal >= 0.90)", q("explain_vs_bare_throughput"))
    row("  plain / bare throughput", q("plain_vs_bare_throughput"))
    row("  Explain / bare throughput, min-max", lambda r: "{:.2f}-{:.2f}".format(
        min(r["ratios"]["explain_vs_bare_throughput_rounds"]), max(r["ratios"]["explain_vs_bare_throughput_rounds"])))
    for backend in args.cache_backends:
        row(f"{backend} cache miss / hit (ms)", lambda r, b=backend: f"{r[f'{b}_miss_ms']:.2f} / {r[f'{b}_hit_ms']:.3f}")
        row(f"  {backend} miss / hit      (goal >= 20)", lambda r, b=backend: f"{r['ratios'][f'{b}_miss_vs_hit']:.1f}")
        row(f"  {backend} hits back to back / gRPC echo (ms)",
            lambda r, b=backend: f"{r[f'{b}_warm_hit_ms']:.3f} / {r[f'{b}_echo_ms']:.3f}")
        row(f"  {backend} miss / echo (best a hit could do)", lambda r, b=backend: f"{r['ratios'][f'{b}_miss_vs_echo']:.1f}")
    lines += ["", "Ratios are medians of paired measurements (one of each kind in turn, same load); "
              "times are medians."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="efficientnet-lite0,resnet50")
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "bench"))
    p.add_argument("--images", type=int, default=32, help="distinct images from the sample set")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--spin", action="store_true", help="let ORT threads spin (server and bare alike)")
    p.add_argument("--device", default="auto")
    p.add_argument("--latency-requests", type=int, default=90, help="paired batch-1 requests")
    p.add_argument("--throughput-requests", type=int, default=480, help="images per kind, over all rounds")
    p.add_argument("--cache-requests", type=int, default=60, help="paired misses and hits")
    p.add_argument("--cache-backends", default="redis,memory")
    p.add_argument("--redis-url", default=os.environ.get("CONCEPTLENS_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--rounds", type=int, default=10, help="interleaved throughput rounds")
    p.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    args.cache_backends = [b for b in args.cache_backends.split(",") if b]
    if args.quick:
        args.latency_requests, args.throughput_requests, args.cache_requests, args.rounds = 15, 96, 15, 3
    files = sorted(IMAGES.glob("*.jpg"))[: args.images]
    if not files:
        print(f"no images in {IMAGES}", file=sys.stderr)
        return 2
    images = [f.read_bytes() for f in files]
    results = []
    for name in [m for m in args.models.split(",") if m]:
        bundle = build_bundle(name, Path(args.workdir) / f"{name}-timing")
        results.append(bench_model(name, bundle, images, args))
    text = report(results, args)
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
