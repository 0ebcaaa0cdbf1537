"""bench/soak.py, short: mixed load over gRPC, HTTP and the inference protocol with Redis SIGKILLed and
restarted, two live version swaps, /metrics hammered, never-reading clients, an overload burst and
SIGTERM under load, against a real server process and a real redis-server. The 10-minute run's
figures are in the README (Reliability)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service_conftest import TINY_C, write_tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_soak_with_faults_answers_every_request_right(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")

    def samples(rng) -> dict:  # pixels per class, so contrasts are computed on request as in real bundles
        return {f"samples/{c}": np.abs(rng.standard_normal((200, TINY_C)) * (1 + c % 4)).astype(np.float16)
                for c in range(8)}

    bundle = write_tiny_bundle(tmp_path / "bundle", 0, extra_tensors=samples)
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--bundle", str(bundle), "--duration", "40",
         "--clients", "4", "--overload-s", "5", "--overload-clients", "24", "--grace-s", "5",
         "--max-rss-growth-pct", "0", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["passed"] and r["errors_by_code"] == {} and r["check_failures"] == 0
    # every kind of request ran, and the faults happened during the load
    assert all(k["requests"] > 0 for k in r["per_kind"].values()), r["per_kind"]
    events = " | ".join(text for _, text in r["events"])
    for fault in ("Redis SIGKILLed", "Redis restarted", "version 2 serving alone", "version 3 serving alone",
                  "SIGTERM sent under load"):
        assert fault in events, events
    assert r["metrics_scrapes"].get("ok", 0) > 0 and r["metrics_scrapes"].get("failed", 0) == 0
    assert set(r["overload"]["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}
    s = r["sigterm"]
    assert s["exit_status"] == 0
    assert s["marked_streams"] == [{"OK": 8}] * 4  # begun before SIGTERM: every item answered
    assert set(s["in_flight_codes"]) <= {"OK", "UNAVAILABLE"}  # by the client's clock; refused as new at most
    assert set(s["after_codes"]) <= {"OK", "UNAVAILABLE", "connection refused", "connection closed"}
    assert s["after_codes"].get("UNAVAILABLE", 0) > 0  # new calls refused while the drain ran
