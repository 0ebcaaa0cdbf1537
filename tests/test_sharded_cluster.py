"""The cluster run is the single run (issue 18): the Kubernetes Indexed Jobs' commands
(deploy/k8s/precompute/*-job.yaml: ``precompute --stage extract|learn --shard $(JOB_COMPLETION_INDEX)/N``
then ``merge``), run here as 4 separate processes side by side on one shared work directory, one learn
shard SIGKILLed mid-run (once another shard has finished a class) and started again; the merged bundle's concepts and weights are
bit for bit the one-process bundle's, and the same images were learned from.

The model is the ground-truth world's small CNN (tests/test_method_matrix.py's fixture), with more
images a class than --max-images, so that sampling is exercised across shards.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_method_matrix import world_model  # noqa: F401 (the fixture)

SHARDS = 4


def _cmd(model_path, labels, folder, work, out, *extra) -> list[str]:
    return [sys.executable, "-m", "conceptlens", "precompute", "--model", f"torchscript:{model_path}",
            "--labels", str(labels), "--data", str(folder), "--group-by", "label", "--work", str(work),
            "--out", str(out), "--resize", "64", "--crop", "64", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
            "--device", "cpu", "--concepts", "3", "--max-images", "16", "--min-images", "8", "--prototypes", "2",
            *extra]


def _run_side_by_side(cmds: list[list[str]], env: dict, kill_index: int | None = None, classes_dir: Path | None = None
                      ) -> list[int]:
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in cmds]
    if kill_index is not None:  # SIGKILL that shard once another shard finished a class: it is mid-run
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and procs[kill_index].poll() is None:
            if any(classes_dir.glob("*.safetensors")):
                procs[kill_index].kill()
                break
            time.sleep(0.05)
    codes = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        codes.append(p.returncode)
        if p.returncode not in (0, -9):
            raise AssertionError(err.decode()[-2000:])
    return codes


@pytest.mark.slow
def test_four_processes_sharded_and_a_killed_shard_resumed_equal_the_single_run(world_model, tmp_path):  # noqa: F811
    from conceptlens.service.bundle import load_bundle

    model_path, labels, folder, _, _, world = world_model
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    res = subprocess.run(_cmd(model_path, labels, folder, tmp_path / "single.work", single), env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]

    work, out = tmp_path / "cluster.work", tmp_path / "cluster"
    shard = [_cmd(model_path, labels, folder, work, out, "--stage", stage, "--shard", f"{i}/{SHARDS}")
             for stage in ("extract", "learn") for i in range(SHARDS)]
    assert _run_side_by_side(shard[:SHARDS], env) == [0] * SHARDS
    codes = _run_side_by_side(shard[SHARDS:], env, kill_index=1, classes_dir=work / "classes")
    print(f"\nlearn shard 1/{SHARDS}: {'SIGKILLed mid-run' if codes[1] == -9 else 'finished before the kill'}")
    if codes[1] == -9:  # resumed: what it had finished is kept, the rest learned
        assert _run_side_by_side([shard[SHARDS + 1]], env) == [0]
    assert sorted(p.name for p in (work / "classes").glob("*.safetensors")) == sorted(
        f"{c}.safetensors" for c in range(len(world.classes)))
    res = subprocess.run([sys.executable, "-m", "conceptlens", "merge", str(work), "--out", str(out)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]

    a, b = load_bundle(single), load_bundle(out)
    assert sorted(a.classes) == sorted(b.classes) == list(range(len(world.classes)))
    for cid in a.classes:
        ma, mb = a.manifest.classes[cid], b.manifest.classes[cid]
        assert ma.images == mb.images == 16 and ma.images_seen == mb.images_seen > 16
        assert np.array_equal(a.classes[cid].basis, b.classes[cid].basis), cid
        assert np.array_equal(a.classes[cid].weights, b.classes[cid].weights), cid
        pa = [[p["source"] for p in c] for c in a.prototypes_of(cid)] if hasattr(a, "prototypes_of") else None
        if pa is not None:
            assert pa == [[p["source"] for p in c] for c in b.prototypes_of(cid)]
    ta = {k: v for k, v in a.manifest.files.items() if k.endswith(".safetensors")}
    assert ta and ta == {k: v for k, v in b.manifest.files.items() if k.endswith(".safetensors")}
