"""Servers under load, faults and hostile input (docs/reliability.md). Knobs and helpers: helpers.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The test modules import tests/server's ServerProcess and their helpers as `tests.…`, as tests/deploy does.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.reliability.helpers import FIGURES  # noqa: E402
from tests.server.helpers import ServerProcess  # noqa: E402


@pytest.fixture
def server_process():
    """Start servers with their own flags: server_process(model_dir, *flags); killed after the test if still up."""
    started = []

    def start(model_dir, *flags, **kwargs):
        started.append(ServerProcess(model_dir, *flags, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("reliability figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")

