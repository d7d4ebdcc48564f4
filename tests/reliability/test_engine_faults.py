"""Engine faults: a failing step fails only its own requests; a fault that repeats ends the process.

End to end through `--fault-injection` (server/faults.py) on a real server, and
in process for what must never end the engine thread: a failing observer, a
failing stream callback, a bug outside any step.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.contract import ModelCard
from server.client import build_request
from server import engine as engine_module
from server.engine import Engine, EngineConfig, EngineObserver
from server.prompts import load_tokenizer
from server.types import FinishReason, GenerationRequest, SamplingParams
from tests.reliability.helpers import wait_for_no_work, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _long_request(token: int, max_new_tokens: int = 900):
    return build_request(prompt_token_ids=[token] * 8, max_new_tokens=max_new_tokens, ignore_eos=True)


def test_a_failing_step_fails_only_its_requests(test_model_dir, server_process):
    # Run 600 falls in the middle of two 900-token answers that hold both slots, while two more wait.
    server = server_process(test_model_dir, "--kv-slots", "2", "--max-seq-len", "1024", "--fault-injection", "run:600")
    stub = server.stub()
    running = [stub.Generate.future(_long_request(20 + i), timeout=60) for i in range(2)]
    wait_until(lambda: server.metric("attnserve_requests_running") == 2, 10, "the first two never ran")
    queued = [stub.Generate.future(_long_request(30 + i, 50), timeout=60) for i in range(2)]

    for future in running:
        with pytest.raises(grpc.RpcError) as info:
            future.result()
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "engine step failed" in info.value.details() and "injected fault in model run 600" in info.value.details()
    assert [len(f.result().token_ids) for f in queued] == [50, 50]  # not in that step: untouched
    assert len(stub.Generate(_long_request(40, 20), timeout=30).token_ids) == 20  # the engine goes on
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
    assert server.metric("attnserve_engine_step_failures_total") == 1
    assert server.metric("attnserve_requests_finished_total", 'finish_reason="error"') == 2
    wait_for_no_work(server)
    assert server.process.poll() is None


def test_a_repeating_fault_turns_health_not_serving_and_exits_1(test_model_dir, server_process):
    server = server_process(test_model_dir, "--kv-slots", "2", "--max-seq-len", "1024", "--fault-injection", "run:5+")
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    statuses = []  # what a probe polling health sees, each change once, until the server is gone

    def probe():
        while server.process.poll() is None:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                status = "unreachable"
            if not statuses or statuses[-1] != status:
                statuses.append(status)
            time.sleep(0.05)
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    wait_until(lambda: statuses, 10, "no health status")

    stub = server.stub()
    assert len(stub.Generate(_long_request(5, 2), timeout=30).token_ids) == 2  # model runs 1 and 2 are fine
    codes = []
    started = time.monotonic()
    while server.process.poll() is None and time.monotonic() - started < 20:
        try:
            stub.Generate(_long_request(6, 50), timeout=10)
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
            assert e.details(), e.code()
        time.sleep(0.02)
    assert server.process.wait(20) == 1, "".join(server.log[-20:])
    exited_after = time.monotonic() - started
    prober.join(10)

    # Three failed steps in a row (max_consecutive_step_failures), each failing its request with INTERNAL;
    # later requests are refused as UNAVAILABLE (or CANCELLED, caught by the shutdown) until it is gone.
    assert codes[:3] == ["INTERNAL"] * 3, codes
    assert "UNAVAILABLE" in codes[3:] and set(codes[3:]) <= {"UNAVAILABLE", "CANCELLED"}, codes
    assert statuses[:2] == [SERVING, NOT_SERVING], statuses
    assert exited_after < 15
    assert any("engine broken" in line for line in server.log)


# ---- in process: nothing a request or an observer does ends the engine thread ------------------


class ZeroLogitsRunner:
    """Stands in for the onnxruntime runner: every row's logits are zeros (greedy picks token 0 ... unless banned)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.provider = "fake"

    def step(self, inputs):
        logits = np.zeros((inputs.rows, self.vocab_size), dtype=np.float32)
        logits[:, 5] = 1.0  # always token 5, never an end of sequence
        return logits


class Collector:
    """A request's updates, as the service's stream would receive them (on the engine thread)."""

    def __init__(self):
        self.updates = []
        self.done = threading.Event()

    def __call__(self, update):
        self.updates.append(update)
        if update.finished:
            self.done.set()

    @property
    def tokens(self):
        return [t for u in self.updates for t in u.token_ids]

    @property
    def final(self):
        assert self.done.wait(10), "the request never finished"
        return self.updates[-1]


@pytest.fixture
def make_engine(test_model_dir):
    card = ModelCard.load(test_model_dir)
    tokenizer = load_tokenizer(test_model_dir)
    engines = []

    def make(observer=None, runner=None, on_fatal=None, **config):
        settings = dict(kv_slots=2, max_seq_len=256, prefill_chunk_tokens=64, max_queued_requests=8) | config
        engine = Engine(runner or ZeroLogitsRunner(card.vocab_size), tokenizer, card, EngineConfig(**settings),
                        observer=observer, on_fatal=on_fatal)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def _request(max_new_tokens: int = 10, **fields) -> GenerationRequest:
    return GenerationRequest(request_id="r", prompt_token_ids=[3, 4, 5], max_new_tokens=max_new_tokens, **fields)


def test_a_failing_observer_costs_only_its_reports(make_engine):
    class Broken(EngineObserver):
        def on_step(self, report):
            raise RuntimeError("observer bug")

        def on_request_finished(self, report):
            raise RuntimeError("observer bug")

    engine = make_engine(Broken())
    results = [Collector() for _ in range(3)]
    for collector in results:
        engine.submit(_request(), collector)
    assert [c.final.finish_reason for c in results] == [FinishReason.LENGTH] * 3
    assert all(len(c.tokens) == 10 for c in results)


def test_a_failing_stream_callback_does_not_stop_the_engine(make_engine):
    engine = make_engine()

    def gone(update):
        raise RuntimeError("Event loop is closed")  # what call_soon_threadsafe raises once its loop has ended

    engine.submit(_request(), gone)
    healthy = Collector()
    engine.submit(_request(), healthy)
    assert healthy.final.finish_reason == FinishReason.LENGTH and engine.broken is None


def test_a_bug_outside_any_step_breaks_the_engine_loudly(make_engine):
    observed, told = [], []

    class Observer(EngineObserver):
        def on_fatal(self, error):
            observed.append(error)

    engine = make_engine(Observer(), on_fatal=told.append)
    waiting = Collector()
    engine.scheduler.schedule = lambda: (_ for _ in ()).throw(RuntimeError("scheduler bug"))
    engine.submit(_request(), waiting)
    assert isinstance(waiting.final.error, Exception) and "scheduler bug" in str(waiting.final.error)
    wait_until(lambda: told, 5, "the engine's on_fatal callback was never called")
    assert len(told) == 1 and "scheduler bug" in str(told[0]) and observed == told
    with pytest.raises(Exception, match="shutting down"):
        engine.submit(_request(), Collector())


def test_stop_cancels_requests_still_in_the_inbox(make_engine):
    engine = make_engine(kv_slots=1)
    results = [Collector() for _ in range(4)]
    for collector in results:
        engine.submit(_request(max_new_tokens=200), collector)
    engine.stop()
    assert all(c.final.finished for c in results)
    assert engine.wait_idle(1)


def test_a_lagging_stream_pauses_and_resumes_on_wake(make_engine):
    engine = make_engine(stream_buffer_tokens=4)
    collector = Collector()
    taken = [0]
    engine.submit(_request(max_new_tokens=12), collector, backlog=lambda: len(collector.tokens) - taken[0])
    wait_until(lambda: len(collector.tokens) == 4, 5, "never produced a buffer's worth")
    time.sleep(0.2)
    assert len(collector.tokens) == 4 and not collector.done.is_set()  # paused, holding its slot
    assert engine.slots.in_use == 1
    taken[0] = 4
    engine.wake()
    wait_until(lambda: len(collector.tokens) == 8, 5, "did not resume after wake()")
    taken[0] = 8
    engine.wake()
    assert collector.final.finish_reason == FinishReason.LENGTH and len(collector.tokens) == 12


def test_sampling_that_fails_for_one_request_fails_only_that_request(make_engine, monkeypatch):
    class SamplerWithABug(engine_module.RequestSampler):
        def sample(self, logits):
            if self.params.seed == 666:
                raise ValueError("sampler bug")
            return super().sample(logits)

    monkeypatch.setattr(engine_module, "RequestSampler", SamplerWithABug)
    engine = make_engine()
    healthy, sampled, doomed = Collector(), Collector(), Collector()
    engine.submit(_request(), healthy)
    engine.submit(_request(sampling=SamplingParams(temperature=1.0, seed=1)), sampled)
    engine.submit(_request(sampling=SamplingParams(temperature=1.0, seed=666)), doomed)
    assert "sampler bug" in str(doomed.final.error)
    assert [c.final.finish_reason for c in (healthy, sampled)] == [FinishReason.LENGTH] * 2
    assert len(healthy.tokens) == len(sampled.tokens) == 10 and engine.broken is None


def test_concurrent_submits_and_drain_never_lose_an_accepted_request(make_engine):
    """wait_idle() must not report idle while an accepted request is still on its way in."""
    engine = make_engine(kv_slots=2, max_queued_requests=200)
    results = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        def submit_some():
            for _ in range(30):
                collector = Collector()
                engine.submit(_request(max_new_tokens=3), collector)
                results.append(collector)
        for future in [pool.submit(submit_some) for _ in range(4)]:
            future.result()
    engine.begin_drain()
    assert engine.wait_idle(30)
    assert all(c.done.is_set() and c.updates[-1].finish_reason == FinishReason.LENGTH for c in results)


def test_a_deadline_the_engine_notices_first_still_reads_deadline_exceeded(make_engine):
    """The engine may expire a request before gRPC's own timer fires; the client must still see
    DEADLINE_EXCEEDED, not an OK answer cut short."""
    engine = make_engine(kv_slots=1)
    collector = Collector()
    engine.submit(_request(max_new_tokens=200, deadline=time.monotonic() - 1), collector)
    final = collector.final
    assert final.finish_reason == FinishReason.CANCELLED
    assert isinstance(final.error, engine_module.DeadlineExceededError)
    assert final.error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: engine.slots.in_use == 0, 5, "the expired request kept its slot")
