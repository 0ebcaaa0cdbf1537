"""Live version swaps: is an unloaded version's memory given back?

A repository with one model (ResNet-50 with random weights by default: a 100 MB ONNX model, so a
leak would show) is served with --keep-versions 1; versions 2..N are dropped in one by one and
loaded through ReloadModels. After each swap (the old version unloaded) the server's resident
memory (VmRSS from /proc) is read and compared with its memory after the first load, in the same
run. A version that were never freed would add about its model's size per swap.

    .venv/bin/python bench/bench_reload.py [--model resnet50] [--swaps 6]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import build_bundle  # noqa: E402
from common import publish_version, rss_mib  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "bench"))
    p.add_argument("--swaps", type=int, default=6)
    args = p.parse_args(argv)

    from conceptlens.service.client import ExplainClient
    from conceptlens.service.serve_process import ServeProcess

    bundle = build_bundle(args.model, Path(args.workdir) / f"bundle-{args.model}")
    model_mib = (bundle / "model.onnx").stat().st_size / 2**20
    repo = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    image = next((ROOT.parent / "shared" / "data" / "imagenet-samples").glob("*.jpg"), None)

    publish_version(repo / "m", bundle, 1)
    srv = ServeProcess(None, "--repository-poll-s", "0", "--keep-versions", "1", "--cache-size", "0",
                       repository=repo, log_level="WARNING")
    rows = []
    try:
        srv.wait_ready(300)
        with ExplainClient(srv.target) as c:
            def settle(version: int) -> None:
                end = time.monotonic() + 300
                while True:  # the new version ready, the old one gone (unloaded), memory returned
                    states = {v.version: v.state for m in c.list_models().models for v in m.versions}
                    if states == {version: "READY"}:
                        break
                    if time.monotonic() > end:
                        raise TimeoutError(states)
                    time.sleep(0.2)
                if image is not None:
                    c.explain(image.read_bytes(), top_k=1)
            settle(1)
            rows.append((1, rss_mib(srv.proc.pid)))
            for v in range(2, args.swaps + 2):
                publish_version(repo / "m", bundle, v)
                c.reload_models()
                settle(v)
                time.sleep(1.0)  # the unload thread closes the session after the last request
                rows.append((v, rss_mib(srv.proc.pid)))
    finally:
        srv.stop()
        shutil.rmtree(repo, ignore_errors=True)
    base = rows[0][1]
    print(f"{args.model}: model.onnx {model_mib:.0f} MiB; --keep-versions 1; RSS after each swap")
    print("| version loaded | RSS (MiB) | vs after version 1 |")
    print("|---|---|---|")
    for v, r in rows:
        print(f"| {v} | {r:.0f} | {r / base:.3f} |")
    growth = rows[-1][1] - base
    print(f"growth over {args.swaps} swaps: {growth:+.0f} MiB ({growth / args.swaps:+.1f} MiB a swap; "
          f"a version never freed would add about {model_mib:.0f} MiB a swap)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
