"""`conceptlens serve` and `conceptlens explain`: flags, environment, table, HTML, SIGTERM."""
from __future__ import annotations

import argparse
import re

import pytest
from service_conftest import ServerThread, jpeg_bytes

from conceptlens.service import cli, serve_cli
from conceptlens.service.client import ExplainClient
from conceptlens.service.serve_process import ServeProcess
from conceptlens.service.config import ServerConfig


@pytest.fixture(scope="module")
def server(tiny_bundle):
    srv = ServerThread(ServerConfig(bundle=str(tiny_bundle), port=0, metrics_port=0))
    yield srv
    srv.stop()


def test_serve_flags_come_from_the_config_and_the_environment():
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    cli.apply_env_defaults(parser, {"CONCEPTLENS_MAX_BATCH_SIZE": "4", "CONCEPTLENS_REDIS_URL": "redis://r:6379/0",
                                    "CONCEPTLENS_NO_CONCEPT_METRICS": "true", "CONCEPTLENS_MAX_QUEUE_DELAY_MS": "2.5"})
    args = parser.parse_args(["--bundle", "b", "--port", "6000", "--device", "cpu"])
    cfg = ServerConfig.from_namespace(args)
    assert (cfg.bundle, cfg.port, cfg.device, cfg.max_batch_size) == ("b", 6000, "cpu", 4)
    assert cfg.redis_url == "redis://r:6379/0" and cfg.no_concept_metrics and cfg.max_queue_delay_ms == 2.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--bundle", "b", "--device", "tpu"])


def test_serve_without_a_usable_bundle_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["serve", "--bundle", str(tmp_path / "missing"), "--port", "0", "--metrics-port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "0"]) == 2


def test_explain_prints_the_table_and_the_identity(server, tmp_path, capsys):
    image = tmp_path / "img.jpg"
    image.write_bytes(jpeg_bytes(21, (120, 90)))
    assert cli.main(["explain", "--server", server.target, str(image), "--class", "thing3", "--class", "1"]) == 0
    out = capsys.readouterr().out
    assert "concept" in out and "presence" in out and "weight" in out and "contribution" in out
    lines = [ln for ln in out.splitlines() if ln.strip().startswith("logit ")]
    assert len(lines) == 2
    for line in lines:  # logit L = S (Σ contributions) + R (residual) + B (bias)
        nums = [float(v) for v in re.findall(r"-?\d+\.\d+", line)[:4]]
        assert nums[0] == pytest.approx(nums[1] + nums[2] + nums[3], abs=2e-4)
    assert "thing3 (class 3)" in out and "thing1 (class 1)" in out


def test_explain_contrast_flags_and_errors(server, tmp_path, capsys):
    image = tmp_path / "img.jpg"
    image.write_bytes(jpeg_bytes(22))
    assert cli.main(["explain", "--server", server.target, str(image), "--class", "thing2", "--contrast", "thing0"]) == 0
    out = capsys.readouterr().out
    assert "rather than thing0" in out and "logit difference" in out and "failed_stitched_prototype_test" in out
    assert cli.main(["explain", "--server", server.target, str(image), "--class", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli.main(["explain", "--server", server.target, str(tmp_path / "none.jpg")]) == 2


def test_explain_writes_html_with_overlays_and_prototypes(server, tmp_path, capsys):
    image = tmp_path / "img.jpg"
    image.write_bytes(jpeg_bytes(23, (200, 150)))
    page = tmp_path / "out.html"
    assert cli.main(["explain", "--server", server.target, str(image), "--top-k", "2", "--html", str(page)]) == 0
    html = page.read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
    assert html.count("data:image/jpeg;base64,") >= 1 + 3  # the image and prototype crops
    assert "class=stack" in html and "Top predictions" in html


def test_explain_json(server, tmp_path, capsys):
    import json

    image = tmp_path / "img.jpg"
    image.write_bytes(jpeg_bytes(24))
    assert cli.main(["explain", "--server", server.target, str(image), "--json", "--top-k", "0"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert "predictions" in answer and "explanations" not in answer


def test_serve_process_drains_on_sigterm_and_exits_0(tiny_bundle, tmp_path):
    srv = ServeProcess(tiny_bundle, log=tmp_path / "serve.log", env={"CONCEPTLENS_DRAIN_DELAY_S": "0.2"})
    try:
        with ExplainClient(srv.target) as c:
            c.wait_ready(60)
            assert len(c.explain(jpeg_bytes(3)).explanations) == 1
    except BaseException:
        srv.stop()
        raise
    assert srv.stop(30) == 0  # SIGTERM: drains, exits 0
    assert "draining" in srv.log_path.read_text()
