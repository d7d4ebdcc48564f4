"""The engine: one thread owns every piece of mutable serving state.

    gRPC handlers ──submit/cancel/wake──► inbox ──► engine thread:  schedule ─► execute ─► update
                  ◄──on_update(GenerationUpdate) (called from the engine thread, must not block)
                  ──backlog()──► tokens streamed but not yet taken by the client (read by the engine)

The engine thread alone touches the scheduler, the KV slots, the runner and
the per-request samplers and detokenizers; other threads only put commands in
the inbox. Each step is three calls: the scheduler plans, the runner executes
the plan's onnxruntime calls, and the results update each request (sample,
detokenize, check stop conditions, stream the new text). Finished, cancelled
and expired requests give their slot back before the next plan is made.
The engine imports no metrics code: an observer receives what it reports.

The engine never waits for a client. A request whose client lags
`stream_buffer_tokens` behind is paused (it keeps its slot, computes nothing)
until the client catches up and the service wakes the engine; the service
cancels it if the client takes nothing for its stall timeout. Nothing a
request or an observer does can end the engine thread: a failing step fails
the requests in it, and only a fault that repeats, or a bug outside any step,
breaks the engine, which then reports itself through `on_fatal`.
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

from server.batch import build_step_inputs
from server.contract import ModelCard
from server.errors import DeadlineExceededError, EngineStepError, QueueFullError, ServerDrainingError
from server.runner import ModelRunner
from server.sampling import RequestSampler, sample_batch
from server.scheduler import Scheduler, Sequence, StepPlan, split_into_calls
from server.slots import SlotManager
from server.token_pipeline import TokenPipeline
from server.types import FinishReason, GenerationRequest, GenerationUpdate

log = logging.getLogger("attnserve.engine")

UpdateCallback = Callable[[GenerationUpdate], None]
BacklogProbe = Callable[[], int]
FatalCallback = Callable[[BaseException], None]


@dataclass(frozen=True)
class EngineConfig:
    kv_slots: int
    max_seq_len: int  # tokens per slot: prompt + generated
    prefill_chunk_tokens: int  # prompt tokens computed per step, across requests
    max_queued_requests: int  # requests waiting for a slot before new ones are refused
    prefill_tokens_per_decode_row: int = 4  # while streams decode, the prompt budget per decoding row (0: fixed)
    call_overhead_tokens: int = 32  # cost of one extra onnxruntime call, in token computations
    max_consecutive_step_failures: int = 3  # then the engine reports itself broken
    stream_buffer_tokens: int = 64  # a request whose client lags this many tokens behind pauses
    uniform_calls: bool = False  # the graph's GroupQueryAttention lacks query_seqlens (ModelRunner.call_plan)


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
    protocol: str = "grpc"  # the front the request came through (GenerationRequest.protocol)


class EngineObserver:
    """Receives what the engine reports; the default ignores it. Called on the engine thread: keep it cheap."""

    def on_step(self, report: StepReport) -> None: ...

    def on_request_finished(self, report: RequestReport) -> None: ...

    def on_rejected(self, reason: str, protocol: str = "grpc") -> None: ...

    def on_step_failed(self, error: BaseException) -> None: ...

    def on_fatal(self, error: BaseException) -> None: ...


class RequestState:
    """Engine-thread state of one request."""

    def __init__(self, seq: Sequence, request: GenerationRequest, on_update: UpdateCallback,
                 backlog: Optional[BacklogProbe], sampler: RequestSampler, output: TokenPipeline, arrived: float):
        self.seq = seq
        self.request = request
        self.on_update = on_update
        self.backlog = backlog
        self.sampler = sampler
        self.output = output
        self.arrived = arrived
        self.admitted: Optional[float] = None
        self.token_times: list[float] = []


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, card: ModelCard, config: EngineConfig,
                 observer: Optional[EngineObserver] = None, on_fatal: Optional[FatalCallback] = None):
        """`on_fatal` is called once, on the engine thread, after the engine breaks for good (the app exits)."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.card = card
        self.config = config
        self.observer = observer or EngineObserver()
        self._on_fatal = on_fatal
        self.slots = SlotManager(config.kv_slots, config.max_seq_len)
        self.scheduler = Scheduler(self.slots, config.prefill_chunk_tokens, config.prefill_tokens_per_decode_row)
        self.eos_token_ids = frozenset(card.eos_token_ids)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._states: dict[int, RequestState] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _queued, _draining, broken and _idle, shared with submitting threads
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

    def check_capacity(self, protocol: str = "grpc") -> None:
        """Raise what submit() would for lack of room, without taking anything: lets a handler refuse
        a request during a burst before paying for its tokenization and validation. `protocol` is the
        calling front's, as GenerationRequest.protocol: a refusal is reported under it."""
        with self._lock:
            self._refuse_if_full(protocol)

    def submit(self, request: GenerationRequest, on_update: UpdateCallback,
               backlog: Optional[BacklogProbe] = None) -> int:
        """Queue a validated request; returns a handle for cancel(). Raises at once when it cannot be taken.

        `on_update` is called on the engine thread and must not block. `backlog`, when given, returns how
        many streamed tokens the client has not taken yet; the request pauses while it is at
        `stream_buffer_tokens`, and whoever lowers it must call wake().
        """
        with self._lock:
            self._refuse_if_full(request.protocol)
            self._queued += 1
            self._idle.clear()
            # Inside the lock, so that once draining or broken is set no submit can still land in the inbox
            # after the engine thread has read it for the last time.
            handle = next(self._ids)
            self._inbox.put(("submit", handle, request, on_update, backlog, time.monotonic()))
        return handle

    def _refuse_if_full(self, protocol: str) -> None:
        """Under the lock: raise when no request can be taken now."""
        if self._draining or self.broken is not None:
            self._observe("on_rejected", "draining", protocol)
            raise ServerDrainingError("the server is shutting down and accepts no new requests")
        if self._queued >= self.config.max_queued_requests:
            self._observe("on_rejected", "queue_full", protocol)
            raise QueueFullError(
                f"{self._queued} requests are already waiting (--max-queued-requests "
                f"{self.config.max_queued_requests}); retry later"
            )

    def cancel(self, handle: int) -> None:
        self._inbox.put(("cancel", handle))

    def wake(self) -> None:
        """A paused request's client took output: plan again now rather than at the next inbox timeout."""
        self._inbox.put(("wake",))

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
        try:
            self._serve()
        except Exception as e:  # a bug outside any step: say so and stop, rather than leave requests hanging
            log.exception("engine loop failed")
            self._break(e)
            return
        # Stopping: requests still queued or running (including submits still in the inbox) are cancelled.
        self._read_inbox(block=False)
        for state in list(self._states.values()):
            self._finish(state, FinishReason.CANCELLED)
        self._update_idle()

    def _serve(self) -> None:
        failures = 0
        idle = True
        while not self._stopping.is_set():
            # Wait for the inbox only when the last plan was empty: nothing to run, or every running
            # request waits for its client (a wake() or cancel() arrives through the inbox).
            self._read_inbox(block=idle)
            self._expire_deadlines(time.monotonic())
            self._pause_lagging_streams()
            plan = self.scheduler.schedule()
            self._note_admissions(plan)
            idle = not plan.chunks
            if idle:
                self._update_idle()
                continue
            started = time.monotonic()
            try:
                logits, calls = self._execute(plan)
                self._update(plan, logits, calls, started)
                failures = 0
            except Exception as e:  # a failed step fails its requests, not the server
                failures += 1
                self._observe("on_step_failed", e)
                log.error("engine step failed (%d in a row): %s", failures, e)
                for chunk in plan.chunks:
                    state = self._states.get(chunk.seq.seq_id)  # some may have finished before the failure
                    if state is not None:
                        self._finish(state, error=EngineStepError(f"engine step failed: {e}"))
                if failures >= self.config.max_consecutive_step_failures:
                    self._break(e)
                    return

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
            _, handle, request, on_update, backlog, arrived = command
            seq = Sequence(handle, list(request.prompt_token_ids), len(request.prompt_token_ids))
            try:
                state = RequestState(seq, request, on_update, backlog, self._sampler(request),
                                     self._token_pipeline(request), arrived)
            except Exception as e:  # validation let through settings the sampler refuses: fail this request only
                log.exception("request %s could not start", request.request_id)
                with self._lock:
                    self._queued -= 1
                self._send(on_update, GenerationUpdate(error=EngineStepError(f"request could not start: {e}")))
                return
            self._states[handle] = state
            self.scheduler.add(seq)
        elif command[0] == "cancel" and command[1] in self._states:
            self._finish(self._states[command[1]], FinishReason.CANCELLED)

    def _sampler(self, request: GenerationRequest) -> RequestSampler:
        return RequestSampler(request.sampling, self.card.vocab_size, request.prompt_token_ids, request.logprobs)

    def _token_pipeline(self, request: GenerationRequest) -> TokenPipeline:
        return TokenPipeline(self.tokenizer, stop=request.stop, eos_token_ids=self.eos_token_ids,
                             ignore_eos=request.ignore_eos, max_new_tokens=request.max_new_tokens,
                             num_prompt_tokens=len(request.prompt_token_ids), max_total_tokens=self.config.max_seq_len)

    def _expire_deadlines(self, now: float) -> None:
        for state in list(self._states.values()):
            if state.request.deadline is not None and now >= state.request.deadline:
                # The error, not just the reason: the engine can notice the deadline before gRPC does,
                # and the client must see DEADLINE_EXCEEDED either way, never an OK with fewer tokens.
                self._finish(state, FinishReason.CANCELLED, DeadlineExceededError(
                    f"the deadline passed after {state.seq.num_generated} generated tokens"))

    def _pause_lagging_streams(self) -> None:
        """Pause running requests whose clients lag a full buffer behind: they keep their slot, compute nothing."""
        limit = self.config.stream_buffer_tokens
        self.scheduler.set_paused(seq_id for seq_id, state in self._states.items()
                                  if state.backlog is not None and state.backlog() >= limit)

    def _note_admissions(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for chunk in plan.chunks:
            state = self._states[chunk.seq.seq_id]
            if state.admitted is None:
                state.admitted = now
                with self._lock:
                    self._queued -= 1

    def _execute(self, plan: StepPlan) -> tuple[dict[int, np.ndarray], int]:
        """Run the plan's onnxruntime calls; returns the logits of each sampling sequence, and the call count."""
        logits = {}
        calls = split_into_calls(plan, self.config.call_overhead_tokens, uniform=self.config.uniform_calls)
        for call in calls:
            call_logits = self.runner.step(build_step_inputs(call))
            for chunk in call.chunks:
                if chunk.samples:
                    logits[chunk.seq.seq_id] = call_logits[chunk.slot - call.first_slot]
        return logits, len(calls)

    def _update(self, plan: StepPlan, logits: dict[int, np.ndarray], calls: int, started: float) -> None:
        sampling = [self._states[seq_id] for seq_id in logits]
        sampled = {}
        if sampling:
            batch = np.stack([logits[s.seq.seq_id] for s in sampling])
            for state, result in zip(sampling, self._sample(sampling, batch)):
                if isinstance(result, Exception):
                    self._finish(state, error=EngineStepError(f"sampling failed: {result}"))
                else:
                    sampled[state.seq.seq_id] = result
        self.scheduler.update(plan, {seq_id: token for seq_id, (token, _) in sampled.items()})
        now = time.monotonic()
        for state in sampling:
            if state.seq.seq_id not in sampled:
                continue
            token, logprob = sampled[state.seq.seq_id]
            try:
                self._advance(state, token, logprob, now)
            except Exception as e:  # detokenizing or stop matching broke on this request: fail it alone
                log.exception("request %s failed after sampling", state.request.request_id)
                if state.seq.seq_id in self._states:
                    self._finish(state, error=EngineStepError(f"request failed: {e}"))
        stats = self.scheduler.stats()
        self._observe("on_step", StepReport(
            started=started, duration_s=now - started, prefill_tokens=plan.num_prefill_tokens,
            decode_tokens=plan.num_tokens - plan.num_prefill_tokens, calls=calls,
            running=stats.running, waiting=stats.waiting, slots_in_use=stats.slots_in_use,
            tokens_in_use=stats.tokens_in_use,
        ))

    @staticmethod
    def _sample(states: list[RequestState], batch: np.ndarray) -> list:
        """(token, logprob) per row, or the exception that row's sampler raised."""
        try:
            return sample_batch([s.sampler for s in states], batch)
        except Exception:
            # One request's settings broke the batch: sample row by row so that only that request fails.
            results = []
            for state, row in zip(states, batch):
                try:
                    results.append(state.sampler.sample(row))
                except Exception as e:
                    log.exception("sampling failed for request %s", state.request.request_id)
                    results.append(e)
            return results

    def _advance(self, state: RequestState, token: int, logprob, now: float) -> None:
        """Stream one new token of a request and finish it when a stop condition holds."""
        state.token_times.append(now)
        out = state.output.push(token)
        if out.token_ids or out.text:
            self._send(state.on_update, GenerationUpdate(
                token_ids=out.token_ids, text=out.text,
                logprobs=(logprob,) if logprob is not None and out.token_ids else (),
            ))
        if out.finish_reason is not None:
            self._finish(state, out.finish_reason)

    def _finish(self, state: RequestState, reason: Optional[FinishReason] = None,
                error: Optional[BaseException] = None) -> None:
        seq = state.seq
        if state.admitted is None:
            with self._lock:
                self._queued -= 1
        self.scheduler.remove(seq)
        del self._states[seq.seq_id]
        completion = seq.num_generated
        stats = self.scheduler.stats()
        self._send(state.on_update, GenerationUpdate(
            finish_reason=reason, error=error, prompt_tokens=seq.num_prompt_tokens, completion_tokens=completion,
        ))
        self._observe("on_request_finished", RequestReport(
            finish_reason=reason, error=str(error) if error else None, arrived=state.arrived,
            admitted=state.admitted, first_token=state.token_times[0] if state.token_times else None,
            finished=time.monotonic(), prompt_tokens=seq.num_prompt_tokens, completion_tokens=completion,
            token_times=state.token_times, running=stats.running, waiting=stats.waiting,
            slots_in_use=stats.slots_in_use, protocol=state.request.protocol,
        ))
        self._update_idle()

    def _update_idle(self) -> None:
        # Under the lock: a submit between reading _queued and setting _idle would otherwise be missed,
        # and a drain would then cancel a request it had accepted.
        with self._lock:
            if not self._states and self._queued == 0:
                self._idle.set()

    def _send(self, on_update: UpdateCallback, update: GenerationUpdate) -> None:
        """Hand an update to its request's stream; a failing callback (its event loop gone) must not end the engine."""
        try:
            on_update(update)
        except Exception:
            log.exception("could not deliver an update")

    def _observe(self, event: str, *args) -> None:
        """Report to the observer; a failing observer costs its report, never a request or the engine."""
        try:
            getattr(self.observer, event)(*args)
        except Exception:
            log.exception("engine observer failed in %s", event)

    def _break(self, error: BaseException) -> None:
        """Stop for good: refuse new work, fail every accepted request, and tell the observer (the app exits)."""
        with self._lock:
            self.broken = error
        try:
            self._read_inbox(block=False)  # requests submitted before `broken` was set
            for state in list(self._states.values()):
                self._finish(state, error=EngineStepError(f"the engine stopped ({error}); the server is restarting"))
        except Exception:
            log.exception("could not fail every request of the broken engine")
        finally:
            self._observe("on_fatal", error)
            if self._on_fatal is not None:
                try:
                    self._on_fatal(error)
                except Exception:
                    log.exception("the on_fatal callback failed")
