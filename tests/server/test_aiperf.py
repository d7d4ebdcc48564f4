"""NVIDIA's aiperf, an LLM load generator people already use, drives the HTTP API of a real server.

    aiperf (its own venv, `make aiperf`) ── streamed /v1/completions, 4 at a time ──► attnserve (127.0.0.1)
        └─ profile_export*.json, outputs.json, inputs.json ──► this test ◄── /metrics before and after

A short, bounded profile (12 requests, fixed lengths, a fixed seed): every request must succeed, and the
token counts must agree three ways: aiperf's own counts (its client-side tokenizer, pointed at the model
dir), the usage our server reported, and our tokenizer and server metrics. It runs offline: the tokenizer
is a local dir, HF_HUB_OFFLINE is left unset (aiperf's own switch handling is what is under test) and the
Hugging Face cache is an empty folder that must stay empty.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from tokenizers import Tokenizer

from server.contract import ModelCard
from tests.server.helpers import ROOT, ServerProcess, free_port

pytestmark = pytest.mark.slow

AIPERF = ROOT / ".venv-aiperf" / "bin" / "aiperf"
REQUESTS, CONCURRENCY, PROMPT_TOKENS, OUTPUT_TOKENS = 12, 4, 32, 16
# aiperf starts several processes and a tokenizer before its first request: 30 s on an idle 2-core machine,
# measured; 10x that before giving up on a busy one.
AIPERF_TIMEOUT_SECONDS = 300


def http_counter(server: ServerProcess, name: str) -> float:
    return server.metric(name, 'protocol="http"')


@pytest.fixture(scope="module")
def profiled(test_model_dir, tmp_path_factory):
    """One aiperf profile against a fresh server: (artifact dir, HF cache dir, server counters before and after)."""
    if not AIPERF.exists():
        pytest.fail(f"aiperf is not installed in {AIPERF.parent.parent}; run `make aiperf`")
    out = tmp_path_factory.mktemp("aiperf")
    hf_home = tmp_path_factory.mktemp("hf-home")
    server = ServerProcess(test_model_dir, "--kv-slots", "4", "--max-seq-len", "1024", "--http-port", str(free_port()))
    names = ("attnserve_prompt_tokens_total", "attnserve_generated_tokens_total", "attnserve_requests_finished_total")
    try:
        before = {name: http_counter(server, name) for name in names}
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        env |= {"HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"}
        command = [str(AIPERF), "profile", "--model", ModelCard.load(test_model_dir).name,
                   "--url", f"http://127.0.0.1:{server.http_port}", "--endpoint-type", "completions", "--streaming",
                   "--tokenizer", str(test_model_dir), "--request-count", str(REQUESTS),
                   "--concurrency", str(CONCURRENCY), "--prompt-input-tokens-mean", str(PROMPT_TOKENS),
                   "--prompt-input-tokens-stddev", "0", "--prompt-output-tokens-mean", str(OUTPUT_TOKENS),
                   "--prompt-output-tokens-stddev", "0", "--extra-inputs", "ignore_eos:true", "--random-seed", "7",
                   "--request-timeout-seconds", "60", "--export-outputs-json", "--no-gpu-telemetry",
                   "--ui-type", "none", "--output-artifact-dir", str(out)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=AIPERF_TIMEOUT_SECONDS, env=env,
                                cwd=out)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        after = {name: http_counter(server, name) for name in names}
    finally:
        server.stop()
    return out, hf_home, before, after


def test_every_request_succeeded(profiled):
    out, *_ = profiled
    summary = json.loads((out / "profile_export_aiperf.json").read_text())
    assert summary["error_summary"] == [] and summary["request_error_rate"]["avg"] == 0
    assert summary["request_count"]["avg"] == REQUESTS and summary["completed_request_count"]["avg"] == REQUESTS
    assert summary["is_complete"] and not summary["was_cancelled"]
    records = [json.loads(line) for line in (out / "profile_export.jsonl").read_text().splitlines() if line]
    assert len(records) == REQUESTS and not any(r["metadata"]["was_cancelled"] for r in records)


def test_aiperfs_token_counts_equal_the_servers_usage_and_our_tokenizer(profiled, test_model_dir):
    out, _, before, after = profiled
    tokenizer = Tokenizer.from_file(str(test_model_dir / "tokenizer.json"))
    prompts = {entry["session_id"]: entry["payloads"][0]["prompt"]
               for entry in json.loads((out / "inputs.json").read_text())["data"]}
    texts = {entry["conversation_id"]: entry["response_text"]
             for entry in json.loads((out / "outputs.json").read_text())["data"]}
    records = [json.loads(line) for line in (out / "profile_export.jsonl").read_text().splitlines() if line]
    for record in records:
        session, metrics = record["metadata"]["conversation_id"], record["metrics"]
        value = {name: metrics[name]["value"] for name in metrics if isinstance(metrics[name]["value"], (int, float))}
        # Prompts: aiperf's count (client side), the server's usage and our tokenizer agree exactly.
        ours = len(tokenizer.encode(prompts[session], add_special_tokens=False).ids)
        assert value["input_sequence_length"] == value["usage_prompt_tokens"] == ours, session
        # Answers: exactly the tokens asked for (EOS ignored); aiperf counts the streamed text with the same
        # tokenizer as ours (re-tokenizing text need not give back the generated ids, so that is its own count).
        assert value["usage_completion_tokens"] == OUTPUT_TOKENS, session
        assert value["output_sequence_length"] == len(tokenizer.encode(texts[session], add_special_tokens=False).ids)
    # And the server's own counters moved by exactly what aiperf read from its responses.
    summary = json.loads((out / "profile_export_aiperf.json").read_text())
    delta = {name: after[name] - before[name] for name in after}
    assert delta["attnserve_requests_finished_total"] == REQUESTS
    assert delta["attnserve_prompt_tokens_total"] == summary["total_usage_prompt_tokens"]["avg"] == REQUESTS * PROMPT_TOKENS
    assert delta["attnserve_generated_tokens_total"] == summary["total_usage_completion_tokens"]["avg"] == REQUESTS * OUTPUT_TOKENS


def test_it_ran_offline(profiled):
    _, hf_home, *_ = profiled
    downloaded = [str(p) for p in hf_home.rglob("*") if p.is_file()]
    assert not downloaded, downloaded
