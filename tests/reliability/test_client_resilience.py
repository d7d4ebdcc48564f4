"""The bundled client (server/client.py) against real servers that are draining, not up yet, or busy:
it retries UNAVAILABLE with backoff through its service config, and every call keeps its deadline."""
from __future__ import annotations

import concurrent.futures
import signal
import time

import grpc
import pytest

from attnserve.v1 import generation_pb2_grpc as pb_grpc
from server.client import AttnserveClient, build_request
from tests.reliability.helpers import slow_reader_channel, wait_for_no_work, wait_until
from tests.server.helpers import ServerProcess, free_port



def _stalled_stream(server):
    """A stream whose client reads nothing: it holds its KV slot (paused) until the stall timeout."""
    channel = slow_reader_channel(server.target)
    call = pb_grpc.GenerationStub(channel).GenerateStream(
        build_request(prompt_token_ids=[5] * 8, max_new_tokens=900, ignore_eos=True, logprobs=20), timeout=60)
    call.channel = channel  # a channel that is garbage-collected cancels its calls
    wait_until(lambda: server.metric("attnserve_requests_running") == 1, 10, "the stalled stream never started")
    return call


def test_unavailable_is_retried_with_backoff(test_model_dir, server_process):
    """A draining server answers UNAVAILABLE: the client tries five times, backing off, then gives up."""
    server = server_process(test_model_dir, "--kv-slots", "1", "--max-seq-len", "1024", "--drain-grace-seconds", "60")
    # A stalled stream keeps the drain from finishing while the client knocks.
    stalled = _stalled_stream(server)
    server.process.send_signal(signal.SIGTERM)
    wait_until(lambda: any("draining" in line for line in server.log), 10, "the server never began draining")

    with AttnserveClient(server.target, timeout=30) as client:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            client.generate(prompt_token_ids=[1, 2, 3], max_new_tokens=4)
        elapsed = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.metric("attnserve_requests_rejected_total", 'reason="draining"') == 5
    assert elapsed < 5  # 0.1 s doubling to 0.8 s, jittered: at most 1.5 s of backoff in all

    # Without the service config, one attempt and no more.
    with pytest.raises(grpc.RpcError):
        server.stub().Generate(build_request(prompt_token_ids=[1, 2, 3], max_new_tokens=4), timeout=10)
    assert server.metric("attnserve_requests_rejected_total", 'reason="draining"') == 6
    stalled.cancel()
    assert server.process.wait(30) == 0


def test_a_call_made_before_the_server_is_up_succeeds_once_it_is(test_model_dir):
    """wait_for_ready: the call waits (within its deadline) for the server to bind its port."""
    port = free_port()
    with AttnserveClient(f"127.0.0.1:{port}", timeout=60, wait_for_ready=True) as client, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.generate, prompt_token_ids=[1, 2, 3], max_new_tokens=4, ignore_eos=True)
        time.sleep(0.5)
        assert not call.done()
        server = ServerProcess(test_model_dir, "--kv-slots", "1", "--max-seq-len", "256", "--port", str(port))
        try:
            assert len(call.result(timeout=60).token_ids) == 4
        finally:
            server.stop()


def test_without_wait_for_ready_a_missing_server_fails_fast(tmp_path):
    with AttnserveClient(f"127.0.0.1:{free_port()}", timeout=30) as client:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            client.generate(prompt_token_ids=[1, 2, 3], max_new_tokens=4)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 5


def test_the_deadline_bounds_waiting_for_a_server(tmp_path):
    with AttnserveClient(f"127.0.0.1:{free_port()}", timeout=1.0, wait_for_ready=True) as client:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            client.generate(prompt_token_ids=[1, 2, 3], max_new_tokens=4)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 < time.monotonic() - started < 3


def test_the_deadline_bounds_a_call_to_a_busy_server(test_model_dir, server_process):
    """A request queued behind a full server ends at its deadline, and the server lets it go."""
    server = server_process(test_model_dir, "--kv-slots", "1", "--max-seq-len", "1024")
    stalled = _stalled_stream(server)
    with AttnserveClient(server.target, timeout=0.5) as client:
        for call in (lambda: client.generate(prompt_token_ids=[1, 2, 3], max_new_tokens=4),
                     lambda: list(client.stream(prompt_token_ids=[1, 2, 3], max_new_tokens=4))):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0.45 < time.monotonic() - started < 2
    wait_until(lambda: server.metric("attnserve_requests_finished_total", 'finish_reason="cancelled"') == 2, 5,
               "the server kept requests past their deadline")
    stalled.cancel()
    wait_for_no_work(server)
