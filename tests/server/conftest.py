"""Fixtures of the server tests: real attnserve processes on 127.0.0.1 port 0. Helpers: tests/server/helpers.py."""
from __future__ import annotations

import pytest

from tests.server.helpers import ServerProcess


@pytest.fixture(scope="session")
def test_server(test_model_dir):
    server = ServerProcess(test_model_dir, "--kv-slots", "8", "--max-seq-len", "1024",
                           "--prefill-chunk-tokens", "64", "--max-queued-requests", "256")
    yield server
    server.stop()


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
