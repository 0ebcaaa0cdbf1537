"""How precompute's cost grows with classes and images a class: time per stage and peak RSS.

Feature maps are synthetic, drawn to look like EfficientNet-Lite0's (1280 x 7 x 7, >= 0, sparse:
each class a mixture of 5 directions of its own and 3 shared ones, at random pixels, plus
noise); the head is Lite0's real ImageNet head, so weights, fidelity and the stitched test's
forward are real. Extraction parts are written as the extract stage writes them (one per learn
shard, with spill files past 1 GiB of maps), then the learn stage runs in ``--shards`` separate processes side by side, exactly
as the Kubernetes Indexed Jobs run it, then merge. Per setting: seconds per class of each step
(read, fit, evaluate, prototypes, contrast; from the job's own per-class timings), learn wall time,
the largest peak RSS of a learn process, and the merge.

    python bench/scale.py [--classes 10,100,1000] [--images 8,50,150] [--shards 2] [--method nmf]
                          [--plot docs/scale.png] [--json scale.json]

It ends with an extrapolation to full ImageNet (1000 classes x 150 kept images) on N learn processes.
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

sys.path.insert(0, str(Path(__file__).parent))

C, H, W = 1280, 7, 7


def write_parts(work: Path, cfg, classes: int, per_class: int, parts: int, seed: int = 0,
                chunk_bytes: int = 1 << 30) -> None:
    """The extraction parts as ``parts`` extract shards write them, one chunk of classes in memory at a
    time (past ``chunk_bytes`` of maps a chunk goes to a spill file, as extraction spills past its
    budget): image i of class y goes to part (y * per_class + i) % parts; every map drawn from a seed
    of its own (seed, y, i)."""
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
    for p in range(parts):
        path = job.part_path(p, parts)
        result, spills, held, processed = ExtractResult(reservoirs={}), [], 0, 0
        for cls in range(classes):
            crng = np.random.default_rng((seed, cls))
            own = np.abs(crng.standard_normal((5, C))).astype(np.float32) * (crng.random((5, C)) < 0.05) * 3
            dirs = np.concatenate([own, shared])
            for i in range(per_class):
                if (cls * per_class + i) % parts != p:
                    continue
                irng = np.random.default_rng((seed, cls, i))
                codes = irng.random((H * W, len(dirs)), np.float32) * (irng.random((H * W, len(dirs))) < 0.3)
                f = (codes @ dirs + 0.05 * irng.random((H * W, C), np.float32)).T.reshape(C, H, W).astype(np.float16)
                res = result.reservoirs.setdefault(cls, Reservoir(cfg.max_images, cfg.seed))
                res.offer(Record(f"{cls:04d}-{i:04d}", f, cls, cls, view))
                held += f.nbytes
                processed += 1
            if held >= chunk_bytes and cls < classes - 1:
                name = f"spill/{path.stem}.{len(spills):04d}.safetensors"
                save_part(path.parent / name, result, job.hash, cells=cfg.prototype_cells)
                spills.append(name)
                result, held = ExtractResult(reservoirs={}), 0
        result.processed = processed
        save_part(path, result, job.hash, cells=cfg.prototype_cells, spills=spills)
        del result


def cli_config(args: list[str]):
    """The configuration ``conceptlens precompute ARGS`` runs with (so the parts carry its hash)."""
    from conceptlens.precompute.job_cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(args))


def run_setting(classes: int, per_class: int, shards: int, method: str, root: Path, parts: int) -> dict:
    work, out = root / f"c{classes}-i{per_class}.work", root / f"c{classes}-i{per_class}"
    data = root / "nodata"
    data.mkdir(exist_ok=True)
    min_images, max_images = min(5, per_class), max(per_class, 8)
    args = ["--model", "efficientnet-lite0", "--data", str(data), "--out", str(out), "--work", str(work),
            "--group-by", "predicted", "--method", method, "--min-images", str(min_images),
            "--max-images", str(max_images), "--device", "cpu"]
    t = time.perf_counter()
    write_parts(work, cli_config(args + ["--shard", f"0/{parts}"]), classes, per_class, parts)
    t_parts = time.perf_counter() - t
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
    mined = [float(m.group(1)) for log in logs for m in re.finditer(r"in one pass, ([0-9.]+) s", log)]
    merge_rss = re.findall(r"peak RSS (\d+) MiB", merge.stderr + merge.stdout)
    return {"classes": classes, "images": per_class, "shards": shards, "parts_s": t_parts, "learn_s": t_learn,
            "merge_s": t_merge, "mine_s": max(mined, default=float("nan")), "per_class_s": {k: float(np.mean(v)) for k, v in steps.items()},
            "learn_peak_rss_mib": max(rss, default=float("nan")),
            "merge_peak_rss_mib": float(merge_rss[-1]) if merge_rss else float("nan")}


def run_imagenet(shards: int, method: str, root: Path, per_class: int = 8) -> dict:
    """The real thing at 1000 classes: ``per_class`` flipped and shifted crops of each of the 1000
    ImageNet samples (../shared/data), EfficientNet-Lite0, grouped by label; extract, learn (each in
    ``shards`` processes side by side) and merge through the CLI, as the Indexed Jobs run them."""
    from faithfulness import imagenet_folder

    data = imagenet_folder(1, per_class)
    work, out = root / "imagenet.work", root / "imagenet"
    args = ["--model", "efficientnet-lite0", "--data", str(data), "--out", str(out), "--work", str(work),
            "--group-by", "label", "--method", method, "--min-images", "5", "--max-images", str(per_class),
            "--device", "cpu", "--examples", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    times, logs = {}, {}
    for stage in ("extract", "learn"):
        t = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "conceptlens", "precompute", *args, "--stage", stage,
                                   "--shard", f"{i}/{shards}"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(shards)]
        logs[stage] = [p.communicate()[0] for p in procs]
        times[stage] = time.perf_counter() - t
        if any(p.returncode for p in procs):
            raise SystemExit(f"{stage} failed:\n" + "\n".join(log[-3000:] for log in logs[stage]))
    t = time.perf_counter()
    merge = subprocess.run([sys.executable, "-m", "conceptlens", "merge", str(work), "--out", str(out)], env=env,
                           capture_output=True, text=True)
    times["merge"] = time.perf_counter() - t
    if merge.returncode:
        raise SystemExit(merge.stderr[-2000:])
    rss = {stage: max((float(x) for log in logs[stage] for x in re.findall(r"peak RSS (\d+) MiB", log)),
                      default=float("nan")) for stage in logs}
    mined = [float(m.group(1)) for log in logs["learn"] for m in re.finditer(r"in one pass, ([0-9.]+) s", log)]
    manifest = json.loads((out / "manifest.json").read_text())
    st = {"pass": [], "pass_excluding_class": [], "pass_predicted": [], "pass_excluding_class_predicted": []}
    for entry in manifest["classes"].values():
        res = (entry["metrics"].get("stitched") or {})
        for v in ("pass", "pass_excluding_class"):
            if v in res:
                st[v].append(bool(res[v]))
                if entry["metrics"].get("predicted_as_class", 1.0) >= 0.5:
                    st[f"{v}_predicted"].append(bool(res[v]))
    return {"classes": len(manifest["classes"]), "images": per_class, "seconds": times, "peak_rss_mib": rss,
            "mine_s": max(mined, default=float("nan")),
            "stitched": {k: (float(np.mean(v)) if v else float("nan"), len(v)) for k, v in st.items()}}


def print_imagenet(r: dict, shards: int) -> None:
    s = r["seconds"]
    total = sum(s.values())
    print(f"\nImageNet, {r['classes']} classes x {r['images']} augmented crops, EfficientNet-Lite0, {shards} processes "
          f"side by side a stage\n")
    print("| stage | wall | peak RSS of a process |\n|---|---|---|")
    for stage in ("extract", "learn"):
        print(f"| {stage} | {s[stage]:.0f} s | {r['peak_rss_mib'][stage]:.0f} MiB |")
    print(f"| (learn's one mining pass, a shard) | {r['mine_s']:.0f} s | |")
    print(f"| merge | {s['merge']:.0f} s | |\n| **end to end** | **{total / 60:.1f} min** | |")
    print("\nstitched test (the served prototypes, n = 4): " + ", ".join(
        f"{k} {v:.2f} of {n}" for k, (v, n) in r["stitched"].items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", default="10,100")
    ap.add_argument("--images", default="8,50")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--method", default="nmf")
    ap.add_argument("--imagenet", action="store_true", help="also the real 1000-class ImageNet run (8 crops a class)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="a PNG of wall seconds per class and peak RSS")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="conceptlens-scale-") as tmp:
        for n_cls in [int(c) for c in args.classes.split(",") if c]:
            for n_img in [int(i) for i in args.images.split(",")]:
                r = run_setting(n_cls, n_img, args.shards, args.method, Path(tmp), args.shards)
                for old in Path(tmp).iterdir():  # disk: 1000 x 150 maps are 19 GB
                    subprocess.run(["rm", "-rf", str(old)], check=False)
                rows.append(r)
                print(f"  {n_cls} classes x {n_img} images: learn {r['learn_s']:.0f} s", file=sys.stderr, flush=True)
    real = None
    if args.imagenet:
        with tempfile.TemporaryDirectory(prefix="conceptlens-scale-") as tmp:
            real = run_imagenet(args.shards, args.method, Path(tmp))
    if not rows:
        print_imagenet(real, args.shards)
        return 0
    steps = sorted({k for r in rows for k in r["per_class_s"]}, key=["read", "fit", "evaluate", "contrast",
                                                                     "prototypes"].index)
    print(f"\n--method {args.method}, {args.shards} learn processes side by side (one thread each)\n")
    print("| classes | images a class | " + " | ".join(f"{s} s/class" for s in steps)
          + " | mining pass (a shard) | learn wall | s/class (wall) | learn peak RSS | merge | merge peak RSS |")
    print("|---|---|" + "---|" * (len(steps) + 6))
    for r in rows:
        print(f"| {r['classes']} | {r['images']} | " + " | ".join(f"{r['per_class_s'].get(s, float('nan')):.3f}"
                                                                  for s in steps)
              + f" | {r['mine_s']:.1f} s | {r['learn_s']:.0f} s | {r['learn_s'] / r['classes']:.2f} | {r['learn_peak_rss_mib']:.0f} MiB"
              + f" | {r['merge_s']:.0f} s | {r['merge_peak_rss_mib']:.0f} MiB |")
    extrapolate(rows, args.shards)
    if real:
        print_imagenet(real, args.shards)
    if args.json:
        Path(args.json).write_text(json.dumps({"synthetic": rows, "imagenet": real}, indent=1))
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


def extrapolate(rows: list[dict], shards: int) -> None:
    """Full ImageNet (1000 classes x 150 images a class kept) on this machine and on N pods, from the
    largest measured setting: learning is per class (linear in classes), mining is one pass of the
    pool per shard whose cost is pool rows x the shard's concept directions."""
    big = max(rows, key=lambda r: (r["images"], r["classes"]))
    per_class = (big["learn_s"] - big["mine_s"]) * shards / big["classes"]  # process-seconds a class
    mine_unit = big["mine_s"] / (big["classes"] * big["images"] * big["classes"] / shards)  # s / (image x class)
    print(f"\nfrom {big['classes']} x {big['images']}: {per_class:.2f} process-seconds a class besides mining; "
          f"mining {mine_unit * 1e6:.2f} us per (pool image x class) in a shard")
    for pods in (2, 8, 32, 128):
        learn = per_class * 1000 / pods
        mine = mine_unit * 1000 * 150 * 1000 / pods
        print(f"  1000 x 150 on {pods:>3} learn processes: about {(learn + mine) / 60:.0f} min "
              f"({learn / 60:.0f} learning, {mine / 60:.0f} mining)")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for n_img in sorted({r["images"] for r in rows}):
        rs = sorted((r for r in rows if r["images"] == n_img), key=lambda r: r["classes"])
        xs = [r["classes"] for r in rs]
        a.plot(xs, [r["learn_s"] / r["classes"] for r in rs], "o-", label=f"{n_img} images a class")
        b.plot(xs, [r["learn_peak_rss_mib"] for r in rs], "o-", label=f"{n_img} images a class")
    for ax, title in ((a, "learn wall seconds per class"), (b, "peak RSS of a learn process (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("classes")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    b.axhline(4096, color="red", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
