"""A private TorchServe process on loopback ports, for tests, benchmarks and local runs.

``torchserve`` keeps its pid file in ``$TMPDIR/.model_server.pid`` and its key file and logs in its
working directory, so two TorchServes of one machine would find (and stop) each other. Here each
gets its own working directory and TMPDIR: ``stop()`` stops this one only, and it also ends this
TorchServe's worker processes by their ids should any outlive the frontend.

    with TorchServeProcess(store, ["conceptlens.mar"], workdir) as ts:
        ts.wait_ready("conceptlens")
        requests.post(f"{ts.inference_url}/predictions/conceptlens", data=image)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..service.serve_process import free_port


class TorchServeProcess:
    """``torchserve --start --foreground --ncs`` with a generated config.properties.

    ``token_auth``: leave TorchServe's token authorization on (the production setting); tests turn
    it off explicitly with ``False``. ``properties``: more config.properties lines.
    """

    def __init__(self, model_store: Path, models: list[str], workdir: Path, token_auth: bool = False,
                 properties: dict[str, str] | None = None):
        self.model_store, self.models, self.workdir = Path(model_store), list(models), Path(workdir)
        self.token_auth = token_auth
        self.http_port, self.management_port, self.metrics_port = free_port(), free_port(), free_port()
        self.grpc_port, self.grpc_management_port = free_port(), free_port()
        self.properties = dict(properties or {})
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def config_text(self) -> str:
        props = {
            "inference_address": self.inference_url, "management_address": self.management_url,
            "metrics_address": f"http://127.0.0.1:{self.metrics_port}",
            "grpc_inference_address": "127.0.0.1", "grpc_inference_port": str(self.grpc_port),
            "grpc_management_address": "127.0.0.1", "grpc_management_port": str(self.grpc_management_port),
            "model_store": str(self.model_store.resolve()), "load_models": ",".join(self.models),
            "disable_token_authorization": "false" if self.token_auth else "true",
            "enable_model_api": "false", "max_request_size": str(64 << 20), "max_response_size": str(64 << 20),
            "default_workers_per_model": "1", "job_queue_size": "256", "install_py_dep_per_model": "false",
            **self.properties,
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _env(self) -> dict[str, str]:
        tmp = self.workdir / "tmp"
        return dict(os.environ, TMPDIR=str(tmp), TEMP=str(tmp), LOG_LOCATION=str(self.log_dir),
                    METRICS_LOCATION=str(self.log_dir))

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-c", "import sys; from ts.model_server import start; sys.exit(start())", *args]

    def start(self) -> "TorchServeProcess":
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.properties"
        config.write_text(self.config_text())
        self._log = open(self.workdir / "torchserve.out", "ab")
        self.proc = subprocess.Popen(
            self._cli("--start", "--foreground", "--ncs", "--model-store", str(self.model_store),
                      "--ts-config", str(config)),
            cwd=self.workdir, env=self._env(), stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def java_pid(self) -> int | None:
        try:
            return int((self.workdir / "tmp" / ".model_server.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def token(self, kind: str = "inference") -> str | None:
        """A key from key_file.json ("inference", "management" or "API"), once TorchServe wrote it."""
        try:
            return json.loads(self.key_file.read_text())[kind]["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def wait_ready(self, model: str, timeout_s: float = 180.0) -> dict:
        """Wait until ``model`` has a READY worker; returns its management description."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited ({self.proc.returncode}); see {self.workdir}/torchserve.out "
                                   f"and {self.log_dir}")
            req = urllib.request.Request(f"{self.management_url}/models/{model}")
            key = self.token("management") if self.token_auth else None
            if key:
                req.add_header("Authorization", f"Bearer {key}")
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    desc = json.loads(r.read())[0]
                if any(w.get("status") == "READY" for w in desc.get("workers", [])):
                    return desc
                last = json.dumps([w.get("status") for w in desc.get("workers", [])])
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"model {model!r} not ready after {timeout_s:.0f} s ({last}); see {self.log_dir}")

    def stop(self, timeout_s: float = 60.0) -> None:
        """``torchserve --stop`` for this instance; then end its leftover processes by pid."""
        if self.proc is None:
            return
        import psutil  # a TorchServe dependency

        pid = self.java_pid()
        family = []
        if pid is not None:
            try:
                java = psutil.Process(pid)
                family = [java, *java.children(recursive=True)]
            except psutil.Error:
                pass
        subprocess.run(self._cli("--stop", "--foreground"), cwd=self.workdir, env=self._env(),
                       stdout=self._log, stderr=subprocess.STDOUT, timeout=timeout_s + 30)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for p in family:
            try:
                if p.is_running():
                    p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(family, timeout=10)
        self._log.close()
        self.proc = None

    def __enter__(self) -> "TorchServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
