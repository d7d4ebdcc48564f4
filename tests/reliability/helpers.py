"""Helpers and knobs of the reliability suite (imported as `tests.reliability.helpers`).

`make test` runs every test briefly; `make soak` runs them longer through:

    ATTNSERVE_SOAK_SECONDS    the soak's open-loop load, in seconds   (make test: 36; make soak: 300)
    ATTNSERVE_FUZZ_EXAMPLES   hypothesis examples per fuzz test        (make test: 250; make soak: 1200;
                              two fuzz tests)
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import grpc

SOAK_SECONDS = float(os.environ.get("ATTNSERVE_SOAK_SECONDS", "36"))
FUZZ_EXAMPLES = int(os.environ.get("ATTNSERVE_FUZZ_EXAMPLES", "250"))

# Figures the tests measured, printed at the end of the pytest run (conftest.pytest_terminal_summary).
FIGURES: dict[str, object] = {}


def resident_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_until(condition, timeout: float, message, interval: float = 0.05):
    """Poll `condition()` until it returns something truthy; fail after `timeout` s with `message` (or message())."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message() if callable(message) else message} (after {timeout:.0f} s)")
        time.sleep(interval)


WORK_GAUGES = ("attnserve_kv_slots_in_use", "attnserve_requests_running", "attnserve_requests_waiting")


def work_gauges(server) -> dict[str, float]:
    return {name: server.metric(name) for name in WORK_GAUGES}


def wait_for_no_work(server, timeout: float = 30.0) -> None:
    """KV slots in use and the running and waiting gauges all back at zero: nothing leaked."""
    wait_until(lambda: not any(work_gauges(server).values()), timeout, lambda: f"work left: {work_gauges(server)}")


def slow_reader_channel(target: str) -> grpc.Channel:
    """A channel whose HTTP/2 receive window stays small.

    By default gRPC grows a stream's window to megabytes, so a client that reads
    nothing still absorbs a whole answer and the server never notices. With a
    4 KiB window, a client that stops reading pushes back on the server within
    a few kilobytes, as a slow mobile client or a stalled proxy would.
    """
    return grpc.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)])
