"""HTTP/JSON explain vs gRPC explain, and plain prediction vs Explain, through one server, side by side.

EfficientNet-Lite0 (random non-negative bases for its 1000 classes, as bench_serving.py builds
them), 32 ImageNet sample JPEGs, one sequential client per transport, the calls interleaved in
rounds (gRPC, HTTP, gRPC plain, HTTP plain, ...) so that both see the same machine. Each image
is made unique per call (a nonce after its end marker), so no answer comes from the cache.

Printed: median latencies and the ratios HTTP / gRPC (goal <= 1.15) and Explain / plain
prediction (the marginal cost of explaining), each per transport.

    .venv/bin/python bench/bench_http.py [--model efficientnet-lite0] [--requests 200]
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import IMAGES, build_bundle, unique  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "bench"))
    p.add_argument("--requests", type=int, default=200, help="calls of each kind")
    args = p.parse_args(argv)

    from conceptlens.service.client import ExplainClient
    from conceptlens.service.serve_process import ServeProcess

    bundle = build_bundle(args.model, Path(args.workdir) / f"bundle-{args.model}")
    images = [f.read_bytes() for f in sorted(IMAGES.glob("*.jpg"))[:32]]
    srv = ServeProcess(bundle, "--cache-size", "0", "--no-concept-metrics", log_level="WARNING")
    srv.wait_ready(300)
    conn = http.client.HTTPConnection(srv.host, srv.http_port, timeout=30)  # keep-alive, like a gRPC channel
    explain_q = urllib.parse.quote(json.dumps({"top_k": 1}))
    plain_q = urllib.parse.quote(json.dumps({"top_k": 0}))

    def http_call(image: bytes, query: str) -> None:
        conn.request("POST", f"/v1/models/{bundle.name}:explain?options={query}", body=image,
                     headers={"Content-Type": "image/jpeg"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(body[:200])
        json.loads(body)  # what a client does with it

    times: dict[str, list[float]] = {k: [] for k in ("grpc", "http", "grpc plain", "http plain")}
    try:
        with ExplainClient(srv.target) as client:
            calls = {"grpc": lambda im: client.explain(im, top_k=1),
                     "http": lambda im: http_call(im, explain_q),
                     "grpc plain": lambda im: client.explain(im, top_k=0),
                     "http plain": lambda im: http_call(im, plain_q)}
            for i in range(8):  # warm both paths
                for call in calls.values():
                    call(unique(images[i % len(images)]))
            for i in range(args.requests):
                for kind, call in calls.items():
                    image = unique(images[i % len(images)])
                    t = time.perf_counter()
                    call(image)
                    times[kind].append(time.perf_counter() - t)
    finally:
        conn.close()
        srv.stop()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{args.model}, {args.requests} calls of each kind, interleaved, no cache")
    for k, v in med.items():
        print(f"  {k:<12} median {v:7.2f} ms")
    print(f"  HTTP / gRPC explain latency:        {med['http'] / med['grpc']:.3f}  (goal <= 1.15)")
    print(f"  HTTP / gRPC plain latency:          {med['http plain'] / med['grpc plain']:.3f}")
    print(f"  Explain / plain, gRPC (marginal):   {med['grpc'] / med['grpc plain']:.3f}")
    print(f"  Explain / plain, HTTP (marginal):   {med['http'] / med['http plain']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
