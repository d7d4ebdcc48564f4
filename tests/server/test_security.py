"""TLS, mutual TLS, certificate rotation and API keys, on real server processes and grpcio's own clients.

Certificates are made here by trustme (a test CA on the fly); nothing is committed.
"""
from __future__ import annotations

import datetime
import hashlib
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attnserve.v1 import generation_pb2_grpc as pb_grpc
from server.client import AttnserveClient, build_request, channel_credentials
from tests.server.helpers import ROOT, HeldStream, ServerProcess, wait_until

RELOAD_SECONDS = 0.5
PROMPT = [11, 12, 13, 14, 15]
KEY = "attnserve-test-key-7f3a"


def write_pair(cert: trustme.LeafCert, folder: Path, name: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / f"{name}.crt", folder / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(tmp_path_factory, ca):
    """Files: the server's pair and CA, a client pair from the same CA, and one from another CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca.cert_pem.write_to_path(str(folder / "ca.crt"))
    server_cert, server_key = write_pair(ca.issue_cert("localhost", "127.0.0.1"), folder, "server")
    client_cert, client_key = write_pair(ca.issue_cert("client@example.com"), folder, "client")
    stranger_cert, stranger_key = write_pair(trustme.CA().issue_cert("client@example.com"), folder, "stranger")
    return dict(folder=folder, ca=str(folder / "ca.crt"), server_cert=str(server_cert), server_key=str(server_key),
                client_cert=str(client_cert), client_key=str(client_key),
                stranger_cert=str(stranger_cert), stranger_key=str(stranger_key))


def tls_flags(cert, key, *extra):
    return ("--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-reload-interval-seconds", str(RELOAD_SECONDS), *extra)


def greedy(stub) -> list[int]:
    request = build_request(prompt_token_ids=PROMPT, max_new_tokens=12, ignore_eos=True)
    return list(stub.Generate(request, timeout=30).token_ids)


def tls_stub(port, ca_file, cert_file=None, key_file=None):
    channel = grpc.secure_channel(f"localhost:{port}", channel_credentials(ca_file, cert_file, key_file))
    return pb_grpc.GenerationStub(channel), channel


def served_certificate(port: int, ca_file: str, client: tuple = ()) -> bytes:
    """The leaf certificate (DER) a fresh TLS connection to the port is shown."""
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    if client:
        context.load_cert_chain(*client)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as conn:
            return conn.getpeercert(binary_form=True)


def der(cert_file) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(cert_file).read_text())


@pytest.fixture(scope="module")
def plaintext_tokens(test_model_dir):
    server = ServerProcess(test_model_dir)
    try:
        yield greedy(server.stub())
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mtls_server(test_model_dir, pki):
    server = ServerProcess(test_model_dir, *tls_flags(pki["server_cert"], pki["server_key"]),
                           "--tls-client-ca-file", pki["ca"], "--health-port", "0")
    yield server
    server.stop()


def test_tls_serves_the_same_tokens_and_refuses_plaintext(test_model_dir, pki, plaintext_tokens, tmp_path):
    cert, key = (shutil.copy(pki[name], tmp_path) for name in ("server_cert", "server_key"))
    server = ServerProcess(test_model_dir, *tls_flags(cert, key))
    try:
        assert "tls tls, api keys off" in "".join(server.log)
        stub, channel = tls_stub(server.port, pki["ca"])
        assert greedy(stub) == plaintext_tokens
        channel.close()
        with pytest.raises(grpc.RpcError) as refused:  # a plaintext client cannot talk to the TLS port
            greedy(server.stub())
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # /metrics speaks TLS too.
        https = ssl.create_default_context(cafile=pki["ca"])
        body = urllib.request.urlopen(f"https://localhost:{server.metrics_port}/metrics", context=https, timeout=10).read()
        assert b"attnserve_requests_finished_total" in body
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read()
    finally:
        server.stop()


def test_rotation_keeps_streams_in_flight_and_serves_the_new_pair_to_new_connections(
        test_model_dir, pki, ca, tmp_path):
    cert, key = (Path(shutil.copy(pki[name], tmp_path)) for name in ("server_cert", "server_key"))
    server = ServerProcess(test_model_dir, *tls_flags(cert, key), "--stream-stall-timeout-seconds", "120")
    try:
        assert served_certificate(server.port, pki["ca"]) == der(cert)
        # A stream over TLS, paused (the test reads only its first message) while the pair rotates.
        stream = HeldStream(server.target, PROMPT, 200, credentials=channel_credentials(pki["ca"]),
                            authority="localhost")
        stream.read()
        new_cert, new_key = write_pair(ca.issue_cert("localhost", "127.0.0.1"), tmp_path / "next", "server")
        # Written as cert-manager does: both files replaced, each by a rename.
        shutil.copy(new_key, tmp_path / "key.tmp"), shutil.copy(new_cert, tmp_path / "cert.tmp")
        (tmp_path / "key.tmp").replace(key), (tmp_path / "cert.tmp").replace(cert)
        wait_until(lambda: served_certificate(server.port, pki["ca"]) == der(new_cert), 10 * RELOAD_SECONDS + 10,
                   "new connections never saw the rotated certificate")
        assert stream.finish().tokens == 200  # the stream that began before the rotation ends in full
        stub, channel = tls_stub(server.port, pki["ca"])
        assert len(greedy(stub)) == 12
        channel.close()

        # A rotation to a broken pair (a key of another certificate) is refused; the served pair stays.
        other = ca.issue_cert("localhost")
        other.private_key_pem.write_to_path(str(tmp_path / "key.tmp"))
        (tmp_path / "key.tmp").replace(key)
        wait_until(lambda: any("TLS rotation refused" in line for line in server.log), 10 * RELOAD_SECONDS + 10,
                   "the broken pair was not reported")
        assert served_certificate(server.port, pki["ca"]) == der(new_cert)
        assert [line for line in server.log if "does not match" in line]
    finally:
        server.stop()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mtls_server, pki, plaintext_tokens):
    client = (pki["client_cert"], pki["client_key"])
    stub, channel = tls_stub(mtls_server.port, pki["ca"], *client)
    assert greedy(stub) == plaintext_tokens
    channel.close()
    for cert_file, key_file in ((None, None), (pki["stranger_cert"], pki["stranger_key"])):
        stub, channel = tls_stub(mtls_server.port, pki["ca"], cert_file, key_file)
        with pytest.raises(grpc.RpcError) as refused:
            greedy(stub)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    # The metrics port asks for a client certificate as well.
    https = ssl.create_default_context(cafile=pki["ca"])
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        urllib.request.urlopen(f"https://localhost:{mtls_server.metrics_port}/metrics", context=https, timeout=10).read()
    https.load_cert_chain(*client)
    body = urllib.request.urlopen(f"https://localhost:{mtls_server.metrics_port}/metrics", context=https, timeout=10)
    assert b"attnserve_kv_slots_in_use" in body.read()


def test_a_rotated_client_ca_decides_who_may_connect_next(test_model_dir, pki, tmp_path):
    ca_file = Path(shutil.copy(pki["ca"], tmp_path / "clients-ca.crt"))
    server = ServerProcess(test_model_dir, *tls_flags(pki["server_cert"], pki["server_key"]),
                           "--tls-client-ca-file", str(ca_file))
    try:
        new_ca = trustme.CA()
        new_client = write_pair(new_ca.issue_cert("client@example.com"), tmp_path, "new-client")

        def generates(client) -> bool:
            stub, channel = tls_stub(server.port, pki["ca"], *client)
            try:
                return len(greedy(stub)) == 12
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE
                return False
            finally:
                channel.close()

        assert generates((pki["client_cert"], pki["client_key"])) and not generates(new_client)
        new_ca.cert_pem.write_to_path(str(tmp_path / "ca.tmp"))
        (tmp_path / "ca.tmp").replace(ca_file)
        wait_until(lambda: generates(new_client), 10 * RELOAD_SECONDS + 10, "the new client CA was never trusted")
        assert not generates((pki["client_cert"], pki["client_key"]))  # gRPC trusts the new CA alone
        assert any("client CA replaced" in line for line in server.log)
    finally:
        server.stop()


def test_the_plaintext_health_port_answers_under_mutual_tls_and_serves_nothing_else(mtls_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{mtls_server.health_port}")
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as refused:
        greedy(pb_grpc.GenerationStub(channel))
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()


@pytest.fixture(scope="module")
def keyed_server(test_model_dir, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    keys_file.write_text(f"# one key in clear, one by its digest\n{KEY}\n"
                         f"sha256:{hashlib.sha256(b'second-key').hexdigest()}\n")
    server = ServerProcess(test_model_dir, "--api-keys-file", str(keys_file),
                           "--tls-reload-interval-seconds", str(RELOAD_SECONDS))
    yield server, keys_file
    server.stop()


def test_missing_and_wrong_keys_are_unauthenticated_before_any_work(keyed_server, plaintext_tokens):
    server, _ = keyed_server

    def counters():
        return (server.metric("attnserve_requests_finished_total"), server.metric("attnserve_generated_tokens_total"),
                server.metric("attnserve_prompt_tokens_total"))

    before = counters()
    checks = {o: server.metric("attnserve_api_key_checks_total", f'outcome="{o}"') for o in ("missing", "wrong")}
    for metadata, outcome in (((), "missing"), ((("authorization", "Bearer not-the-key"),), "wrong"),
                              ((("authorization", f"Basic {KEY}"),), "missing")):
        for call in (lambda: server.stub().Generate(build_request(prompt_token_ids=PROMPT), metadata=metadata, timeout=10),
                     lambda: list(server.stub().GenerateStream(build_request(prompt_token_ids=PROMPT),
                                                               metadata=metadata, timeout=10))):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
            assert KEY not in refused.value.details()
    assert counters() == before  # nothing was queued, prefilled or finished
    assert server.metric("attnserve_api_key_checks_total", 'outcome="missing"') - checks["missing"] == 4
    assert server.metric("attnserve_api_key_checks_total", 'outcome="wrong"') - checks["wrong"] == 2
    assert server.metric("attnserve_grpc_server_handled_total", 'grpc_code="UNAUTHENTICATED"') >= 6
    # Health stays open by default; the right key works, in clear or by digest.
    reply = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target)).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with AttnserveClient(server.target, timeout=30, api_key=KEY) as client:
        assert list(client.generate(prompt_token_ids=PROMPT, max_new_tokens=12, ignore_eos=True).token_ids) == \
            plaintext_tokens
    with AttnserveClient(server.target, timeout=30, api_key="second-key") as client:
        assert client.model_info().vocab_size > 0
    assert not [line for line in server.log if KEY in line or "second-key" in line]


def test_a_rewritten_keys_file_is_picked_up(keyed_server):
    server, keys_file = keyed_server
    original = keys_file.read_text()
    try:
        keys_file.write_text(original + "third-key\n")

        def third_key_works():
            try:
                AttnserveClient(server.target, timeout=10, api_key="third-key").model_info()
                return True
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                return False

        wait_until(third_key_works, 10 * RELOAD_SECONDS + 10, "the new key was never accepted")
        keys_file.write_text("sha256:not-hex\n")  # broken: refused, the keys in force stay
        wait_until(lambda: any("API keys not reloaded" in line for line in server.log), 10 * RELOAD_SECONDS + 10,
                   "the broken keys file was not reported")
        assert third_key_works()
    finally:
        keys_file.write_text(original)


def start_error(test_model_dir, *flags) -> str:
    result = subprocess.run([sys.executable, "-m", "server", "--model", str(test_model_dir), "--port", "0",
                             "--metrics-port", "-1", *flags], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_weak_settings_are_refused_at_start_with_one_line(test_model_dir, pki, ca, tmp_path):
    assert "does not match" in start_error(test_model_dir, "--tls-cert-file", pki["server_cert"],
                                           "--tls-key-file", pki["client_key"])
    expired = ca.issue_cert("localhost", not_before=datetime.datetime(2020, 1, 1),
                            not_after=datetime.datetime(2021, 1, 1))
    cert, key = write_pair(expired, tmp_path, "expired")
    assert "expired on 2021-01-01" in start_error(test_model_dir, "--tls-cert-file", str(cert), "--tls-key-file", str(key))
    assert "cannot read" in start_error(test_model_dir, "--tls-cert-file", str(tmp_path / "missing.crt"),
                                        "--tls-key-file", pki["server_key"])
    assert "give both or neither" in start_error(test_model_dir, "--tls-cert-file", pki["server_cert"])
    (tmp_path / "comments-only").write_text("# no key yet\n")
    assert "holds no API key" in start_error(test_model_dir, "--api-keys-file", str(tmp_path / "comments-only"))
    assert "cannot read the API keys file" in start_error(test_model_dir, "--api-keys-file", str(tmp_path / "absent"))
