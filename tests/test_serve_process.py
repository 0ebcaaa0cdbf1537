"""The test and demo helper that runs ``conceptlens serve`` in a child process: ports never handed
out twice (two servers started side by side used to race for one), and a server that exits before
serving is reported at once with its own error, not after the readiness timeout."""
from __future__ import annotations

import socket

import pytest

from conceptlens.service.serve_process import ServeProcess, free_port


def test_free_ports_are_distinct_and_bindable():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:  # the last one is free now
        s.bind(("127.0.0.1", ports[-1]))


def test_a_server_that_exits_before_serving_is_an_error_with_its_reason(tmp_path):
    server = ServeProcess(tmp_path / "no-such-bundle", log=tmp_path / "serve.log")
    with pytest.raises(RuntimeError, match="exited with status") as err:
        server.wait_ready(300)
    assert "no-such-bundle" in str(err.value)  # conceptlens serve's own message, from its log
    assert server.proc.poll() is not None
