"""TorchServe benchmark: explanations in TorchServe and in the gRPC service vs TorchServe's own.

Same model (EfficientNet-Lite0, ImageNet weights), same machine, same images (ImageNet samples,
short side 256), throughput in images per second with 16 concurrent clients, side by side:

  stock       TorchServe's stock ``image_classifier`` handler, plain predictions (top 5), on the model
              traced to TorchScript (torch on the CPU; the stock handlers cannot run ONNX)
  plain       a minimal plain TorchServe handler (``handlers/plain_handler.py``) on the bundle's
              ONNX model with ONNX Runtime: the same runtime and decoding as the conceptlens handler
  handler     the conceptlens handler in TorchServe: Explain of the top-1 class (all its concepts)
  grpc        the conceptlens gRPC service (``conceptlens serve``, ONNX Runtime, no cache), same Explain
  ig          TorchServe's own explanations endpoint (``/explanations``): Captum Integrated Gradients
              (15 steps) through the stock image handler on the TorchScript model

All four TorchServe models live in one TorchServe (one worker each, batchSize 8, maxBatchDelay 5 ms;
the IG model batchSize 1, as a batch of 8 would run 120 images forward and backward at once); the
gRPC service runs beside it with max batch 8. Measurements are interleaved round by round so that
load changes hit all alike; ratios are medians of per-round ratios. IG is measured once (it is slow).
Clients and servers share this machine's cores, as they would on one host.

Goals (issue 5): the conceptlens handler within 1.15x of TorchServe's plain predictions; the gRPC
service at least as fast as TorchServe's plain predictions; both at least 20x faster than IG.

    .venv/bin/python bench/bench_torchserve.py [--rounds 3] [--requests 128] [--quick] [--json OUT]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA  # noqa: E402

IMAGES = Path(os.environ.get("CONCEPTLENS_BENCH_IMAGES", DATA / "imagenet-samples"))
EXPLAIN = {"top_k": 1, "prototypes_per_concept": 0}  # as bench_serving: top-1 class, all its concepts
KINDS = ("stock", "plain", "handler", "grpc")


# -- models and archives --------------------------------------------------------------------------
def torchscript_lite0(path: Path, onnx_model: Path) -> Path:
    """EfficientNet-Lite0 image -> logits traced to TorchScript (checked against the ONNX logits)."""
    if path.is_file():
        return path
    import torch

    from conceptlens.precompute.models import load_model
    from conceptlens.service.runtime import OnnxRuntime

    m = load_model("efficientnet-lite0")

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.head = m.features, m.torch_head

        def forward(self, x):
            return self.head(self.features(x))

    net = Logits().eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        traced = torch.jit.trace(net, x)
        ref = OnnxRuntime(onnx_model, device="cpu").run(x.numpy())[1]
        assert np.abs(traced(x).numpy() - ref).max() < 1e-3, "TorchScript and ONNX logits differ"
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))
    return path


def archive_args(bundle: Path, store: Path, name: str, batch_size: int):
    from conceptlens.handlers import archive_cli

    p = argparse.ArgumentParser()
    archive_cli.add_arguments(p)
    return p.parse_args(["--bundle", str(bundle), "--out", str(store), "--model-name", name, "--batch-size",
                         str(batch_size), "--max-batch-delay-ms", "5", "--force"])


def stock_archive(store: Path, name: str, model_pt: Path, class_names: list[str], batch_size: int, tmp: Path) -> Path:
    """A .mar for TorchServe's stock image_classifier handler (TorchScript model, label mapping)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "index_to_name.json").write_text(json.dumps({str(i): n for i, n in enumerate(class_names)}))
    (tmp / "model-config.yaml").write_text(f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {batch_size}\n"
                                           f"maxBatchDelay: 5\nresponseTimeout: 600\n")
    (tmp / "tmp").mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", "1.0",
                    "--serialized-file", str(model_pt), "--handler", "image_classifier",
                    "--extra-files", str(tmp / "index_to_name.json"), "--config-file", str(tmp / "model-config.yaml"),
                    "--export-path", str(store), "--force"], check=True, env=dict(os.environ, TMPDIR=str(tmp / "tmp")))
    return store / f"{name}.mar"


# -- clients --------------------------------------------------------------------------------------
class RestClient:
    """One keep-alive HTTP connection; ``call(image)`` -> HTTP status (the body is read in full)."""

    def __init__(self, port: int, path: str, headers: dict[str, str]):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
        self.path, self.headers = path, {"Content-Type": "application/octet-stream", **headers}

    def call(self, image: bytes) -> int:
        self.conn.request("POST", self.path, body=image, headers=self.headers)
        r = self.conn.getresponse()
        r.read()
        return r.status

    def close(self):
        self.conn.close()


class GrpcClient:
    """One channel to the conceptlens service; ``call(image)`` -> 200 or the gRPC status name."""

    def __init__(self, target: str):
        from conceptlens.service.client import ExplainClient

        self.client = ExplainClient(target, timeout=900)
        from conceptlens.v1 import explain_service_pb2 as pb
        from google.protobuf import json_format

        self.pb, self.options = pb, json_format.ParseDict(EXPLAIN, pb.ExplainOptions())

    def call(self, image: bytes):
        import grpc

        try:
            self.client.stub.Explain(self.pb.ExplainRequest(image=image, options=self.options), timeout=900)
            return 200
        except grpc.RpcError as e:
            return e.code().name

    def close(self):
        self.client.close()


def throughput(clients: list, images: list[bytes], total: int) -> tuple[float, list]:
    """Images per second with every client calling in its own thread, ``total`` requests in all."""
    per = max(1, total // len(clients))
    errors: list = []
    barrier = threading.Barrier(len(clients) + 1)

    def work(c, k):
        barrier.wait()
        for i in range(per):
            status = c.call(images[(k * per + i) % len(images)])
            if status != 200:
                errors.append(status)

    threads = [threading.Thread(target=work, args=(c, k)) for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return len(clients) * per / (time.perf_counter() - start), errors


# -- the run --------------------------------------------------------------------------------------

def run(args) -> dict:
    from bench_serving import build_bundle

    from conceptlens.handlers.archive_cli import PLAIN_HANDLER, build_archive
    from conceptlens.handlers.ts_process import TorchServeProcess
    from conceptlens.service.serve_process import ServeProcess
    from conceptlens.service.bundle import load_bundle

    work = Path(args.workdir)
    # torch's OpenMP threads in the stock handlers' workers (ONNX Runtime keeps its own pool). On a
    # shared 2-core machine 2 threads ran the TorchScript model 3-4x slower than 1 (spin-waiting).
    os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    bundle = build_bundle("efficientnet-lite0", ROOT / ".cache" / "bench" / "efficientnet-lite0-timing")
    b = load_bundle(bundle)
    model_pt = torchscript_lite0(ROOT / ".cache" / "bench" / "efficientnet-lite0-logits.pt", b.model_path)
    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    stock_archive(store, "lite0-stock", model_pt, b.class_names, args.batch_size, work / "stage-stock")
    stock_archive(store, "lite0-ig", model_pt, b.class_names, 1, work / "stage-ig")
    build_archive(archive_args(bundle, store, "lite0-plain", args.batch_size), handler=PLAIN_HANDLER)
    build_archive(archive_args(bundle, store, "conceptlens", args.batch_size))
    images = [p.read_bytes() for p in sorted(IMAGES.glob("*.jpg"))[:args.images]]
    names = {"stock": "lite0-stock", "plain": "lite0-plain", "handler": "conceptlens", "ig": "lite0-ig"}
    ts = TorchServeProcess(store, [f"{n}.mar" for n in names.values()], work / "torchserve", token_auth=False,
                           properties={"default_response_timeout": "900"})
    service = None
    clients: dict[str, list] = {}
    thr: dict[str, list[float]] = {k: [] for k in KINDS}
    errors: dict[str, list] = {k: [] for k in (*KINDS, "ig")}
    try:
        ts.start()
        for n in names.values():
            ts.wait_ready(n, 600)
        service = ServeProcess(bundle, "--cache-size", "0", "--max-batch-size", str(args.batch_size),
                               log=work / "service.log", log_level="WARNING")
        service.wait_ready(300)
        target = service.target
        options = {"X-Conceptlens-Options": json.dumps(EXPLAIN)}
        for kind in (*KINDS, "ig"):
            if kind == "grpc":
                clients[kind] = [GrpcClient(target) for _ in range(args.clients)]
            else:
                path = f"/{'explanations' if kind == 'ig' else 'predictions'}/{names[kind]}"
                clients[kind] = [RestClient(ts.http_port, path, options if kind == "handler" else {})
                                 for _ in range(args.clients)]
        print(f"warming up ({args.clients} requests each) ...", flush=True)
        for kind in KINDS:
            throughput(clients[kind], images, args.clients)
        for r in range(args.rounds):
            order = KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]
            for kind in order:
                value, errs = throughput(clients[kind], images, args.requests)
                thr[kind].append(value)
                errors[kind] += errs
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {thr[k][-1]:.1f}" for k in KINDS) + " img/s",
                  flush=True)
        print(f"Integrated Gradients: {args.ig_requests} requests ...", flush=True)
        ig_clients = clients["ig"][:min(args.clients, args.ig_requests)]
        throughput(ig_clients[:1], images, 1)  # warm-up
        ig, errors["ig"] = throughput(ig_clients, images, args.ig_requests)
    finally:
        for cs in clients.values():
            for c in cs:
                c.close()
        if service is not None:
            service.stop()
        ts.stop()
    per_round = lambda a, b: statistics.median(x / y for x, y in zip(thr[a], thr[b]))  # noqa: E731
    spread = lambda a, b: [min(x / y for x, y in zip(thr[a], thr[b])),  # noqa: E731
                           max(x / y for x, y in zip(thr[a], thr[b]))]
    med = {k: statistics.median(v) for k, v in thr.items()}
    return {
        "machine": f"{os.cpu_count()} CPUs", "clients": args.clients, "batch_size": args.batch_size,
        "rounds": args.rounds, "requests_per_round": args.requests, "ig_requests": args.ig_requests,
        "torch_threads": args.torch_threads,
        "throughput": {**med, "ig": ig}, "rounds_throughput": thr,
        "errors": {k: len(v) for k, v in errors.items()},
        "ratios": {
            "plain_vs_handler": per_round("plain", "handler"),
            "stock_vs_handler": per_round("stock", "handler"),
            "grpc_vs_stock": per_round("grpc", "stock"),
            "grpc_vs_plain": per_round("grpc", "plain"),
            "handler_vs_ig": med["handler"] / ig,
            "grpc_vs_ig": med["grpc"] / ig,
            "stock_vs_ig": med["stock"] / ig,
        },
        "ratio_ranges": {"plain_vs_handler": spread("plain", "handler"), "grpc_vs_stock": spread("grpc", "stock"),
                         "grpc_vs_plain": spread("grpc", "plain")},
    }


def report(res: dict) -> str:
    t, q, rr = res["throughput"], res["ratios"], res["ratio_ranges"]
    rng = lambda k: f"[rounds {rr[k][0]:.2f}-{rr[k][1]:.2f}]"  # noqa: E731
    ok = lambda good: "met" if good else "NOT met"  # noqa: E731
    lines = [
        f"conceptlens in TorchServe — {res['machine']}, EfficientNet-Lite0, {res['clients']} concurrent clients, "
        f"batch {res['batch_size']}, {res['rounds']} interleaved rounds x {res['requests_per_round']} requests, "
        f"torch threads {res['torch_threads']}, medians",
        "",
        "throughput (images/s)",
        f"  TorchServe stock image_classifier, plain predictions (TorchScript) {t['stock']:9.2f}",
        f"  TorchServe minimal plain handler, predictions (ONNX Runtime)       {t['plain']:9.2f}",
        f"  conceptlens handler in TorchServe, Explain (ONNX Runtime)          {t['handler']:9.2f}",
        f"  conceptlens gRPC service, Explain (ONNX Runtime)                   {t['grpc']:9.2f}",
        f"  TorchServe /explanations, Integrated Gradients (TorchScript)       {t['ig']:9.3f}",
        "",
        "ratios",
        f"  plain predictions / conceptlens handler, same runtime  {q['plain_vs_handler']:7.3f}  "
        f"(goal <= 1.15: {ok(q['plain_vs_handler'] <= 1.15)}) {rng('plain_vs_handler')}",
        f"  stock predictions / conceptlens handler                {q['stock_vs_handler']:7.3f}  "
        f"(goal <= 1.15: {ok(q['stock_vs_handler'] <= 1.15)})",
        f"  gRPC service / stock predictions                       {q['grpc_vs_stock']:7.3f}  "
        f"(goal >= 1: {ok(q['grpc_vs_stock'] >= 1)}) {rng('grpc_vs_stock')}",
        f"  gRPC service / plain predictions, same runtime         {q['grpc_vs_plain']:7.3f}  "
        f"(goal >= 1: {ok(q['grpc_vs_plain'] >= 1)}) {rng('grpc_vs_plain')}",
        f"  conceptlens handler / Integrated Gradients             {q['handler_vs_ig']:7.1f}  "
        f"(goal >= 20: {ok(q['handler_vs_ig'] >= 20)})",
        f"  gRPC service / Integrated Gradients                    {q['grpc_vs_ig']:7.1f}  "
        f"(goal >= 20: {ok(q['grpc_vs_ig'] >= 20)})",
        f"  (stock predictions / Integrated Gradients              {q['stock_vs_ig']:7.1f})",
    ]
    if any(res["errors"].values()):
        lines.append(f"errors: {res['errors']}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=128, help="requests per configuration per round")
    p.add_argument("--ig-requests", type=int, default=16)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--torch-threads", type=int, default=1, help="OMP_NUM_THREADS of the TorchServe workers")
    p.add_argument("--workdir", default=None, help="archives, TorchServe logs (default: a temporary directory)")
    p.add_argument("--quick", action="store_true", help="1 round of 48 requests, 4 IG requests")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.requests, args.ig_requests = 1, 48, 4
    with tempfile.TemporaryDirectory(prefix="conceptlens-bench-ts-") as tmp:
        args.workdir = args.workdir or tmp
        res = run(args)
    text = report(res)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
