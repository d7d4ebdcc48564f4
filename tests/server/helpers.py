"""Helpers of the server tests (imported as `tests.server.helpers`; tests/server/conftest.py holds the fixtures).

    ServerProcess    `python -m server` in a subprocess, for tests of process behaviour (signals, exit codes, logs)
                     and for every test that wants a server as a deployment runs it
    InProcessServer  server.app.start_server in this process on port 0, for tests that need the engine's own
                     state (engine.queued) or that only need a server, not a process
    HeldStream       a stream that advances only when the test reads it: a KV slot held for as long as a test needs
    wait_until       poll a condition with a deadline, instead of sleeping and hoping
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

import grpc

from attnserve.v1 import generation_pb2 as pb
from attnserve.v1 import generation_pb2_grpc as pb_grpc
from server.client import build_request

ROOT = Path(__file__).resolve().parents[2]
# CPU onnxruntime 1.31.1, installed by `make setup` beside the venv's own onnxruntime (put it first on PYTHONPATH).
ONNXRUNTIME_1_31 = ROOT / ".venv" / "onnxruntime-1.31.1"
READY = re.compile(r"attnserve ready: grpc [^:]+:(\d+), metrics (\d+|off), health (\d+|on the grpc port)")
READY_HTTP = re.compile(r", http (\d+|off)$")


def free_port() -> int:
    """A port nothing listens on now, for a listener that cannot bind port 0 itself (the OS may still reuse it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout: float, message, interval: float = 0.05):
    """Poll `condition()` until it returns something truthy, and return that; fail after `timeout` s with
    `message` (or message())."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message() if callable(message) else message} (after {timeout:.0f} s)")
        time.sleep(interval)


def sum_samples(text: str, name: str, labels: str = "") -> float:
    """Sum of a metric's samples in Prometheus text whose label text contains `labels`; KeyError if none."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if labels in line:
                total += float(line.rsplit(" ", 1)[1])
                found = True
    if not found:
        raise KeyError(f"{name} not found on /metrics")
    return total


class _Client:
    """What a test does with a server, whichever kind: a target, stubs, its metrics."""

    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stub(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(grpc.insecure_channel(self.target))

    def metrics_text(self) -> str:
        raise NotImplementedError

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a metric's samples on /metrics whose label text contains `labels`."""
        return sum_samples(self.metrics_text(), name, labels)

    def wait_for_metric(self, name: str, value: float, timeout: float = 10.0) -> float:
        """The metric once it equals `value`, or its value when `timeout` s have passed (the caller asserts)."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.metric(name)
            if current == value or time.monotonic() > deadline:
                return current
            time.sleep(0.05)


class ServerProcess(_Client):
    """`python -m server` in a subprocess; its log is collected for assertions and failures."""

    def __init__(self, model_dir: Path, *flags: str, startup_timeout: float = 120.0, env: Optional[dict] = None):
        # The HTTP API is off unless a test asks for it: its default port (8000) is fixed, and tests start many servers.
        http = () if "--http-port" in flags else ("--http-port", "0")
        command = [sys.executable, "-m", "server", "--model", str(model_dir), "--host", "127.0.0.1",
                   "--port", "0", "--metrics-port", "0", *http, *flags]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.log: list[str] = []
        self._ready = threading.Event()
        self.port = self.metrics_port = self.health_port = self.http_port = None
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
                self.health_port = int(match.group(3)) if match.group(3).isdigit() else None
                http = READY_HTTP.search(line.rstrip())
                self.http_port = int(http.group(1)) if http and http.group(1).isdigit() else None
                self._ready.set()
        self._ready.set()

    def metrics_text(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()

    def terminate(self, timeout: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class InProcessServer(_Client):
    """server.app.start_server(config) on 127.0.0.1 port 0, its event loop on a daemon thread of this process.

    `settings` are ServerConfig fields (kv_slots=1, max_queued_requests=2, ...). `.server` is the
    server.app.Server and `.engine` its engine, for assertions on state a client cannot see.
    Metrics are read from the registry (no /metrics port: prometheus_client's HTTP server cannot be shut down).
    """

    def __init__(self, model_dir, startup_timeout: float = 120.0, **settings):
        from server.app import start_server
        from server.config import ServerConfig

        settings.setdefault("http_port", 0)  # off unless asked for: its default port is fixed
        # One dir, or several: the decoder's, then encoders' and image classifiers'.
        config = ServerConfig(model=model_dir, host="127.0.0.1", port=0, metrics_port=-1, **settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="in-process-server", daemon=True)
        self._thread.start()
        try:
            self.server = self.run(start_server(config), startup_timeout)
        except BaseException:
            self._close_loop()
            raise
        self.port = self.server.port
        self.engine = self.server.engine
        self.models = self.server.models  # every model served (server/models.py)

    def run(self, coroutine, timeout: float = 60.0):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def metrics_text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.engine.observer.registry).decode()

    def stop(self, timeout: float = 60.0) -> None:
        """Drain (accepted requests finish, within the config's drain grace) and stop."""
        try:
            if self.loop.is_running():
                self.run(self.server.drain_and_stop(), timeout)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


def slow_reader_channel(target: str, credentials: Optional[grpc.ChannelCredentials] = None,
                        authority: Optional[str] = None) -> grpc.Channel:
    """A channel whose HTTP/2 receive window stays small.

    By default gRPC grows a stream's window to megabytes, so a client that reads
    nothing still absorbs a whole answer and the server never notices. With a
    4 KiB window, a client that stops reading pushes back on the server within
    a few kilobytes, as a slow mobile client or a stalled proxy would.
    """
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    # TLS: `authority` is the name the server's certificate is checked against (target is an IP address).
    return grpc.secure_channel(target, credentials, options + ([("grpc.ssl_target_name_override", authority)]
                                                               if authority else []))


class HeldStream:
    """A GenerateStream that moves only when the test reads it: a KV slot held, whatever the machine's speed.

    Each token carries 20 logprobs (hundreds of bytes) over a 4 KiB receive window, so once the test stops
    reading, the server pauses the request after --stream-buffer-tokens (64) plus what the window absorbs:
    it keeps its slot and cannot finish until read. The server's --stream-stall-timeout-seconds must
    outlast the hold (or cancelling the stalled stream is what the test is after).
    """

    def __init__(self, target: str, prompt_token_ids, max_new_tokens: int, timeout: float = 120.0,
                 credentials: Optional[grpc.ChannelCredentials] = None, authority: Optional[str] = None):
        self.max_new_tokens = max_new_tokens
        self.channel = slow_reader_channel(target, credentials, authority)
        request = build_request(prompt_token_ids=list(prompt_token_ids), max_new_tokens=max_new_tokens,
                                ignore_eos=True, logprobs=20)
        self.call = pb_grpc.GenerationStub(self.channel).GenerateStream(request, timeout=timeout)
        self.messages: list[pb.GenerateStreamResponse] = []

    def read(self) -> pb.GenerateStreamResponse:
        """The next message (the first one means: admitted, holding a slot)."""
        self.messages.append(next(self.call))
        return self.messages[-1]

    def finish(self) -> "HeldStream":
        """Read to the end of the stream."""
        self.messages.extend(self.call)
        return self

    @property
    def tokens(self) -> int:
        return sum(len(m.token_ids) for m in self.messages)

    @property
    def finish_reason(self):
        return self.messages[-1].finish_reason if self.messages else None

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


@contextlib.contextmanager
def queue_held_full(server, prompt_token_ids):
    """A server started with kv_slots=1 and max_queued_requests=1, its only slot held by a stream the test does
    not read and one request queued behind it: inside, the next request meets a full queue."""
    held = waiting = None
    try:
        held = HeldStream(server.target, prompt_token_ids, max_new_tokens=900)
        held.read()  # admitted: the only slot is held while the test does not read
        waiting = HeldStream(server.target, prompt_token_ids, max_new_tokens=4)
        wait_until(lambda: server.engine.queued == 1, 30, "the second request did not queue")
        yield
    finally:
        for stream in (held, waiting):
            if stream is not None:
                stream.close()
