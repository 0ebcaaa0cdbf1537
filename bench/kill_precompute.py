"""Precompute fault injection (issue 13): SIGKILL at random points, rerun, compare with an uninterrupted run.

    .venv/bin/python bench/kill_precompute.py [--trials 20] [--images 120] [--seed 0] [--keep DIR]

A small job (EfficientNet-Lite0 over ~120 CIFAR-10 images, 3 concepts, CPU). First an uninterrupted
reference run (its stage timings set the kill window), then each trial starts the job in a fresh
work dir, SIGKILLs it after a seeded random delay across the reference's duration, reruns it to
completion in the same (killed) work dir and checks: the rerun exits 0, ``load_bundle`` verifies,
every tensor of concepts.safetensors (and the head) equals the reference's, manifest classes/k equal.
"""
from __future__ import annotations

import argparse
import random
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "conceptlens"]
# the stage a log line shows the job to be in (the line ending extraction starts learning)
STAGE_RE = [("done", re.compile(r"merge: bundle written")), ("merge", re.compile(r"merge:")),
            ("learn", re.compile(r"learn:|class \d+ \(|extract: \d+ images")),
            ("extract", re.compile(r"extract:|exported "))]


def data_dir() -> Path:
    from conceptlens.precompute.datasets import shared_data_dir

    return shared_data_dir() / "cifar10"


def write_shard(dest: Path, n: int) -> Path:
    """The first ``n`` samples of the CIFAR-10 train shard as a tar (KEY.jpg + KEY.cls) + classes.txt."""
    src = data_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    (dest.parent / "classes.txt").write_bytes((src / "classes.txt").read_bytes())
    with tarfile.open(src / "train-000.tar.gz") as tin, tarfile.open(dest, "w") as tout:
        index: dict[str, int] = {}
        for m in tin:
            if index.setdefault(m.name.split(".", 1)[0], len(index)) >= n:
                break
            tout.addfile(m, tin.extractfile(m))
    return dest


def job_args(shard: Path, out: Path, work: Path, seed: int = 0, concepts: int = 3, prototypes: int = 1,
             min_images: int = 8) -> list[str]:
    return ["precompute", "--model", "efficientnet-lite0", "--data", str(shard), "--out", str(out),
            "--work", str(work), "--concepts", str(concepts), "--min-images", str(min_images), "--max-images", "30",
            "--prototypes", str(prototypes), "--stability-folds", "0", "--contrast-samples", "0", "--examples", "1",
            "--device", "cpu", "--seed", str(seed)]


def last_stage(log: str) -> str:
    """The stage of the last stage line in a precompute log ("start" when none yet)."""
    for line in reversed(log.splitlines()):
        for stage, rx in STAGE_RE:
            if rx.search(line):
                return stage
    return "start"


def run_timed(args: list[str], timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict[str, float]]:
    """Run the CLI to completion; the time each stage's first log line appeared (seconds since start)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines, marks = [], {}
    for line in proc.stdout:
        lines.append(line)
        st = last_stage(line)
        if st != "start" and st not in marks:
            marks[st] = time.monotonic() - t0
    rc = proc.wait(timeout=timeout)
    marks["end"] = time.monotonic() - t0
    return subprocess.CompletedProcess(proc.args, rc, "".join(lines), ""), marks


def kill_on_line(args: list[str], pattern: str, log_path: Path, extra_delay: float = 0.0,
                 timeout: float = 300) -> tuple[str, bool]:
    """Start the CLI and SIGKILL it ``extra_delay`` s after a log line matching ``pattern``."""
    rx = re.compile(pattern)
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if rx.search(line) or time.monotonic() > deadline:
            break
    if extra_delay:
        time.sleep(extra_delay)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rest = proc.stdout.read()
    log = "".join(lines) + (rest or "")
    log_path.write_text(log)
    return last_stage(log), finished


def bundle_tensors(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    t = {f"concepts/{k}": v for k, v in load((out / "concepts.safetensors").read_bytes()).items()}
    for p in sorted(out.glob("head*.safetensors")):
        t.update({f"{p.stem}/{k}": v for k, v in load(p.read_bytes()).items()})
    return t


def compare(out: Path, ref: Path) -> tuple[bool, str]:
    """(equal, detail): the bundle at ``out`` verifies and its tensors/classes equal ``ref``'s."""
    from conceptlens.service.bundle import load_bundle

    try:
        b = load_bundle(out)
    except Exception as e:  # noqa: BLE001 - reported
        return False, f"load_bundle: {e}"
    r = load_bundle(ref)
    if sorted(b.manifest.classes) != sorted(r.manifest.classes):
        return False, f"classes {sorted(b.manifest.classes)} != {sorted(r.manifest.classes)}"
    ks = {c: e.k for c, e in b.manifest.classes.items()}
    if ks != {c: e.k for c, e in r.manifest.classes.items()}:
        return False, f"k differ: {ks}"
    a, e = bundle_tensors(out), bundle_tensors(ref)
    if set(a) != set(e):
        return False, f"tensor keys differ: {sorted(set(a) ^ set(e))[:5]}"
    bad = []
    for k in sorted(e):
        if a[k].shape != e[k].shape or a[k].dtype != e[k].dtype:
            bad.append(f"{k} shape/dtype {a[k].shape}/{a[k].dtype} vs {e[k].shape}/{e[k].dtype}")
        elif not np.array_equal(a[k], e[k]):
            d = np.abs(a[k].astype(np.float64) - e[k].astype(np.float64)).max()
            bad.append(f"{k} max|diff| {d:.3g}")
    if bad:
        return False, f"{len(bad)} tensors differ: " + "; ".join(bad[:4])
    return True, f"{len(e)} tensors equal"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    ap.add_argument("--keep", help="keep the work files here (default: a temp dir, removed)")
    a = ap.parse_args()
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kill-precompute-") as tmp:
        base = Path(a.keep) if a.keep else Path(tmp)
        shard = write_shard(base / "data" / "train-subset.tar", a.images)
        ref_out = base / "ref" / "bundle"
        res, marks = run_timed(job_args(shard, ref_out, base / "ref" / "work"))
        if res.returncode != 0:
            print(res.stdout, file=sys.stderr)
            print("reference run failed", file=sys.stderr)
            return 1
        total = marks["end"]
        print(f"reference run: {total:.1f} s; stage lines at " + ", ".join(f"{k} {v:.1f}s" for k, v in marks.items()))
        rng = random.Random(a.seed)
        # stratified: a third of the trials in each stage, each killed a seeded random delay (within the
        # reference's duration of the stage) after the log line that starts the stage; relative to the
        # line, so a loaded machine's slow start-up does not push the kills past the end
        windows = [("extract", r"extract: data ", marks["learn"] - marks["extract"]),
                   ("learn", r"extract: \d+ images", marks["merge"] - marks["learn"]),
                   ("merge", r"merge: \d+ classes", max(0.05, marks["end"] - marks["merge"]) * 0.5)]
        plan = [(w[0], w[1], rng.uniform(0.0, w[2] * 0.9)) for w in (windows[i % 3] for i in range(a.trials))]
        rows = []
        print(f"{'trial':>5} {'kill at':>10} {'stage':>8} {'rerun':>6} {'equal':>6}  detail")
        for i, (target, pattern, delay) in enumerate(plan):
            out, work = base / f"t{i}" / "bundle", base / f"t{i}" / "work"
            stage, finished = kill_on_line(job_args(shard, out, work), pattern, base / f"t{i}.kill.log",
                                           extra_delay=delay)
            delay_s = f"{target[:2]}+{delay:.2f}s"
            if finished:
                stage = "(done)"
            rerun = subprocess.run([*CLI, *job_args(shard, out, work)], capture_output=True, text=True, cwd=ROOT,
                                   timeout=600)
            ok = rerun.returncode == 0
            equal, detail = compare(out, ref_out) if ok else (False, rerun.stderr.strip().splitlines()[-1:])
            leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
            if leftovers:
                detail = f"{detail}; leftovers {leftovers}"
            rows.append((i, delay, stage, ok, equal))
            print(f"{i:>5} {delay_s:>10} {stage:>8} {str(ok):>6} {str(equal):>6}  {detail}", flush=True)
            import shutil

            shutil.rmtree(base / f"t{i}", ignore_errors=True)
        n_ok = sum(r[3] and r[4] for r in rows)
        by_stage: dict[str, int] = {}
        for r in rows:
            by_stage[r[2]] = by_stage.get(r[2], 0) + 1
        print(f"summary: {n_ok}/{len(rows)} trials gave a valid bundle equal to the reference; kills by stage: "
              + ", ".join(f"{k} {v}" for k, v in sorted(by_stage.items()))
              + f"; wall {time.monotonic() - t_start:.0f} s")
        return 0 if n_ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
