"""How precompute's cost grows with classes and images a class: time per stage and peak RSS.

Feature maps are synthetic, drawn to look like EfficientNet-Lite0's (1280 x 7 x 7, >= 0, sparse:
each class a mixture of 5 directions of its own and 3 shared ones, at random pixels, plus
noise); the head is Lite0's real ImageNet head, so weights, fidelity and the stitched test's
forward are real. Extraction parts are written as the extract stage writes them (``--parts``
data shards), then the learn stage runs in ``--shards`` separate processes side by side, exactly
as the Kubernetes Indexed Jobs run it, then merge. Per setting: seconds per class of each step
(read, fit, evaluate, prototypes, contrast; from the job's own per-class timings), learn wall time,
the largest peak RSS of a learn process, and the merge.

    python bench/scale.py [--classes 10,100] [--images 8,50] [--shards 2] [--method nmf]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

C, H, W = 1280, 7, 7


def write_parts(work: Path, cfg, classes: int, per_class: int, parts: int, seed: int = 0) -> None:
    from PIL import Image

    from conceptlens.precompute.features import ExtractResult, Record, Reservoir, save_part
    from conceptlens.precompute.job import Job

    job = Job(cfg)
    job._check_work_dir()
    buf = io.BytesIO()
    Image.new("RGB", (224, 224), (120, 110, 100)).save(buf, format="JPEG")
    view = buf.getvalue()
    rng = np.random.default_rng(seed)
    shared = np.abs(rng.standard_normal((3, C))).astype(np.float32) * (rng.random((3, C)) < 0.1)
    results = [ExtractResult(reservoirs={}) for _ in range(parts)]
    for cls in range(classes):
        own = np.abs(rng.standard_normal((5, C))).astype(np.float32) * (rng.random((5, C)) < 0.05) * 3
        dirs = np.concatenate([own, shared])
        for i in range(per_class):
            codes = rng.random((H * W, len(dirs))) * (rng.random((H * W, len(dirs))) < 0.3)
            f = (codes @ dirs + 0.05 * rng.random((H * W, C))).T.reshape(C, H, W).astype(np.float16)
            r = results[(cls * per_class + i) % parts]
            res = r.reservoirs.setdefault(cls, Reservoir(cfg.max_images, cfg.seed))
            res.offer(Record(f"{cls:04d}-{i:04d}", f, cls, cls, view))
            r.processed += 1
    for i, r in enumerate(results):
        save_part(job.part_path(i, parts), r, job.hash, cells=cfg.prototype_cells)


def run_setting(classes: int, per_class: int, shards: int, method: str, root: Path) -> dict:
    from conceptlens.precompute.job import PrecomputeConfig

    work, out = root / f"c{classes}-i{per_class}.work", root / f"c{classes}-i{per_class}"
    data = root / "nodata"
    data.mkdir(exist_ok=True)
    common = dict(model="efficientnet-lite0", data=str(data), out=str(out), work=str(work), group_by="predicted",
                  method=method, min_images=min(5, per_class), max_images=max(per_class, 8), device="cpu")
    t = time.perf_counter()
    write_parts(work, PrecomputeConfig(**common, shard=(0, shards)), classes, per_class, shards)
    t_parts = time.perf_counter() - t
    args = ["--model", "efficientnet-lite0", "--data", str(data), "--out", str(out), "--work", str(work),
            "--group-by", "predicted", "--method", method, "--min-images", str(common["min_images"]),
            "--max-images", str(common["max_images"]), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "conceptlens", "precompute", *args, "--stage", "learn",
                               "--shard", f"{i}/{shards}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(shards)]
    logs = [p.communicate()[0] for p in procs]
    t_learn = time.perf_counter() - t
    if any(p.returncode for p in procs):
        raise SystemExit("learn failed:\n" + "\n".join(log[-2000:] for log in logs))
    t = time.perf_counter()
    merge = subprocess.run([sys.executable, "-m", "conceptlens", "merge", str(work), "--out", str(out)], env=env,
                           capture_output=True, text=True)
    t_merge = time.perf_counter() - t
    if merge.returncode:
        raise SystemExit(merge.stderr[-2000:])
    steps: dict[str, list[float]] = {}
    rss = []
    for log in logs:
        for m in re.finditer(r"seconds: ([^;]*); peak RSS (\d+) MiB", log):
            for part in m.group(1).split(", "):
                name, v = part.rsplit(" ", 1)
                steps.setdefault(name, []).append(float(v))
            rss.append(float(m.group(2)))
    merge_rss = re.findall(r"peak RSS (\d+) MiB", merge.stderr + merge.stdout)
    return {"classes": classes, "images": per_class, "shards": shards, "parts_s": t_parts, "learn_s": t_learn,
            "merge_s": t_merge, "per_class_s": {k: float(np.mean(v)) for k, v in steps.items()},
            "learn_peak_rss_mib": max(rss, default=float("nan")),
            "merge_peak_rss_mib": float(merge_rss[-1]) if merge_rss else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", default="10,100")
    ap.add_argument("--images", default="8,50")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--method", default="nmf")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="conceptlens-scale-") as tmp:
        for n_cls in [int(c) for c in args.classes.split(",")]:
            for n_img in [int(i) for i in args.images.split(",")]:
                r = run_setting(n_cls, n_img, args.shards, args.method, Path(tmp))
                rows.append(r)
                print(f"  {n_cls} classes x {n_img} images: learn {r['learn_s']:.0f} s", file=sys.stderr, flush=True)
    steps = sorted({k for r in rows for k in r["per_class_s"]}, key=["read", "fit", "evaluate", "prototypes",
                                                                     "contrast"].index)
    print(f"\n--method {args.method}, {args.shards} learn processes side by side (one thread each)\n")
    print("| classes | images a class | " + " | ".join(f"{s} s/class" for s in steps)
          + " | learn wall | s/class (wall) | learn peak RSS | merge | merge peak RSS |")
    print("|---|---|" + "---|" * (len(steps) + 5))
    for r in rows:
        print(f"| {r['classes']} | {r['images']} | " + " | ".join(f"{r['per_class_s'].get(s, float('nan')):.3f}"
                                                                  for s in steps)
              + f" | {r['learn_s']:.0f} s | {r['learn_s'] / r['classes']:.2f} | {r['learn_peak_rss_mib']:.0f} MiB"
              + f" | {r['merge_s']:.0f} s | {r['merge_peak_rss_mib']:.0f} MiB |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
