"""``conceptlens serve`` (and a private redis-server) in a child process on free local ports: for the
demo, tests and benchmarks."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO


_HANDED_OUT: set[int] = set()  # ports this process has handed out: never handed out twice


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now and that this process has not handed out
    before (the OS may give a just-closed port again: two servers started side by side would then
    race for it, and the loser exits with "Address already in use")."""
    held = []
    try:
        while True:
            s = socket.socket()
            held.append(s)  # kept bound until a new port is found, so the OS cannot repeat it
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    finally:
        for s in held:
            s.close()


class ServeProcess:
    """A server of ``bundle`` (or of the model repository ``repository``) with extra ``flags``;
    gRPC, HTTP and metrics on free ports of ``host`` (unless ``flags`` set them).

    ``log``: a file path for its output (else discarded); ``env``: extra environment variables
    (flags can come from the environment too). ``stop`` sends SIGTERM (the server drains) and
    returns the exit status.
    """

    def __init__(self, bundle: str | os.PathLike | None, *flags: str, log: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None, host: str = "127.0.0.1", log_level: str | None = None,
                 repository: str | os.PathLike | None = None):
        self.host = host
        self.log_path = Path(log) if log else None
        self.port, self.metrics_port = free_port(host), free_port(host)
        self.http_port = None if "--http-port" in flags else free_port(host)
        if self.http_port is None:
            self.http_port = int(flags[flags.index("--http-port") + 1]) or None
        self._log: IO | int = open(log, "w") if log else subprocess.DEVNULL
        source = ["--repository", str(Path(repository))] if repository else ["--bundle", str(Path(bundle))]
        http = [] if "--http-port" in flags else ["--http-host", host, "--http-port", str(self.http_port)]
        cmd = [sys.executable, "-m", "conceptlens", *(["--log-level", log_level] if log_level else []),
               "serve", *source, "--host", host, "--port", str(self.port), "--metrics-host", host,
               "--metrics-port", str(self.metrics_port), *http, *flags]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        """``http://host:port`` of its HTTP API (None with --http-port 0)."""
        return f"http://{self.host}:{self.http_port}" if self.http_port else None

    def wait_ready(self, timeout: float = 300) -> None:
        """Block until health says SERVING; stops the process and raises if it never does, at once
        (RuntimeError with the first lines of its log) if it exits first."""
        from .client import ExplainClient

        deadline = time.monotonic() + timeout
        try:
            with ExplainClient(self.target) as client:
                while True:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"conceptlens serve exited with status {self.proc.returncode} before "
                                           f"serving{self._log_head()}")
                    try:
                        client.wait_ready(max(0.1, min(2.0, deadline - time.monotonic())))
                        return
                    except TimeoutError:
                        if time.monotonic() >= deadline:
                            raise
        except BaseException:
            self.stop()
            raise

    def _log_head(self, lines: int = 3) -> str:
        """The first lines of its log (where ``conceptlens serve`` writes why it exits), or ""."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        head = self.log_path.read_text(errors="replace").splitlines()[:lines]
        return ": " + " | ".join(head) if head else ""

    def metrics(self) -> str:
        """The Prometheus text of its /metrics."""
        url = f"http://{self.host}:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not isinstance(self._log, int):
            self._log.close()
        return self.proc.returncode


class RedisProcess:
    """A private redis-server (no persistence) on its own free port, so tests and benchmarks may
    stop, kill and restart it without touching a shared one."""

    def __init__(self, workdir: str | os.PathLike):
        self.port = free_port()
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it answers PING; RuntimeError if it does not."""
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL (a crash: nothing flushed) and wait."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
