"""Helpers and knobs of the reliability suite (imported as `tests.reliability.helpers`).

`make test` runs every test briefly; `make soak` runs them longer through:

    ATTNSERVE_SOAK_SECONDS    the soak's open-loop load, in seconds   (make test: 36; make soak: 300)
    ATTNSERVE_FUZZ_EXAMPLES   hypothesis examples per fuzz test        (make test: 250; make soak: 1200;
                              two fuzz tests)
"""
from __future__ import annotations

import os
from pathlib import Path

# Shared with tests/server: polling with a deadline, and a client whose small receive window pushes back.
from tests.server.helpers import slow_reader_channel, wait_until  # noqa: F401

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


WORK_GAUGES = ("attnserve_kv_slots_in_use", "attnserve_requests_running", "attnserve_requests_waiting")


def work_gauges(server) -> dict[str, float]:
    return {name: server.metric(name) for name in WORK_GAUGES}


def wait_for_no_work(server, timeout: float = 30.0) -> None:
    """KV slots in use and the running and waiting gauges all back at zero: nothing leaked."""
    wait_until(lambda: not any(work_gauges(server).values()), timeout, lambda: f"work left: {work_gauges(server)}")
