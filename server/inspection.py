"""InspectAttention: each head's attention probabilities on a prompt, from the served model's weights.

    handler ──check, submit──► Inspector (one worker thread, at most max_queued jobs) ──► InspectionSession
       ▲                        full: RESOURCE_EXHAUSTED at once                         own onnxruntime session,
       └──── await ◄─────────── result (and the answer built off the event loop)          CPU, 1 thread by default

The engine thread never sees an inspection: the session is a second onnxruntime
session over the dir's inspection graph (contract.INSPECTION_MODEL_FILE, the same
weights file), with its own small thread pool and no KV slot. It runs the whole
sequence as one prefill of an empty cache: greedy tokens, when asked for, come from
repeated prefills (bounded by max_tokens), then one last prefill returns the
probabilities. On a CUDA server it still runs on the CPU: onnxruntime's CUDA
GroupQueryAttention cannot return them.

The session is created on the first inspection, in the worker thread: it holds a
second copy of the weights in memory, which a server nobody inspects does not pay.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import onnxruntime as ort

from server import contract
from server.contract import ModelCard
from server.errors import FailedPreconditionError, InvalidRequestError, QueueFullError
from server.runner import session_options

log = logging.getLogger("attnserve.inspection")

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
INSPECTION_NICENESS = 10  # the worker thread's nice value above the server's


@dataclass(frozen=True)
class InspectionLimits:
    max_tokens: int  # prompt + generated tokens
    max_generated_tokens: int
    max_floats: int  # layers x heads x tokens^2 per answer
    max_queued: int  # inspections running or waiting


@dataclass(frozen=True)
class InspectionJob:
    """A validated inspection: every index in range, every size within the limits."""

    prompt_token_ids: tuple[int, ...]
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    generated_tokens: int


@dataclass(frozen=True)
class HeadAttention:
    layer: int
    head: int
    kv_head: int
    probabilities: np.ndarray  # float32 [T, T]: row = query position, column = key position
    entropy: np.ndarray  # float32 [T], nats


@dataclass(frozen=True)
class InspectionResult:
    token_ids: tuple[int, ...]  # prompt, then generated
    prompt_tokens: int
    generated_tokens: int
    heads: tuple[HeadAttention, ...]


def _indices(requested: Sequence[int], count: int, field: str) -> tuple[int, ...]:
    """The requested indices in [0, count), in order, or all of them when none are requested."""
    if not requested:
        return tuple(range(count))
    for i, index in enumerate(requested):
        if not 0 <= index < count:
            raise InvalidRequestError(f"{field}[{i}]", f"{index} is out of range; this model has {count} {field} "
                                                       f"(0 to {count - 1})")
    if len(set(requested)) != len(requested):
        raise InvalidRequestError(field, "lists an index twice")
    return tuple(requested)


def inspection_job(prompt_ids: Sequence[int], layers: Sequence[int], heads: Sequence[int], generated_tokens: int,
                   card: ModelCard, limits: InspectionLimits, prompt_field: str = "prompt") -> InspectionJob:
    if generated_tokens > limits.max_generated_tokens:
        raise InvalidRequestError("generated_tokens", f"{generated_tokens} is above this server's limit of "
                                                      f"{limits.max_generated_tokens}")
    tokens = len(prompt_ids) + generated_tokens
    if tokens > limits.max_tokens:
        raise InvalidRequestError(prompt_field, f"is {len(prompt_ids)} tokens; with generated_tokens "
                                                f"{generated_tokens} that is {tokens}, above this server's "
                                                f"inspection limit of {limits.max_tokens} tokens")
    if tokens > card.max_positions:
        raise InvalidRequestError(prompt_field, f"plus generated_tokens is {tokens} tokens, beyond the model's "
                                                f"context of {card.max_positions}")
    layers = _indices(layers, card.n_layers, "layers")
    heads = _indices(heads, card.n_heads, "heads")
    floats = len(layers) * len(heads) * tokens ** 2
    if floats > limits.max_floats:
        raise InvalidRequestError(
            "layers", f"{len(layers)} layers x {len(heads)} heads x {tokens}^2 tokens = {floats} probabilities, "
                      f"above this server's limit of {limits.max_floats} per answer; ask for fewer layers or heads "
                      "or a shorter text")
    return InspectionJob(tuple(prompt_ids), layers, heads, generated_tokens)


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Per row, -sum(p ln p) in nats (0 ln 0 = 0): [..., T, T] -> [..., T]. float32 throughout: a float64 copy of
    an answer's probabilities took 10 times as long, on the thread that must leave the cores to generation."""
    p = np.asarray(probabilities, dtype=np.float32)
    logs = np.log(np.maximum(p, np.float32(1e-30)))  # p = 0 contributes 0 * finite = 0
    return -np.einsum("...k,...k->...", p, logs)


def kv_head(head: int, card: ModelCard) -> int:
    """The key/value head a query head reads under grouped-query attention."""
    return head // (card.n_heads // card.n_kv_heads)


class InspectionSession:
    """An onnxruntime session over the inspection graph; runs one sequence at a time, on the CPU."""

    def __init__(self, model_dir: Path, card: ModelCard, intra_op_threads: int = 1):
        self.card = card
        options = session_options(intra_op_threads, intra_op_spinning=False)
        options.inter_op_num_threads = 1
        path = Path(model_dir) / card.graphs[contract.INSPECTION_GRAPH]
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._dtype = NUMPY_DTYPES[card.dtype]

    def run(self, token_ids: Sequence[int], layers: Sequence[int] = ()) -> tuple[np.ndarray, list[np.ndarray]]:
        """One prefill of token_ids: the last token's logits float32 [V], and per layer asked for float32 [H, T, T]."""
        card, T = self.card, len(token_ids)
        feed = {
            contract.INPUT_IDS: np.asarray(token_ids, dtype=np.int64)[None],  # (1, T)
            contract.POSITION_IDS: np.arange(T, dtype=np.int64)[None],
            contract.SEQLENS_K: np.array([T - 1], dtype=np.int32),
            contract.TOTAL_SEQUENCE_LENGTH: np.array(T, dtype=np.int32),
            contract.QUERY_SEQLENS: np.array([T], dtype=np.int32),
        }
        empty = np.zeros((1, card.n_kv_heads, T, card.head_dim), dtype=self._dtype)  # (1, Hkv, T, hd): read as empty
        for layer in range(card.n_layers):
            feed[contract.past_key(layer)] = empty
            feed[contract.past_value(layer)] = empty
        outputs = self.session.run([contract.LOGITS] + [contract.attention_output(i) for i in layers], feed)
        return outputs[0][0], [a[0] for a in outputs[1:]]

    def inspect(self, job: InspectionJob) -> InspectionResult:
        ids = list(job.prompt_token_ids)
        for _ in range(job.generated_tokens):
            logits, _ = self.run(ids)
            ids.append(int(np.argmax(logits)))
        _, per_layer = self.run(ids, job.layers)
        heads = []
        for layer, probabilities in zip(job.layers, per_layer):  # probabilities (H, T, T)
            chosen = probabilities[list(job.heads)]
            entropies = entropy(chosen)
            for i, head in enumerate(job.heads):
                heads.append(HeadAttention(layer, head, kv_head(head, self.card), np.ascontiguousarray(chosen[i]),
                                           entropies[i]))
        return InspectionResult(tuple(ids), len(job.prompt_token_ids), job.generated_tokens, tuple(heads))


def lower_thread_priority(niceness: int) -> None:
    """Raise the calling thread's nice value (Linux schedules threads one by one; elsewhere nothing happens).

    With one intra-op thread onnxruntime runs the inspection in the calling thread, so this
    thread is all the CPU an inspection takes: when the cores are busy, the engine's threads win.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + niceness)
    except (AttributeError, OSError):
        pass


class Inspector:
    """One worker thread running submitted functions in order; at most max_queued of them running or waiting."""

    def __init__(self, max_queued: int):
        self.max_queued = max_queued
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._thread = threading.Thread(target=self._work, name="attnserve-inspection", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        with self._lock:
            if self._in_flight >= self.max_queued:
                raise QueueFullError(f"{self._in_flight} inspections are running or waiting, this server's limit "
                                     f"(--inspection-max-queued {self.max_queued}); retry later")
            self._in_flight += 1
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future

    def _work(self) -> None:
        lower_thread_priority(INSPECTION_NICENESS)
        while True:
            item = self._jobs.get()
            if item is None:
                return
            fn, future = item
            try:
                if future.set_running_or_notify_cancel():  # False: its caller left while it waited
                    try:
                        future.set_result(fn())
                    except BaseException as e:
                        future.set_exception(e)
            finally:
                with self._lock:
                    self._in_flight -= 1

    def stop(self) -> None:
        self._jobs.put(None)


class Inspection:
    """What the gRPC service needs: availability, limits, and `run` (awaitable, off the event loop)."""

    def __init__(self, model_dir: Path, card: ModelCard, limits: InspectionLimits, intra_op_threads: int = 1):
        self.model_dir, self.card, self.limits = Path(model_dir), card, limits
        self.intra_op_threads = intra_op_threads
        graph = card.graphs.get(contract.INSPECTION_GRAPH)
        self.available = bool(graph) and (self.model_dir / graph).is_file()
        self.inspector = Inspector(limits.max_queued)
        self._session: Optional[InspectionSession] = None

    def check_available(self) -> None:
        if not self.available:
            raise FailedPreconditionError(
                f"this model dir ({self.model_dir.name}) has no inspection graph ({contract.INSPECTION_MODEL_FILE}): "
                "it was exported before InspectAttention existed; re-export it with `python -m export` (or add the "
                f"graph in place with `python -m export.inspection {self.model_dir}`) and restart the server")

    def _inspect(self, job: InspectionJob) -> InspectionResult:
        if self._session is None:  # the worker thread is the only one that gets here
            log.info("starting the inspection session (%s, CPU, %d intra-op threads)",
                     contract.INSPECTION_MODEL_FILE, self.intra_op_threads)
            self._session = InspectionSession(self.model_dir, self.card, self.intra_op_threads)
        return self._session.inspect(job)

    async def run(self, job: InspectionJob, finish: Callable[[InspectionResult], object] = lambda r: r):
        """Inspect on the worker thread; `finish` (e.g. building the protobuf answer) runs there too."""
        self.check_available()
        future = self.inspector.submit(lambda: finish(self._inspect(job)))
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        self.inspector.stop()
