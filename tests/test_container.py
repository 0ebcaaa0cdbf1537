"""The serving image for real: deploy/container_smoke.sh builds deploy/Dockerfile with buildah, runs it
under podman as uid 10001 on a tiny real bundle, waits for gRPC health SERVING and sends one Explain.

Runs where buildah and podman are installed and can run (root, or rootless with subuids). The first
run on a machine makes the Debian base image with debootstrap (root) and downloads the wheels: ~2 min
on 2 cores; later runs reuse the base image and buildah's layer cache (~10 s with unchanged sources,
~1.5 min when the sources changed) -- the build line of the output says which.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "container_smoke.sh"
LOCAL_BASE = "localhost/conceptlens-base:bookworm"


def _unavailable() -> str | None:
    missing = [tool for tool in ("buildah", "podman") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian: apt-get install buildah podman runc)"
    for cmd in (["podman", "info"], ["buildah", "info"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"`{' '.join(cmd)}` failed: {e}"
        if out.returncode != 0:
            return f"`{' '.join(cmd)}` fails here: {(out.stderr or out.stdout).strip()[-300:]}"
    if "BASE_IMAGE" not in os.environ:
        have_base = subprocess.run(["podman", "image", "exists", LOCAL_BASE]).returncode == 0
        if not have_base and not (os.geteuid() == 0 and shutil.which("debootstrap")):
            return f"no {LOCAL_BASE} and no way to make it (debootstrap as root); set BASE_IMAGE to build on another"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="buildah/podman: Linux only"),
]


def test_serving_image_builds_runs_as_non_root_and_explains():
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("onnx")  # the tiny bundle's model is written with onnx.helper
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        run = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"container_smoke.sh ran over 900 s:\n{e.stdout or ''}{e.stderr or ''}")
    out = run.stdout
    print(out)  # the transcript: with -s, or in the report of a failure
    if run.returncode == 3:  # the script found that this machine cannot build or run containers
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, f"container_smoke.sh exited {run.returncode}:\n{out}\n{run.stderr[-4000:]}"
    assert re.search(r"^\[build\]\s+(built: \d+ of \d+ steps run|reused: every step from the layer cache)", out, re.M), out
    assert re.search(r"^\[health\]\s+SERVING after", out, re.M), out
    assert re.search(r"^\[classes\]\s+ListClasses: 10 classes, 8 with concepts", out, re.M), out
    explain = re.search(r"^\[explain\]\s+PNG .*: bundle \w+, (\d+) predictions .*, (\d+) classes explained", out, re.M)
    assert explain and explain.groups() == ("10", "2"), out
    assert len(re.findall(r"^\[explain\]\s+thing\d: logit \S+ = 3 concepts", out, re.M)) == 2, out
    uid = re.search(r"^\[user\]\s+id -u in the container: (\d+) \(image User ([^)]*)\)", out, re.M)
    assert uid and uid.group(1) != "0" and not uid.group(2).startswith(("0", "root")), out
    assert re.search(r"^\[stop\]\s+SIGTERM: drained and exited 0", out, re.M), out
    assert re.search(r"^PASS: ", out, re.M), out
    name = re.search(r"^\[run\]\s+container (\S+):", out, re.M).group(1)
    assert subprocess.run(["podman", "container", "exists", name]).returncode == 1, f"{name} was left behind"
