"""A real attnserve process on 127.0.0.1 with port 0, and helpers to talk to it."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from attnserve.v1 import generation_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"attnserve ready: grpc [^:]+:(\d+), metrics (\d+|off)")


class ServerProcess:
    """`python -m server` in a subprocess; its log is collected for assertions and failures."""

    def __init__(self, model_dir: Path, *flags: str, startup_timeout: float = 120.0):
        command = [sys.executable, "-m", "server", "--model", str(model_dir), "--host", "127.0.0.1",
                   "--port", "0", "--metrics-port", "0", *flags]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.log: list[str] = []
        self._ready = threading.Event()
        self.port = self.metrics_port = None
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._ready.wait(startup_timeout) or self.port is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.log[-30:]))

    def _read_log(self):
        for line in self.process.stdout:
            self.log.append(line)
            match = READY.search(line)
            if match:
                self.port = int(match.group(1))
                self.metrics_port = None if match.group(2) == "off" else int(match.group(2))
                self._ready.set()
        self._ready.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stub(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(grpc.insecure_channel(self.target))

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a metric's samples on /metrics whose label text contains `labels`."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if labels in line:
                    total += float(line.rsplit(" ", 1)[1])
                    found = True
        if not found:
            raise KeyError(f"{name} not found on /metrics")
        return total

    def wait_for_metric(self, name: str, value: float, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            current = self.metric(name)
            if current == value or time.monotonic() > deadline:
                return current
            time.sleep(0.05)

    def terminate(self, timeout: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


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
