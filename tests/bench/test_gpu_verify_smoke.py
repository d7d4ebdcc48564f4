"""bench/gpu_verify.py end to end on the CPU (--smoke), and its PyTorch baseline against full recomputation.

The GPU run itself needs a GPU machine (docs/benchmarks.md, "CUDA"); this
proves the script works everywhere else, so that run is one call.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import gpu_verify
from export.verify import VERIFY_SEED, fp16_bound
from model.checkpoint import load_checkpoint
from server.contract import ModelCard

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True], ids=["graph", "legacy-graph"])
def test_smoke_run_end_to_end(legacy, test_checkpoint, tmp_path):
    """--legacy-gqa is the path onnxruntime-gpu 1.31 takes: exports in a child process, the derived graph on the device."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_verify", "--smoke", "--out", str(out), "--work", str(tmp_path / "work"),
         "--small-checkpoint", str(test_checkpoint), *(["--legacy-gqa"] if legacy else [])],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["smoke"] and results["failures"] == [] and results["legacy_gqa"] is legacy
    model = results["models"]["test"]
    assert model["errors"] == []
    assert ("device_verification" in model["model_dirs"]["float16"]) is legacy
    fp16 = model["model_dirs"]["float16"]
    figures = fp16["verification"]
    assert figures["seed"] == VERIFY_SEED
    assert figures["bound"] == fp16_bound(ModelCard.load(Path(fp16["model_dir"])), figures["logit_scale"])
    for dtype in ("float32", "float16"):
        assert model["model_dirs"][dtype]["verification"]["dtype"] == dtype
        placement = model["placement"][dtype]
        # The CPU EP has one memory and inserts no Memcpy node, so "no cache copies" holds by
        # construction here and shows nothing; the profile did reach attention on the CPU EP.
        # test_cache_copies_are_found_in_a_device_profile shows the count finds a copy where one is.
        assert placement["gqa_providers"] == ["CPUExecutionProvider"]
        assert placement["memcpy"] == {} and placement["cache_copies"] == 0
    assert model["greedy_parity"]["fp32_device_equals_cpu"] is True
    table = results["table"]
    assert {(row["dtype"], row["engine"].split(" ")[0]) for row in table} == {
        ("float32", "attnserve"), ("float32", "PyTorch"), ("float16", "attnserve"), ("float16", "PyTorch")}
    for row in table:
        assert all(v > 0 for v in row["decode_tokens_per_s"].values()) and row["ttft_s"] > 0
        assert row["bandwidth_floor_s"] > 0 and row["weight_bytes"] > 0
    markdown = (out / "results.md").read_text()
    assert "| model | dtype | engine | tok/s B=1 | tok/s B=2 | tok/s B=4 | TTFT 32 (ms)" in markdown
    assert "Smoke run on the CPU" in markdown


@pytest.mark.parametrize("checkpoint_fixture", ["test_checkpoint", "test_llama_checkpoint"])
def test_eager_baseline_equals_full_recomputation(checkpoint_fixture, request):
    """The PyTorch side of the table computes the model, not something cheaper: its cache path == no cache."""
    model, config = load_checkpoint(request.getfixturevalue(checkpoint_fixture))
    engine = gpu_verify.EagerEngine(model.eval(), batch=2, capacity=24, device="cpu")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (2, 9))
    logits = engine.prefill(tokens)
    for _ in range(4):
        with torch.no_grad():
            expected = model(torch.from_numpy(tokens))[:, -1].numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
        next_tokens = logits.argmax(axis=1)
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
        logits = engine.decode(next_tokens)


def test_attnserve_engine_equals_eager(test_checkpoint, test_model_dir):
    model, config = load_checkpoint(test_checkpoint)
    ours = gpu_verify.AttnserveEngine(test_model_dir, batch=3, capacity=20, device="cpu")
    eager = gpu_verify.EagerEngine(model.eval(), batch=3, capacity=20, device="cpu")
    prompts = np.random.default_rng(1).integers(0, config.vocab_size, (3, 7))
    a, b = ours.prefill(prompts), eager.prefill(prompts)
    for _ in range(3):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        tokens = b.argmax(axis=1)
        a, b = ours.decode(tokens), eager.decode(tokens)


def kernel_event(op: str, provider: str, *shapes: list) -> dict:
    """One node's entry in an onnxruntime profile, as placement() reads it."""
    return {"cat": "Node", "name": f"{op}_kernel_time",
            "args": {"op_name": op, "provider": provider, "input_type_shape": [{"float16": s} for s in shapes]}}


def test_cache_copies_are_found_in_a_device_profile():
    """On CUDA a cache-shaped Memcpy is the cache crossing to the host; small shape-tensor copies are normal."""
    card = SimpleNamespace(n_kv_heads=2, head_dim=16)
    cache = [2, card.n_kv_heads, gpu_verify.PLACEMENT_CAPACITY, card.head_dim]
    cuda = "CUDAExecutionProvider"
    events = [kernel_event("GroupQueryAttention", cuda, [2, 4, 64]), kernel_event("MemcpyToHost", cuda, [3]),
              kernel_event("MemcpyToHost", cuda, cache), kernel_event("MemcpyFromHost", cuda, cache),
              {"cat": "Session", "name": "model_run", "args": {}}]
    summary = gpu_verify.summarize_profile(events, card, "cuda")
    assert summary["gqa_providers"] == [cuda] and summary["cache_copies"] == 2 and len(summary["memcpy"]) == 3
    clean = gpu_verify.summarize_profile(events[:2], card, "cuda")
    assert clean["cache_copies"] == 0 and clean["ops_not_only_on_device"] == {}


def test_failures_name_a_cache_that_leaves_the_device():
    results = {"settings": {"device": "cuda"}, "models": {
        "small": {"model_dirs": {"float32": {"model_dir": "x"}, "float16": {"error": "ExportError: bound"}},
                  "placement": {"float16": {"gqa_providers": ["CPUExecutionProvider"], "cache_copies": 4}},
                  "greedy_parity": {"fp32_device_equals_cpu": False}, "errors": []},
        "smollm2": {"skipped": "no --smollm2-gguf"},
    }}
    problems = gpu_verify.failures(results)
    assert any("float16: export failed" in p for p in problems)
    assert any("fp32 greedy on the device differs" in p for p in problems)
    assert any("cache left the device" in p for p in problems)
    assert len(problems) == 3
