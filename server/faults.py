"""Fault injection for reliability tests: model runs that raise on purpose (--fault-injection).

Off by default, and then nothing here is on the serving path: server/app.py
wraps the runner only when the flag is set. The engine sees an ordinary
runner whose `step` raises, exactly as a failing onnxruntime call would.

    run:N    the Nth model run (counting from 1) raises, once
    run:N+   every model run from the Nth on raises: a persistent fault
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"run:([1-9][0-9]*)(\+?)")


class InjectedFault(RuntimeError):
    """Raised by a model run that --fault-injection chose to fail."""


@dataclass(frozen=True)
class FaultSpec:
    first_run: int  # 1-based
    repeats: bool  # every run from first_run on, not just that one

    def fails(self, run: int) -> bool:
        return run == self.first_run or (self.repeats and run > self.first_run)


def parse_fault_spec(text: str) -> FaultSpec:
    match = _SPEC.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected 'run:N' or 'run:N+' with N >= 1, got {text!r}")
    return FaultSpec(int(match.group(1)), match.group(2) == "+")


class FaultInjectingRunner:
    """A ModelRunner stand-in that fails the model runs a FaultSpec names and delegates everything else."""

    def __init__(self, runner, spec: FaultSpec):
        self._runner = runner
        self._spec = spec
        self.runs = 0

    def step(self, inputs):
        self.runs += 1
        if self._spec.fails(self.runs):
            raise InjectedFault(f"injected fault in model run {self.runs} (--fault-injection)")
        return self._runner.step(inputs)

    def __getattr__(self, name):
        return getattr(self._runner, name)
