"""Slow consumers: clients that open streams and read nothing, or one message a second.

Their requests pause once --stream-buffer-tokens wait for them, keeping their
KV slots but computing nothing, so they cost other streams no engine time;
their slots come back once the client has taken nothing for
--stream-stall-timeout-seconds. The tests assert that mechanism (how much was
generated for a client that read nothing, when its slot came back), which holds
at any machine speed; the other streams' inter-token latency beside them is
measured and reported with the reliability figures, not asserted: other jobs on
a shared 2-core machine move it by tens of percent.
"""
from __future__ import annotations

import asyncio
import signal
import statistics
import threading
import time

import grpc
import pytest

from attnserve.v1 import generation_pb2 as pb
from attnserve.v1 import generation_pb2_grpc as pb_grpc
from server.client import build_request
from server.service import LoopMailbox, OutputStream
from server.types import FinishReason, GenerationUpdate
from tests.reliability.helpers import FIGURES, slow_reader_channel, wait_for_no_work, wait_until

STALL_TIMEOUT = 8.0
NORMAL_STREAMS = 4
NORMAL_TOKENS = 200
PHASE_SECONDS = 3.0
STALLED_TOKENS = 900  # asked by each client that reads nothing
# What a client that reads nothing can get: the server's --stream-buffer-tokens (64 by default), plus what the
# 4 KiB receive window and the transport's buffers absorb (about 20 tokens of ~200 bytes each, measured), with
# room to spare. A request that did not pause would go on to STALLED_TOKENS.
PAUSED_AT_MOST = 64 + 64


async def _normal_stream(stub, index: int) -> float:
    """Mean seconds between tokens of one stream, from its first message to its last."""
    request = build_request(prompt_token_ids=[10 + index] * 16, max_new_tokens=NORMAL_TOKENS, ignore_eos=True)
    first_time, first_tokens, tokens, last_time = None, 0, 0, None
    async for message in stub.GenerateStream(request, timeout=60):
        now = time.perf_counter()
        tokens += len(message.token_ids)
        if first_time is None:
            first_time, first_tokens = now, tokens
        last_time = now
    assert tokens == NORMAL_TOKENS
    return (last_time - first_time) / (tokens - first_tokens)


async def _inter_token_latencies(target: str, duration: float) -> list[float]:
    """NORMAL_STREAMS clients streaming one answer after another for `duration` seconds."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        end = time.monotonic() + duration
        latencies: list[float] = []

        async def client(index):
            while time.monotonic() < end:
                latencies.append(await _normal_stream(stub, index))

        await asyncio.gather(*(client(i) for i in range(NORMAL_STREAMS)))
        return latencies


class SlowConsumer(threading.Thread):
    """Opens a stream of large messages (20 logprobs a token) and reads nothing, or one message a second."""

    def __init__(self, target: str, index: int, reads_per_second: float, max_new_tokens: int):
        super().__init__(daemon=True)
        self.channel = slow_reader_channel(target)
        self.reads_per_second = reads_per_second
        request = build_request(prompt_token_ids=[200 + index] * 8, max_new_tokens=max_new_tokens, ignore_eos=True,
                                logprobs=20)
        self.call = pb_grpc.GenerationStub(self.channel).GenerateStream(request, timeout=120)
        self.messages: list[pb.GenerateStreamResponse] = []
        self.stopped = threading.Event()

    def run(self):
        try:
            while not self.stopped.wait(1 / self.reads_per_second if self.reads_per_second else 3600):
                self.messages.append(next(self.call))
        except (StopIteration, grpc.RpcError):
            pass

    @property
    def tokens(self) -> int:
        return sum(len(m.token_ids) for m in self.messages)

    def drain(self):
        """Read the rest of the stream, its final message included: everything the server generated for it.
        Only for a client that reads nothing (its own thread never calls next())."""
        self.messages.extend(self.call)

    def stop(self):
        self.stopped.set()
        self.call.cancel()
        self.join(10)
        self.channel.close()


@pytest.mark.slow
def test_slow_consumers_do_not_slow_others_and_lose_their_slots(test_model_dir, server_process):
    server = server_process(test_model_dir, "--kv-slots", "8", "--max-seq-len", "1024",
                            "--stream-stall-timeout-seconds", str(STALL_TIMEOUT))
    asyncio.run(_inter_token_latencies(server.target, 1.0))  # warm-up
    cancelled = server.metric("attnserve_requests_finished_total", 'finish_reason="cancelled"')
    stall_lines = len([line for line in server.log if "took no output" in line])
    before = asyncio.run(_inter_token_latencies(server.target, PHASE_SECONDS))
    readers = [SlowConsumer(server.target, i, reads_per_second=1, max_new_tokens=300) for i in range(2)]
    stalled = [SlowConsumer(server.target, i + 2, reads_per_second=0, max_new_tokens=STALLED_TOKENS) for i in range(2)]
    started = time.monotonic()
    for consumer in readers + stalled:
        consumer.start()
    # Each generates a buffer's worth (plus what the small transport window absorbs), then pauses:
    # it holds its slot while the engine computes nothing for it.
    wait_until(lambda: server.metric("attnserve_kv_slots_in_use") == 4, 30, "slow consumers never started")
    during = asyncio.run(_inter_token_latencies(server.target, PHASE_SECONDS))  # the others still stream in full

    # The stalled clients' slots come back after the stall timeout (never before), and nothing else is left behind.
    wait_for_no_work(server, timeout=STALL_TIMEOUT + 30)
    reclaimed_after = time.monotonic() - started
    assert STALL_TIMEOUT - 1 <= reclaimed_after, f"slots reclaimed {reclaimed_after:.1f} s after the clients stopped reading"
    after = asyncio.run(_inter_token_latencies(server.target, PHASE_SECONDS))
    # One message a second: whether the server sees it as alive depends on how much the client's
    # transport had buffered. Alive, it gets the whole answer, many tokens a message; else it is
    # cancelled as stalled like the others, and its final message says so.
    for reader in readers:
        reader.join(30)
        final = reader.messages[-1]
        assert (final.finish_reason == pb.FINISH_REASON_LENGTH and reader.tokens == 300
                or final.finish_reason == pb.FINISH_REASON_CANCELLED), final.finish_reason
    # A client that read nothing can still read what was generated for it: it was paused after a buffer's worth.
    for consumer in stalled:
        consumer.drain()
        assert consumer.messages[-1].finish_reason == pb.FINISH_REASON_CANCELLED, consumer.messages[-1].finish_reason
        assert 0 < consumer.tokens <= PAUSED_AT_MOST, f"{consumer.tokens} tokens generated for a client that read none"
    for consumer in readers + stalled:
        consumer.stop()
    reclaimed = len(stalled) + sum(r.messages[-1].finish_reason == pb.FINISH_REASON_CANCELLED for r in readers)
    assert len([line for line in server.log if "took no output" in line]) - stall_lines == reclaimed
    assert server.metric("attnserve_requests_finished_total", 'finish_reason="cancelled"') - cancelled == reclaimed

    baseline = statistics.median(before + after)
    slowed = statistics.median(during) / baseline - 1
    FIGURES["slow consumers: inter-token latency"] = (
        f"{baseline * 1000:.2f} ms alone, {statistics.median(during) * 1000:.2f} ms beside 2 stalled and "
        f"2 one-message-a-second clients ({slowed:+.1%}, not asserted); the stalled ones generated "
        f"{', '.join(str(c.tokens) for c in stalled)} of {STALLED_TOKENS} tokens and their slots were reclaimed "
        f"{reclaimed_after:.1f} s after they stopped reading (stall timeout {STALL_TIMEOUT:.0f} s); "
        f"the one-a-second readers got {', '.join(f'{r.tokens} tokens in {len(r.messages)} messages' for r in readers)}")


def test_shutdown_does_not_wait_on_a_stalled_client(test_model_dir, server_process):
    """SIGTERM with a client that never reads: the drain grace bounds it, and the process exits 0."""
    server = server_process(test_model_dir, "--kv-slots", "2", "--max-seq-len", "1024", "--drain-grace-seconds", "2")
    stalled = SlowConsumer(server.target, 0, reads_per_second=0, max_new_tokens=900)
    stalled.start()
    wait_until(lambda: server.metric("attnserve_requests_running") == 1, 10, "the stalled stream never started")
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(20) == 0, "".join(server.log[-20:])
    assert time.monotonic() - started < 10
    stalled.stop()


def test_output_stream_merges_what_waits_wakes_the_engine_and_flags_a_stall():
    """The service side of a stream, on a real event loop with a 50 ms stall timeout.

    Nothing here depends on how fast the loop runs: the stall is awaited (with a deadline far above 50 ms),
    and that it did not come early is read off the loop's own clock.
    """
    async def scenario():
        loop = asyncio.get_running_loop()
        woken, stalls = [], []
        stalled = asyncio.Event()
        stream = OutputStream(LoopMailbox(loop), buffer_tokens=2, stall_timeout=0.05, wake_engine=lambda: woken.append(True))
        stream.on_stall = lambda: (stalls.append(loop.time()), stalled.set())
        for token in (1, 2, 3):  # as the engine thread would: a buffer's worth and more
            stream.put(GenerationUpdate(token_ids=(token,), text=str(token)))
        assert stream.backlog() == 3
        update = await stream.take()
        assert update.token_ids == (1, 2, 3) and update.text == "123"  # one message for all that waited
        assert stream.backlog() == 0 and woken == [True]  # it was at the limit: the engine may have paused it
        assert not stalls  # taken as it came: no stall, however long the loop took to get here
        put_at = loop.time()
        stream.put(GenerationUpdate(token_ids=(4,)))  # and nobody takes token 4
        await asyncio.wait_for(stalled.wait(), timeout=10)
        # (1 µs for the rounding of loop times: the check itself is loop.time() >= arrival + 0.05)
        assert stalls[0] - put_at >= 0.05 - 1e-6, f"flagged {stalls[0] - put_at:.4f} s after the put: before the timeout"
        stream.put(GenerationUpdate(finish_reason=FinishReason.CANCELLED))  # what the engine sends on cancel
        # The put reaches the loop through the mailbox's call_soon_threadsafe, which is queued before this
        # task resumes: one turn of the loop and it is pending beside token 4.
        await asyncio.sleep(0)
        final = await stream.take()
        assert final.token_ids == (4,) and final.finish_reason == FinishReason.CANCELLED
        assert len(stalls) == 1  # flagged once
        stream.close()

    asyncio.run(scenario())
