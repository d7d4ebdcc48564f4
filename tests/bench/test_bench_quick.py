"""`python -m bench --quick` runs every system end to end and writes its results: the harness works (not speed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import ALL_SYSTEMS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_measures_every_system(test_model_dir, test_checkpoint, tmp_path):
    command = [sys.executable, "-m", "bench", "--model", str(test_model_dir), "--checkpoint", str(test_checkpoint),
               "--quick", "--name", "quick", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    results = json.loads((tmp_path / "quick.json").read_text())
    for name in ("quick.md", "quick-throughput.png", "quick-latency.png"):
        assert (tmp_path / name).stat().st_size > 0
    closed = [p for p in results["points"] if p["mode"] == "closed" and p["mix"] == "chat"]
    assert {(p["system"], p["concurrency"]) for p in closed} == {(s, c) for s in ALL_SYSTEMS for c in (1, 4)}
    for p in results["points"]:
        label = f"{p['system']} {p['mix']} {p['mode']} c={p['concurrency']} rate={p['rate']:.2f}"
        assert not p["truncated"] and p["requests_failed"] == 0, label
        assert p["requests_finished"] == p["requests_sent"] > 0, label
        assert p["wrong_length"] == 0, f"{label}: a request got other than max_new_tokens tokens"
        assert p["output_tokens_per_s"] > 0 and p["ttft_s"]["p50"] > 0 and p["itl_s"]["p50"] is not None, label
        assert p["steps"]["rows_per_step"] >= 1, label
    # Poisson arrivals and the long-prompt mix ran over gRPC; the report evaluated the targets it could.
    assert {(p["mix"], p["mode"]) for p in results["points"] if p["system"] == "attnserve-grpc"} == {
        ("chat", "closed"), ("chat", "poisson"), ("long", "closed"), ("long", "poisson")}
    assert results["bandwidth"]["bandwidth_bytes_per_s"] > 0 and results["floor"]["weight_bytes_per_token"] > 0
    assert any(t["met"] is not None for t in results["targets"])
    assert "attnserve-grpc" in (tmp_path / "quick.md").read_text()
