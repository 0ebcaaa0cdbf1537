"""Precompute under faults (issue 13): SIGKILL in each stage then a rerun, and a full disk during the bundle write.

The long version (20 random kill points) is ``bench/kill_precompute.py``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import require_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kill_precompute as kp  # noqa: E402

from conceptlens.service.bundle import load_bundle  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_job(tmp_path_factory):
    """A ~120-image CIFAR-10 shard and an uninterrupted reference bundle of the small job."""
    require_data()
    base = tmp_path_factory.mktemp("faults")
    shard = kp.write_shard(base / "data" / "train-subset.tar", 120)
    ref = base / "ref" / "bundle"
    res, _ = kp.run_timed(kp.job_args(shard, ref, base / "ref" / "work"))
    assert res.returncode == 0, res.stdout
    return shard, ref


# kill points: a log line of the stage, then a short delay into it
KILLS = {
    "extract": (r"extract: data ", 0.3),
    "learn": (r"class \d+ \(", 0.0),       # after the first class is learned
    "merge": (r"merge: \d+ classes", 0.0),  # at the start of the ONNX export / bundle write
}


@pytest.mark.parametrize("stage", list(KILLS))
def test_sigkill_in_stage_then_rerun_equals_uninterrupted(small_job, tmp_path, stage):
    shard, ref = small_job
    out, work = tmp_path / "bundle", tmp_path / "work"
    args = kp.job_args(shard, out, work)
    pattern, delay = KILLS[stage]
    seen, finished = kp.kill_on_line(args, pattern, tmp_path / "kill.log", extra_delay=delay)
    assert seen == stage, (seen, (tmp_path / "kill.log").read_text())
    if not finished:
        assert not (out / "manifest.json").exists() or load_bundle(out), "a killed run published a partial bundle"
    res = subprocess.run([*kp.CLI, *args], capture_output=True, text=True, timeout=300, cwd=kp.ROOT)
    assert res.returncode == 0, res.stderr
    equal, detail = kp.compare(out, ref)
    assert equal, detail


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _disk_usage(root: Path) -> int:
    """Bytes ``root`` takes on a tmpfs (whole pages per file)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def full_disk_run(small_job, tmp_path_factory):
    """The reference bundle copied into a small tmpfs (it fits, with less than a second bundle's room
    to spare), then a bigger job (3 prototypes, 3 examples) writing to the same bundle path."""
    shard, ref = small_job
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    base = tmp_path_factory.mktemp("fulldisk")
    mnt = base / "mnt"
    mnt.mkdir()
    size_kb = (_disk_usage(ref) * 3 // 2) // 1024 + 64
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", f"tmpfs-{uuid.uuid4().hex[:8]}",
                              str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        out = mnt / "bundle"
        shutil.copytree(ref, out)
        before = load_bundle(out)
        before_id, before_files = before.bundle_id, _tree(out)
        args = kp.job_args(shard, out, base / "work", prototypes=3)
        args[args.index("--examples") + 1] = "3"
        res = subprocess.run([*kp.CLI, *args], capture_output=True, text=True, timeout=300, cwd=kp.ROOT)
        after_listing = sorted(p.name for p in mnt.iterdir())
        try:
            after = load_bundle(out)
            after_state = (after.bundle_id, _tree(out), None)
        except Exception as e:  # noqa: BLE001 - asserted on
            after_state = (None, None, e)
        yield {"res": res, "size_kb": size_kb, "before_id": before_id, "before_files": before_files,
               "listing": after_listing, "after": after_state}
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_publishes_nothing_and_keeps_the_previous_bundle(full_disk_run):
    r = full_disk_run
    res = r["res"]
    assert res.returncode != 0, f"the bigger bundle fit into {r['size_kb']} KiB: size the tmpfs smaller"
    assert r["listing"] == ["bundle"], f"left in the tmpfs: {r['listing']}"
    bundle_id, files, err = r["after"]
    assert err is None, f"the previous bundle no longer loads: {err}"
    assert bundle_id == r["before_id"] and files == r["before_files"]


def test_full_disk_gives_a_clear_one_line_error(full_disk_run):
    res = full_disk_run["res"]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "space" in last.lower() and last.startswith("conceptlens precompute: error:"), last
