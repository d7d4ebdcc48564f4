"""Fixtures of the server tests: real attnserve processes on 127.0.0.1 port 0. Helpers: tests/server/helpers.py."""
from __future__ import annotations

import pytest

from tests.server.helpers import ONNXRUNTIME_1_31, ServerProcess

TEST_SERVER_FLAGS = ("--kv-slots", "8", "--max-seq-len", "1024", "--prefill-chunk-tokens", "64",
                     "--max-queued-requests", "256")


@pytest.fixture(scope="session")
def test_server(test_model_dir):
    server = ServerProcess(test_model_dir, *TEST_SERVER_FLAGS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def test_server_on_onnxruntime_1_31(test_model_dir):
    """The same server on CPU onnxruntime 1.31.1 (installed by `make setup`), whose GroupQueryAttention lacks
    query_seqlens like the newest onnxruntime-gpu's: it serves the dir's second graph with uniform calls."""
    if not (ONNXRUNTIME_1_31 / "onnxruntime").is_dir():
        pytest.fail(f"onnxruntime 1.31.1 is not installed in {ONNXRUNTIME_1_31}; run `make setup`")
    server = ServerProcess(test_model_dir, *TEST_SERVER_FLAGS, env={"PYTHONPATH": str(ONNXRUNTIME_1_31)})
    log = "".join(server.log)
    assert "call plan: uniform" in log and "onnxruntime 1.31.1" in log, log
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["onnxruntime-1.32", "onnxruntime-1.31.1"])
def served(request):
    """The test server on each runtime: mixed calls with query_seqlens (1.32), uniform calls without (1.31.1)."""
    name = "test_server" if request.param == "onnxruntime-1.32" else "test_server_on_onnxruntime_1_31"
    return request.getfixturevalue(name)


@pytest.fixture
def server_process():
    """Start extra servers with their own flags: server_process(model_dir, *flags); stopped after the test."""
    started = []

    def start(model_dir, *flags):
        started.append(ServerProcess(model_dir, *flags))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server_class():
    """The ServerProcess class itself, for fixtures with their own scope."""
    return ServerProcess
