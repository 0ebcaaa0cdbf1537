"""TLS and mutual TLS (certificates made with the openssl command line)."""
from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
from pathlib import Path
from service_conftest import ServerThread, jpeg_bytes

from conceptlens.service.client import ExplainClient
from conceptlens.service.config import ServerConfig

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def _run(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
         "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=d)
        _run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def _https_get(url: str, ca: Path | None = None, cert: tuple[Path, Path] | None = None) -> int:
    import ssl
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    if cert:
        ctx.load_cert_chain(*map(str, cert))
    return urllib.request.urlopen(url, timeout=5, context=ctx).status


def test_tls(pki, tiny_bundle):
    import urllib.error

    srv = ServerThread(ServerConfig(bundle=str(tiny_bundle), port=0, metrics_port=0, no_warmup=True,
                                    tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key")), http=True)
    try:
        target = f"localhost:{srv.port}"
        with ExplainClient(target, tls_ca=str(pki / "ca.pem"), token="ignored") as c:
            assert len(c.explain(jpeg_bytes(1)).explanations) == 1
        with ExplainClient(target, timeout=3) as plain:  # plaintext against TLS fails
            with pytest.raises(grpc.RpcError):
                plain.model_info()
        # the HTTP port speaks HTTPS with the same certificate, never plaintext
        assert _https_get(f"https://localhost:{srv.server.http_port}/healthz", ca=pki / "ca.pem") == 200
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            _https_get(f"http://localhost:{srv.server.http_port}/healthz")
    finally:
        srv.stop()


def test_mutual_tls(pki, tiny_bundle):
    import ssl
    import urllib.error

    srv = ServerThread(ServerConfig(bundle=str(tiny_bundle), port=0, metrics_port=0, no_warmup=True,
                                    tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                                    tls_client_ca=str(pki / "ca.pem")), http=True)
    try:
        target = f"localhost:{srv.port}"
        with ExplainClient(target, tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "client.pem"),
                           tls_key=str(pki / "client.key")) as c:
            assert c.model_info().num_classes == 10
        with ExplainClient(target, tls_ca=str(pki / "ca.pem"), timeout=3) as no_cert:
            with pytest.raises(grpc.RpcError) as e:
                no_cert.model_info()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        url = f"https://localhost:{srv.server.http_port}/healthz"
        assert _https_get(url, ca=pki / "ca.pem", cert=(pki / "client.pem", pki / "client.key")) == 200
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _https_get(url, ca=pki / "ca.pem")  # no client certificate
    finally:
        srv.stop()


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="go together"):
        ServerConfig(bundle="x", tls_cert="a.pem").validate()
    with pytest.raises(ValueError, match="mutual"):
        ServerConfig(bundle="x", tls_client_ca="ca.pem").validate()
