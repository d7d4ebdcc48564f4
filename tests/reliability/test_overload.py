"""Overload: ten times what the server can hold arrives at once.

Every slot is held by a request that moves only when the test reads it, so the
queue cannot drain while the burst lands: whatever the machine's speed, exactly
the queue's worth is accepted and the rest is refused with RESOURCE_EXHAUSTED
while nothing can finish, i.e. without waiting for room. Every accepted request
then completes in full and the server answers as before. How long refusals and
requests took is measured and reported with the reliability figures, not
asserted: other jobs on a shared 2-core machine move it by tens of milliseconds.
"""
from __future__ import annotations

import functools
import statistics
import threading
import time

import grpc

from attnserve.v1 import generation_pb2 as pb
from attnserve.v1 import generation_pb2_grpc as pb_grpc
from server.client import build_request
from tests.reliability.helpers import FIGURES, wait_for_no_work
from tests.server.helpers import HeldStream

KV_SLOTS = 2
MAX_QUEUED = 4
CAPACITY = KV_SLOTS + MAX_QUEUED  # requests the server holds at once: running plus waiting
BURST = 10 * CAPACITY
MAX_NEW_TOKENS = 32
HELD_TOKENS = 400  # each held stream's answer, read in full once the burst is answered


def _request(index: int):
    return build_request(prompt_token_ids=[3 + index % 400] * 12, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)


def _timed(stub, index: int) -> tuple[str, float, int]:
    started = time.perf_counter()
    try:
        response = stub.Generate(_request(index), timeout=60)
        return "OK", time.perf_counter() - started, len(response.token_ids)
    except grpc.RpcError as e:
        return e.code().name, time.perf_counter() - started, 0


def test_ten_times_capacity_at_once(test_model_dir, server_process):
    # The stall timeout outlasts the test: the held streams wait for this test, not for a timer.
    server = server_process(test_model_dir, "--kv-slots", str(KV_SLOTS), "--max-queued-requests", str(MAX_QUEUED),
                            "--max-seq-len", "1024", "--stream-stall-timeout-seconds", "600")
    stub = pb_grpc.GenerationStub(grpc.insecure_channel(server.target))
    before = [_timed(stub, 1000 + i) for i in range(8)]
    assert all(code == "OK" and tokens == MAX_NEW_TOKENS for code, _, tokens in before), before
    rejected_before = server.metric("attnserve_requests_rejected_total", 'reason="queue_full"')
    finished_before = server.metric("attnserve_requests_finished_total")

    held = [HeldStream(server.target, [450 + i] * 12, HELD_TOKENS) for i in range(KV_SLOTS)]
    try:
        for stream in held:
            stream.read()  # running: every slot is taken
        # The burst goes out as futures: gRPC's own threads send and receive, so the client adds little
        # to what is measured (a Python client awaiting 60 calls adds tens of milliseconds by itself).
        results: list = [None] * BURST
        answered = threading.Semaphore(0)

        def record(index: int, started: float, future: grpc.Future) -> None:
            elapsed = time.perf_counter() - started
            error = future.exception()
            results[index] = ("OK", elapsed, len(future.result().token_ids)) if error is None else (
                error.code().name, elapsed, 0)
            answered.release()

        for index in range(BURST):
            started = time.perf_counter()
            stub.Generate.future(_request(index), timeout=120).add_done_callback(functools.partial(record, index, started))
        # The queue takes MAX_QUEUED and cannot drain: the rest are answered now, each a refusal.
        for count in range(BURST - MAX_QUEUED):
            assert answered.acquire(timeout=60), (
                f"{count} of {BURST - MAX_QUEUED} answered while the queue was full: "
                f"{[r[0] for r in results if r is not None]}")
        refused_while_full = [r for r in results if r is not None]
        assert {code for code, _, _ in refused_while_full} == {"RESOURCE_EXHAUSTED"}, refused_while_full
        # Nothing could have made room: no request has finished since the streams took the slots.
        assert server.metric("attnserve_requests_finished_total") == finished_before

        for stream in held:  # let them finish; the accepted requests follow
            assert stream.finish().tokens == HELD_TOKENS and stream.finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        for stream in held:
            stream.close()
    for _ in range(MAX_QUEUED):
        assert answered.acquire(timeout=60), "an accepted request never finished"

    codes = [code for code, _, _ in results]
    accepted = [tokens for code, _, tokens in results if code == "OK"]
    rejected = sorted(latency for code, latency, _ in results if code == "RESOURCE_EXHAUSTED")
    assert len(accepted) == MAX_QUEUED and len(rejected) == BURST - MAX_QUEUED, codes
    assert accepted == [MAX_NEW_TOKENS] * MAX_QUEUED, "an accepted request came back short"
    wait_for_no_work(server)
    assert server.metric("attnserve_requests_rejected_total", 'reason="queue_full"') - rejected_before == len(rejected)

    # And then the server answers as before.
    after = [_timed(stub, 2000 + i) for i in range(8)]
    assert all(code == "OK" and tokens == MAX_NEW_TOKENS for code, _, tokens in after), after
    p99 = rejected[min(len(rejected) - 1, int(0.99 * len(rejected)))]
    FIGURES["overload: burst"] = (
        f"{BURST} requests at once against {KV_SLOTS} held slots + {MAX_QUEUED} queued: {len(accepted)} accepted and "
        f"completed, {len(rejected)} RESOURCE_EXHAUSTED (p50 {rejected[len(rejected) // 2] * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, not asserted); a request took "
        f"{statistics.median(t for _, t, _ in before) * 1000:.1f} ms before, "
        f"{statistics.median(t for _, t, _ in after) * 1000:.1f} ms after")
