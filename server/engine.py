"""The engine: one thread owns every piece of mutable serving state.

    gRPC handlers ──submit/cancel──► inbox ──► engine thread:  schedule ─► execute ─► update
                  ◄──on_update(GenerationUpdate) (called from the engine thread)

The engine thread alone touches the scheduler, the KV slots, the runner and
the per-request samplers and detokenizers; other threads only put commands in
the inbox. Each step is three calls: the scheduler plans, the runner executes
the plan's onnxruntime calls, and the results update each request (sample,
detokenize, check stop conditions, stream the new text). Finished, cancelled
and expired requests give their slot back before the next plan is made.
The engine imports no metrics code: an observer receives what it reports.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from tokenizers import Tokenizer

from export.contract import ModelCard
from server.batch import build_step_inputs
from server.detokenizer import IncrementalDetokenizer
from server.errors import EngineStepError, QueueFullError, ServerDrainingError
from server.runner import ModelRunner
from server.sampling import RequestSampler, sample_batch
from server.scheduler import Scheduler, Sequence, StepPlan, split_into_calls
from server.slots import SlotManager
from server.stop_strings import StopMatcher
from server.types import FinishReason, GenerationRequest, GenerationUpdate

log = logging.getLogger("attnserve.engine")

UpdateCallback = Callable[[GenerationUpdate], None]


@dataclass(frozen=True)
class EngineConfig:
    kv_slots: int
    max_seq_len: int  # tokens per slot: prompt + generated
    prefill_chunk_tokens: int  # prompt tokens computed per step, across requests
    max_queued_requests: int  # requests waiting for a slot before new ones are refused
    call_overhead_tokens: int = 32  # cost of one extra onnxruntime call, in token computations
    max_consecutive_step_failures: int = 3  # then the engine reports itself broken


@dataclass
class StepReport:
    """What one engine step did; the metrics module turns it into histograms."""

    started: float
    duration_s: float
    prefill_tokens: int
    decode_tokens: int
    calls: int
    running: int
    waiting: int
    slots_in_use: int
    tokens_in_use: int


@dataclass
class RequestReport:
    """A finished request's timeline (monotonic seconds) and counts."""

    finish_reason: Optional[FinishReason]
    error: Optional[str]
    arrived: float
    admitted: Optional[float]
    first_token: Optional[float]
    finished: float
    prompt_tokens: int
    completion_tokens: int
    token_times: list[float] = field(default_factory=list)
    running: int = 0  # engine state right after this request left it
    waiting: int = 0
    slots_in_use: int = 0


class EngineObserver:
    """Receives what the engine reports; the default ignores it. Called on the engine thread: keep it cheap."""

    def on_step(self, report: StepReport) -> None: ...

    def on_request_finished(self, report: RequestReport) -> None: ...

    def on_rejected(self, reason: str) -> None: ...

    def on_step_failed(self, error: BaseException) -> None: ...

    def on_fatal(self, error: BaseException) -> None: ...


class RequestState:
    """Engine-thread state of one request."""

    def __init__(self, seq: Sequence, request: GenerationRequest, on_update: UpdateCallback,
                 tokenizer: Tokenizer, vocab_size: int, arrived: float):
        self.seq = seq
        self.request = request
        self.on_update = on_update
        self.sampler = RequestSampler(request.sampling, vocab_size, request.prompt_token_ids, request.logprobs)
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = StopMatcher(request.stop)
        self.arrived = arrived
        self.admitted: Optional[float] = None
        self.token_times: list[float] = []


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, card: ModelCard, config: EngineConfig,
                 observer: Optional[EngineObserver] = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.card = card
        self.config = config
        self.observer = observer or EngineObserver()
        self.slots = SlotManager(config.kv_slots, config.max_seq_len)
        self.scheduler = Scheduler(self.slots, config.prefill_chunk_tokens)
        self.eos_token_ids = frozenset(card.eos_token_ids)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._states: dict[int, RequestState] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _queued and _draining, read by submitting threads
        self._queued = 0  # submitted, not yet given a slot
        self._draining = False
        self._stopping = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="attnserve-engine", daemon=True)
        self.broken: Optional[BaseException] = None

    # ---- called from any thread ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest, on_update: UpdateCallback) -> int:
        """Queue a validated request; returns a handle for cancel(). Raises at once when it cannot be taken."""
        with self._lock:
            if self._draining or self.broken is not None:
                self.observer.on_rejected("draining")
                raise ServerDrainingError("the server is shutting down and accepts no new requests")
            if self._queued >= self.config.max_queued_requests:
                self.observer.on_rejected("queue_full")
                raise QueueFullError(
                    f"{self._queued} requests are already waiting (--max-queued-requests "
                    f"{self.config.max_queued_requests}); retry later"
                )
            self._queued += 1
            self._idle.clear()
        handle = next(self._ids)
        self._inbox.put(("submit", handle, request, on_update, time.monotonic()))
        return handle

    def cancel(self, handle: int) -> None:
        self._inbox.put(("cancel", handle))

    def begin_drain(self) -> None:
        with self._lock:
            self._draining = True

    def wait_idle(self, timeout: Optional[float]) -> bool:
        """Block until no request is queued or running; False if the timeout passed first."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel whatever is left and end the engine thread."""
        self.begin_drain()
        self._stopping.set()
        self._inbox.put(("wake",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._queued

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._read_inbox(block=not self.scheduler.has_work)
            self._expire_deadlines(time.monotonic())
            plan = self.scheduler.schedule()
            self._note_admissions(plan)
            if not plan.chunks:
                self._update_idle()
                continue
            started = time.monotonic()
            try:
                logits = self._execute(plan)
                failures = 0
            except Exception as e:  # a failed step fails its requests, not the server
                failures += 1
                self.observer.on_step_failed(e)
                log.error("engine step failed (%d in a row): %s", failures, e)
                for chunk in plan.chunks:
                    self._finish(self._states[chunk.seq.seq_id], error=EngineStepError(f"engine step failed: {e}"))
                if failures >= self.config.max_consecutive_step_failures:
                    self._break(e)
                    return
                continue
            self._update(plan, logits, started)
        for state in list(self._states.values()):
            self._finish(state, FinishReason.CANCELLED)
        self._update_idle()

    def _read_inbox(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                self._handle(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, command: tuple) -> None:
        if command[0] == "submit":
            _, handle, request, on_update, arrived = command
            seq = Sequence(handle, list(request.prompt_token_ids), len(request.prompt_token_ids))
            self._states[handle] = RequestState(seq, request, on_update, self.tokenizer, self.card.vocab_size, arrived)
            self.scheduler.add(seq)
        elif command[0] == "cancel" and command[1] in self._states:
            self._finish(self._states[command[1]], FinishReason.CANCELLED)

    def _expire_deadlines(self, now: float) -> None:
        for state in list(self._states.values()):
            if state.request.deadline is not None and now >= state.request.deadline:
                self._finish(state, FinishReason.CANCELLED)

    def _note_admissions(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for chunk in plan.chunks:
            state = self._states[chunk.seq.seq_id]
            if state.admitted is None:
                state.admitted = now
                with self._lock:
                    self._queued -= 1

    def _execute(self, plan: StepPlan) -> dict[int, np.ndarray]:
        """Run the plan's onnxruntime calls; returns the logits of each sampling sequence."""
        logits = {}
        calls = split_into_calls(plan, self.config.call_overhead_tokens)
        for call in calls:
            call_logits = self.runner.step(build_step_inputs(call))
            for chunk in call.chunks:
                if chunk.samples:
                    logits[chunk.seq.seq_id] = call_logits[chunk.slot - call.first_slot]
        self._last_calls = len(calls)
        return logits

    def _update(self, plan: StepPlan, logits: dict[int, np.ndarray], started: float) -> None:
        sampling = [self._states[seq_id] for seq_id in logits]
        sampled = {}
        if sampling:
            batch = np.stack([logits[s.seq.seq_id] for s in sampling])
            for state, (token, logprob) in zip(sampling, sample_batch([s.sampler for s in sampling], batch)):
                sampled[state.seq.seq_id] = (token, logprob)
        prefill_tokens = plan.num_prefill_tokens
        self.scheduler.update(plan, {seq_id: token for seq_id, (token, _) in sampled.items()})
        now = time.monotonic()
        for state in sampling:
            token, logprob = sampled[state.seq.seq_id]
            self._advance(state, token, logprob, now)
        self.observer.on_step(StepReport(
            started=started, duration_s=now - started, prefill_tokens=prefill_tokens,
            decode_tokens=plan.num_tokens - prefill_tokens, calls=self._last_calls,
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            slots_in_use=self.slots.in_use, tokens_in_use=sum(s.num_computed for s in self.scheduler.running),
        ))

    def _advance(self, state: RequestState, token: int, logprob, now: float) -> None:
        """Stream one new token of a request and finish it when a stop condition holds."""
        state.token_times.append(now)
        seq, request = state.seq, state.request
        reason, text = None, ""
        if token in self.eos_token_ids and not request.ignore_eos:
            reason = FinishReason.EOS
        else:
            text, stopped = state.stop.push(state.detokenizer.push(token))
            if stopped:
                reason = FinishReason.STOP
            elif seq.num_generated >= request.max_new_tokens or len(seq.token_ids) >= self.config.max_seq_len:
                reason = FinishReason.LENGTH
        if reason in (FinishReason.EOS, FinishReason.LENGTH):
            # Text held back (an incomplete character, a possible stop-string prefix) is due now.
            tail, stopped = state.stop.push(state.detokenizer.flush())
            text += tail if stopped else tail + state.stop.flush()
            reason = FinishReason.STOP if stopped else reason
        streamed = (token,) if reason is not FinishReason.EOS else ()
        if streamed or text:
            state.on_update(GenerationUpdate(
                token_ids=streamed, text=text, logprobs=(logprob,) if logprob is not None and streamed else (),
            ))
        if reason is not None:
            self._finish(state, reason)

    def _finish(self, state: RequestState, reason: Optional[FinishReason] = None,
                error: Optional[BaseException] = None) -> None:
        seq = state.seq
        if state.admitted is None:
            with self._lock:
                self._queued -= 1
        self.scheduler.remove(seq)
        del self._states[seq.seq_id]
        completion = seq.num_generated
        state.on_update(GenerationUpdate(
            finish_reason=reason, error=error, prompt_tokens=seq.num_prompt_tokens, completion_tokens=completion,
        ))
        self.observer.on_request_finished(RequestReport(
            finish_reason=reason, error=str(error) if error else None, arrived=state.arrived,
            admitted=state.admitted, first_token=state.token_times[0] if state.token_times else None,
            finished=time.monotonic(), prompt_tokens=seq.num_prompt_tokens, completion_tokens=completion,
            token_times=state.token_times, running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting), slots_in_use=self.slots.in_use,
        ))
        self._update_idle()

    def _update_idle(self) -> None:
        if not self._states and self._queued == 0:
            self._idle.set()

    def _break(self, error: BaseException) -> None:
        self.broken = error
        for state in list(self._states.values()):
            self._finish(state, error=EngineStepError(f"engine stopped after repeated failures: {error}"))
        self.observer.on_fatal(error)
