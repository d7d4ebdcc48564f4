"""The images' HEALTHCHECK (deploy/healthcheck.py) against a real server with TLS, API keys on health
and a plaintext health port: it picks its way in from the server's own ATTNSERVE_* variables alone.
(Plain text on the gRPC port is covered by test_images.py.) Certificates come from trustme."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trustme

from tests.deploy.helpers import DEPLOY, ROOT
from tests.server.helpers import ServerProcess

pytestmark = pytest.mark.slow
KEY = "healthcheck-test-key-41c9"


def healthcheck(**variables: str) -> subprocess.CompletedProcess:
    """deploy/healthcheck.py with exactly these ATTNSERVE_* variables (none inherited)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSERVE_")} | variables
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env, capture_output=True, text=True,
                          timeout=30, cwd=ROOT, check=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.crt"))
    # A name the healthcheck cannot guess from 127.0.0.1: it must take it from the certificate.
    leaf = ca.issue_cert("attnserve.serving.svc")
    leaf.cert_chain_pems[0].write_to_path(str(folder / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(folder / "tls.key"))
    return {name: str(folder / name) for name in ("ca.crt", "tls.crt", "tls.key")}


def test_healthcheck_uses_the_health_port_or_tls_with_the_servers_own_certificate(test_model_dir, pki):
    server = ServerProcess(test_model_dir, "--tls-cert-file", pki["tls.crt"], "--tls-key-file", pki["tls.key"],
                           "--health-port", "0", "--health-needs-api-key", "on", env={"ATTNSERVE_API_KEYS": KEY})
    try:
        tls = {"ATTNSERVE_PORT": str(server.port), "ATTNSERVE_TLS_CERT_FILE": pki["tls.crt"],
               "ATTNSERVE_TLS_KEY_FILE": pki["tls.key"]}
        # TLS on the gRPC port, trusting the server's certificate, with the key health asks for.
        result = healthcheck(**tls, ATTNSERVE_API_KEY=KEY)
        assert result.returncode == 0 and "SERVING" in result.stdout, result.stdout + result.stderr
        result = healthcheck(**tls)
        assert result.returncode == 1 and "UNAUTHENTICATED" in result.stderr, result.stdout + result.stderr
        result = healthcheck(ATTNSERVE_PORT=str(server.port))  # plain text to a TLS port
        assert result.returncode == 1 and "UNAVAILABLE" in result.stderr, result.stdout + result.stderr
        # The plaintext health port wins over TLS, and needs no key.
        result = healthcheck(**tls, ATTNSERVE_HEALTH_PORT=str(server.health_port))
        assert result.returncode == 0 and f":{server.health_port}: SERVING" in result.stdout, result.stdout
        # Under mutual TLS it has no client certificate: it says to use the health port.
        result = healthcheck(**tls, ATTNSERVE_TLS_CLIENT_CA_FILE=pki["ca.crt"], ATTNSERVE_API_KEY=KEY)
        assert result.returncode == 1 and "ATTNSERVE_HEALTH_PORT" in result.stderr, result.stdout + result.stderr
    finally:
        server.stop()
