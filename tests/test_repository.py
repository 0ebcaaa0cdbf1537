"""Serving many models: a repository DIR/<model>/<version>/ served live by a real server process.

Bundles: the tiny real bundle (tests/service_conftest.py) written with different seeds, so each
has its own model weights, bases and bundle id.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest

from conceptlens.service.client import ExplainClient
from conceptlens.service.metrics import metric_value
from conceptlens.service.serve_process import ServeProcess

from service_conftest import TINY_CLASSES, assert_identity, jpeg_bytes, write_tiny_bundle


def _bundle_id(path: Path) -> str:
    import json

    return json.loads((path / "manifest.json").read_text())["bundle_id"]


def publish(bundle: Path, dest: Path) -> None:
    """Drop a version in as a deployment tool should: copied beside, then renamed into place."""
    tmp = dest.parent / f".{dest.name}.incoming"
    shutil.copytree(bundle, tmp)
    os.replace(tmp, dest)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("versions")
    return {seed: write_tiny_bundle(d / f"seed{seed}", seed=seed) for seed in (0, 1, 2)}


def _wait(predicate, timeout: float = 30.0, what: str = "") -> None:
    """Wait for a condition of the server's own state (polled; the server has no event to wait on)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _states(client: ExplainClient) -> dict[str, dict[int, str]]:
    return {m.name: {v.version: v.state for v in m.versions} for m in client.list_models().models}


def test_two_models_answer_by_name_and_a_request_without_a_name_is_refused(bundles, tmp_path):
    repo = tmp_path / "repo"
    publish(bundles[0], repo / "alpha" / "1")
    publish(bundles[1], repo / "beta" / "3")
    server = ServeProcess(None, "--repository-poll-s", "0", repository=repo)
    try:
        server.wait_ready(120)
        img = jpeg_bytes(5)
        with ExplainClient(server.target) as c:
            assert _states(c) == {"alpha": {1: "READY"}, "beta": {3: "READY"}}
            a = c.explain(img, model="alpha", top_k=2)
            b = c.explain(img, model="beta", top_k=2)
            assert (a.model, a.version, a.bundle_id) == ("alpha", 1, _bundle_id(bundles[0]))
            assert (b.model, b.version, b.bundle_id) == ("beta", 3, _bundle_id(bundles[1]))
            assert [p.logit for p in a.predictions] != [p.logit for p in b.predictions]  # different models
            assert_identity(a)
            assert_identity(b)
            assert c.explain(img, model="beta", version=3).bundle_id == b.bundle_id
            assert c.model_info(model="beta").model == "beta"
            assert [x.class_name for x in c.list_classes(model="alpha").classes] == TINY_CLASSES
            assert c.health("alpha") == "SERVING" and c.health("beta") == "SERVING"
            with pytest.raises(grpc.RpcError) as e:  # two models, no default: name one
                c.explain(img)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "alpha" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                c.explain(img, model="gamma")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as e:
                c.explain(img, model="beta", version=2)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_new_version_under_load_no_failures_then_a_corrupt_one_is_refused(bundles, tmp_path):
    """8 clients call throughout; a new version dropped in is served within seconds, no request fails,
    and every answer comes from the old bundle or the new one, and only from the new one once the
    old is unloaded (--keep-versions 1); a corrupt version is refused while the served one keeps
    answering. Every phase waits on what the server did (answers counted, its model states), never
    on a fixed time."""
    repo = tmp_path / "repo"
    publish(bundles[0], repo / "m" / "1")
    server = ServeProcess(None, "--repository-poll-s", "0.5", "--keep-versions", "1", "--cache-size", "0",
                          repository=repo,
                          log=tmp_path / "server.log")
    old, new = _bundle_id(bundles[0]), _bundle_id(bundles[1])
    results: list[tuple[float, float, str]] = []  # (sent, answered, bundle id), monotonic seconds
    errors: list[str] = []
    stop = threading.Event()

    def client_loop(seed: int):
        img = jpeg_bytes(seed)
        with ExplainClient(server.target) as c:
            while not stop.is_set():
                try:
                    sent = time.monotonic()
                    r = c.explain(img, top_k=1, timeout=30)
                    results.append((sent, time.monotonic(), r.bundle_id))
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")

    def answers_sent_after(t: float) -> list[str]:
        return [b for sent, _, b in list(results) if sent > t]

    try:
        server.wait_ready(120)
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        _wait(lambda: len(results) >= 40, 60, "40 answers from version 1 under load")
        dropped = time.monotonic()
        publish(bundles[1], repo / "m" / "2")
        with ExplainClient(server.target) as c:
            _wait(lambda: any(b == new for *_, b in list(results)), 30, "the new version's first answer")
            first_new = min(t for _, t, b in list(results) if b == new)
            _wait(lambda: _states(c)["m"] == {2: "READY"}, 30, "version 1 to be unloaded")
            unloaded = time.monotonic()
            _wait(lambda: len(answers_sent_after(unloaded)) >= 40, 60, "40 answers to calls sent after the unload")
            stop.set()
            for t in threads:
                t.join(60)
            assert not errors, errors[:5]
            assert {b for *_, b in results} == {old, new}
            assert sum(b == old for *_, b in results) >= 40
            assert first_new - dropped < 10, first_new - dropped  # served within seconds (poll 0.5 s)
            after = answers_sent_after(unloaded)
            assert len(after) >= 40 and set(after) == {new}  # version 1 is gone: nothing answers from it
            # a corrupt version: refused, counted, and the served one keeps answering
            corrupt = tmp_path / "corrupt"
            shutil.copytree(bundles[2], corrupt)
            with open(corrupt / "concepts.safetensors", "r+b") as f:
                f.seek(100)
                f.write(b"\x00garbage\x00")
            publish(corrupt, repo / "m" / "3")
            _wait(lambda: _states(c)["m"].get(3) == "FAILED", 30, "version 3 to be refused")
            status = next(m for m in c.list_models().models if m.name == "m")
            reason = next(v.reason for v in status.versions if v.version == 3)
            assert "checksum" in reason and "concepts.safetensors" in reason
            assert metric_value(server.metrics(), "conceptlens_model_loads_total", model="m", result="failed") == 1
            assert c.explain(jpeg_bytes(1)).bundle_id == new
            assert c.health("m") == "SERVING"
    finally:
        stop.set()
        assert server.stop() == 0
    print(f"\n{len(results)} answers from 8 clients, 0 failed; the new version answered "
          f"{first_new - dropped:.2f} s after it was dropped in")


def test_cached_answers_never_cross_models(bundles, tmp_path):
    """Two models, one in-process cache, the same image and options: each model answers with its own
    bundle, cached or not."""
    repo = tmp_path / "repo"
    publish(bundles[0], repo / "alpha" / "1")
    publish(bundles[1], repo / "beta" / "1")
    server = ServeProcess(None, "--repository-poll-s", "0", "--cache-size", "64", repository=repo)
    try:
        server.wait_ready(120)
        img = jpeg_bytes(9)
        with ExplainClient(server.target) as c:
            for _ in range(2):  # a miss, then a hit, for each
                a, b = c.explain(img, model="alpha", top_k=2), c.explain(img, model="beta", top_k=2)
                assert (a.model, a.bundle_id) == ("alpha", _bundle_id(bundles[0]))
                assert (b.model, b.bundle_id) == ("beta", _bundle_id(bundles[1]))
            assert a.cache_hit and b.cache_hit
    finally:
        server.stop()


def test_a_bundle_that_holds_a_pickle_is_refused(tiny_bundle, tmp_path):
    import json
    import pickle

    from conceptlens.service.bundle import BundleError, compute_bundle_id, load_bundle, sha256_file

    def tampered(name: str, data: bytes, rename: str | None = None) -> Path:
        d = tmp_path / f"tampered{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_bundle, d)
        manifest = json.loads((d / "manifest.json").read_text())
        if rename:
            del manifest["files"][name]
            name = rename
        (d / name).write_bytes(data)
        manifest["files"][name] = sha256_file(d / name)  # checksums that match: only the content is wrong
        manifest["bundle_id"] = compute_bundle_id(manifest["files"])
        (d / "manifest.json").write_text(json.dumps(manifest))
        return d

    payload = pickle.dumps({"basis/0": [1.0, 2.0]})
    with pytest.raises(BundleError, match="holds a pickle"):
        load_bundle(tampered("concepts.safetensors", payload))
    with pytest.raises(BundleError, match="holds a pickle"):
        load_bundle(tampered("concepts.safetensors", payload), verify=False)  # refused even unverified
    with pytest.raises(BundleError, match="not a JSON, safetensors, ONNX or image file"):
        load_bundle(tampered("concepts.safetensors", payload, rename="concepts.pkl"))


def test_publishing_over_a_bundle_swaps_in_one_step(tmp_path):
    """An existing bundle directory is exchanged with the new one atomically (renameat2), so its
    path never goes missing; the old contents are removed and nothing is left beside it."""
    from conceptlens.service.bundle import _exchange, publish_dir

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    if not _exchange(a, b):
        pytest.skip("this file system cannot exchange two paths atomically (the fallback renames twice)")
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"
    new = tmp_path / "new"
    new.mkdir()
    (new / "f").write_text("new")
    publish_dir(new, b)
    assert (b / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
