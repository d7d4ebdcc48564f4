"""Encoders and image classifiers: one onnxruntime session and one batch thread per model dir.

    embed() / classify() (event loop)        batch thread (one per model)
      check counts, capacity ──► arrivals ──► prepare: tokenize (or preprocess) each call's inputs,
      await the future                          refuse texts over max_tokens ──► BatchPolicy (batching.py)
            ▲                                 next_batch ──► run the graph on the padded batch [B, T]
            └── loop.call_soon_threadsafe ◄── split the rows; a call whose every input ran is answered

The event loop does no model work: tokenizing a call of 128 texts of 300 words took 35-55 ms
here (all-MiniLM-L6-v2's tokenizer), so it happens on the batch thread (the tokenizers library
releases the GIL), never between a decoder stream's tokens. The decoder's engine thread never waits for these
threads: each model has its own session, with --encoder-intra-op-threads threads that sleep
rather than spin between operators.

Padding is invisible in the results: padded tokens are masked out of attention and pooling, so a
text's embedding in a batch equals its embedding alone within fp32 rounding.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from server import contract
from server.batching import Batch, BatchLimits, BatchPolicy, length_groups
from server.contract import EncoderCard
from server.errors import EngineStepError, InvalidRequestError, QueueFullError, ServerDrainingError
from server.images import ImageSpec, preprocess
from server.runner import session_options
from server.types import EmbedResult

log = logging.getLogger("attnserve.encoders")
EMBED, CLASSIFY = "embed", "classify"
OK, ERROR, REJECTED = "ok", "error", "rejected"
# What each kind of model does, for messages that name a model of the wrong kind.
DOES = {contract.KIND_DECODER: "generates text", contract.KIND_ENCODER: "embeds text",
        contract.KIND_IMAGE_CLASSIFIER: "classifies images"}
QUEUED_INPUTS_PER_BATCH = 8  # inputs waiting or running, per max_batch, before new calls are refused


class BatchObserver:
    """Receives what the batched models report; the default ignores it. on_batch is called on the batch thread,
    on_request on the event loop: keep both cheap. A call that was cancelled (client gone) counts as an error."""

    def on_batch(self, model: str, inputs: int, padded_tokens: int, seconds: float) -> None: ...

    def on_request(self, model: str, protocol: str, kind: str, inputs: int, seconds: float, outcome: str) -> None: ...


@dataclass(frozen=True)
class BatchSettings:
    window_seconds: float = 0.002
    max_batch: int = 32  # inputs per run
    max_batch_tokens: int = 8192  # padded tokens per run (inputs x the longest)
    max_inputs_per_request: int = 128
    intra_op_threads: int = 1

    @property
    def limits(self) -> BatchLimits:
        return BatchLimits(self.window_seconds, self.max_batch, self.max_batch_tokens)

    @property
    def max_queued_inputs(self) -> int:
        # At least one largest call, so that an idle model takes any call within the per-call limit.
        return max(QUEUED_INPUTS_PER_BATCH * self.max_batch, self.max_inputs_per_request)


def _session(path: Path, intra_op_threads: int) -> ort.InferenceSession:
    options = session_options(intra_op_threads, intra_op_spinning=False)
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_names(session: ort.InferenceSession, inputs: Sequence[str], output: str, path: Path) -> None:
    have_inputs = {i.name for i in session.get_inputs()}
    have_outputs = {o.name for o in session.get_outputs()}
    if have_inputs != set(inputs) or output not in have_outputs:
        raise ValueError(f"{path} has inputs {sorted(have_inputs)} and outputs {sorted(have_outputs)}; the "
                         f"contract says inputs {list(inputs)} and output {output!r}; re-export the model dir")


class TextEncoderGraph:
    """Texts to token ids (the dir's tokenizer.json) and padded batches of ids to pooled embeddings."""

    def __init__(self, model_dir: Path, card: EncoderCard, intra_op_threads: int):
        self.card = card
        self.tokenizer = Tokenizer.from_file(str(model_dir / contract.TOKENIZER_FILE))
        self.tokenizer.no_padding()  # each run pads to its own longest text, not to a fixed length
        # Truncation keeps room for the special tokens the post-processor adds ([CLS] ... [SEP]); a text that
        # needed cutting reports overflowing pieces, which is how a longer text is told apart.
        self.tokenizer.enable_truncation(card.max_tokens)
        path = model_dir / contract.MODEL_FILE
        self.session = _session(path, intra_op_threads)
        _check_names(self.session, contract.ENCODER_INPUTS, contract.EMBEDDINGS, path)

    def prepare(self, texts: Sequence[str], truncate: bool) -> list[tuple[list[int], int]]:
        """(token ids, tokens) per text; "" is the special tokens alone ([CLS] [SEP]), as BERT embeds it."""
        encodings = self.tokenizer.encode_batch(list(texts))
        for i, encoding in enumerate(encodings):
            if encoding.overflowing and not truncate:
                raise InvalidRequestError(
                    f"texts[{i}]", f"is longer than {self.card.max_tokens} tokens, the most this model reads "
                                   "(special tokens included); shorten it or set truncate")
        return [(encoding.ids, len(encoding.ids)) for encoding in encodings]

    def run(self, id_lists: list[list[int]]) -> np.ndarray:
        batch, longest = len(id_lists), max(len(ids) for ids in id_lists)
        input_ids = np.zeros((batch, longest), dtype=np.int64)  # [B, T], right-padded; padding is masked out
        attention_mask = np.zeros((batch, longest), dtype=np.int64)  # [B, T], 1 = token
        for row, ids in enumerate(id_lists):
            input_ids[row, :len(ids)] = ids
            attention_mask[row, :len(ids)] = 1
        token_type_ids = np.zeros_like(input_ids)  # [B, T], one segment per text
        return self.session.run([contract.EMBEDDINGS], {
            contract.INPUT_IDS: input_ids, contract.ATTENTION_MASK: attention_mask,
            contract.TOKEN_TYPE_IDS: token_type_ids,
        })[0]  # [B, D]

    def check(self) -> None:
        vectors = self.run([self.prepare([""], truncate=False)[0][0]])
        if vectors.shape != (1, self.card.embedding_dim):
            raise ValueError(f"the graph returns embeddings of shape {list(vectors.shape)} for one text; the card "
                             f"says embedding_dim {self.card.embedding_dim}")

    @staticmethod
    def result(rows: list[np.ndarray], tokens: list[int]) -> EmbedResult:
        return EmbedResult(vectors=np.stack(rows).astype(np.float32, copy=False), token_counts=tokens)


class ImageClassifierGraph:
    """uint8 images to the card's pixel_values, and batches of them to label probabilities."""

    def __init__(self, model_dir: Path, card: EncoderCard, intra_op_threads: int):
        self.card = card
        self.spec = ImageSpec.from_card(card.image)
        path = model_dir / contract.MODEL_FILE
        self.session = _session(path, intra_op_threads)
        _check_names(self.session, (contract.PIXEL_VALUES,), contract.LOGITS, path)

    def prepare(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        return [(pixels, 1) for pixels in preprocess(list(images), self.spec)]  # [C, H, W] each

    def run(self, pixel_values: list[np.ndarray]) -> np.ndarray:
        logits = self.session.run([contract.LOGITS], {contract.PIXEL_VALUES: np.stack(pixel_values)})[0]  # [B, L]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))  # [B, L]; the max subtracted: no overflow
        return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)  # [B, L] probabilities

    def check(self) -> None:
        spec = self.spec
        blank = np.zeros((spec.height, spec.width, spec.channels), np.uint8)
        probabilities = self.run([pixels for pixels, _ in self.prepare([blank])])
        if probabilities.shape != (1, len(self.card.labels)):
            raise ValueError(f"the graph returns logits of shape {list(probabilities.shape)} for one image; the "
                             f"card lists {len(self.card.labels)} labels")

    @staticmethod
    def result(rows: list[np.ndarray], tokens: list[int]) -> np.ndarray:
        return np.stack(rows)  # [N, L]


class _Call:
    """One embed() or classify() call, shared by the event loop (which awaits it) and the batch thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, inputs: Sequence[Any], options: dict):
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.inputs = inputs
        self.options = options
        self.rows: list[Optional[np.ndarray]] = [None] * len(inputs)
        self.tokens: list[int] = []
        self.remaining = len(inputs)
        self.ended = False  # answered or failed (batch thread), or abandoned by its caller (event loop)

    def settle(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        """From the batch thread: answer the caller once."""
        if self.ended:
            return
        self.ended = True
        try:
            self.loop.call_soon_threadsafe(self._settle, result, error)
        except RuntimeError:  # the loop is closed: the process is stopping and nobody awaits the answer
            pass

    def _settle(self, result: Any, error: Optional[BaseException]) -> None:
        if not self.future.done():
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)


@dataclass(frozen=True)
class _Input:
    call: _Call
    index: int
    data: Any  # token ids, or pixel_values [C, H, W]
    tokens: int


def load_card(model_dir: Path) -> EncoderCard:
    for name in (contract.MODEL_FILE, contract.CARD_FILE):
        if not (model_dir / name).is_file():
            raise ValueError(f"model dir {model_dir} has no {name}; re-export it with `python -m export`")
    card = EncoderCard.load(model_dir)
    if card.kind == contract.KIND_ENCODER and not (model_dir / contract.TOKENIZER_FILE).is_file():
        raise ValueError(f"model dir {model_dir} has no {contract.TOKENIZER_FILE}; re-export it")
    return card


class BatchedModel:
    """An encoder or image classifier behind its own batch thread (module docstring).

    The gRPC, KServe v2 and HTTP fronts call embed() or classify() and await them; check_capacity() lets a
    front refuse a call during a burst before it decodes images. The app starts, drains and stops it.
    """

    def __init__(self, model_dir: Path, settings: BatchSettings = BatchSettings(),
                 observer: Optional[BatchObserver] = None):
        model_dir = Path(model_dir)
        self.card = load_card(model_dir)
        self.name = self.card.name
        self.kind = self.card.kind
        self.settings = settings
        self.observer = observer or BatchObserver()
        graph_class = TextEncoderGraph if self.kind == contract.KIND_ENCODER else ImageClassifierGraph
        self.graph = graph_class(model_dir, self.card, settings.intra_op_threads)
        self.graph.check()  # a graph that disagrees with its card fails at startup, not on the first call
        self.provider = self.graph.session.get_providers()[0]
        self._policy = BatchPolicy(settings.limits)  # batch thread only
        self._cond = threading.Condition()  # guards everything below
        self._arrivals: list[_Call] = []
        self._queued_inputs = 0  # inputs of calls accepted and not yet run (or failed)
        self._idle = threading.Event()
        self._idle.set()
        self._draining = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"attnserve-batch-{self.name}", daemon=True)

    # ---- any thread ----

    @property
    def queued_inputs(self) -> int:
        return self._queued_inputs

    def check_inputs(self, field: str, count: int) -> None:
        """A call's count of texts or images: at least one, at most --max-inputs-per-request."""
        if not count:
            raise InvalidRequestError(field, "is empty; send at least one")
        if count > self.settings.max_inputs_per_request:
            raise InvalidRequestError(field, f"has {count} entries; at most "
                                             f"{self.settings.max_inputs_per_request} per call are allowed")

    def check_capacity(self, inputs: int = 1, protocol: str = "grpc", kind: str = CLASSIFY) -> None:
        """Raise what a call of `inputs` inputs would meet for lack of room, taking nothing; a refusal is
        reported as the call's outcome (rejected), as embed() and classify() report theirs."""
        try:
            with self._cond:
                self._refuse_if_full(inputs)
        except (QueueFullError, ServerDrainingError):
            self.observer.on_request(self.name, protocol, kind, inputs, 0.0, REJECTED)
            raise

    def _refuse_if_full(self, inputs: int) -> None:
        if self._draining or self._stopping:
            raise ServerDrainingError("the server is shutting down; retry on another replica")
        if self._queued_inputs and self._queued_inputs + inputs > self.settings.max_queued_inputs:
            raise QueueFullError(f"model {self.name} has {self._queued_inputs} inputs queued, at most "
                                 f"{self.settings.max_queued_inputs}; retry later")

    def start(self) -> None:
        self._thread.start()

    def begin_drain(self) -> None:
        with self._cond:
            self._draining = True

    def wait_idle(self, timeout: Optional[float]) -> bool:
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the batch thread after its current run; calls still waiting fail with UNAVAILABLE."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the event loop ----

    async def embed(self, texts: Sequence[str], truncate: bool = False, protocol: str = "grpc") -> EmbedResult:
        self._check_kind(contract.KIND_ENCODER)
        return await self._call(EMBED, "texts", list(texts), {"truncate": bool(truncate)}, protocol)

    async def classify(self, images: Sequence[np.ndarray], protocol: str = "grpc") -> np.ndarray:
        """Probabilities float32 [N, len(card.labels)] of uint8 [H, W, C] images (server/images.py)."""
        self._check_kind(contract.KIND_IMAGE_CLASSIFIER)
        return await self._call(CLASSIFY, "images", list(images), {}, protocol)

    async def classify_encoded(self, count: int, decode: Callable[[], list], protocol: str = "grpc") -> np.ndarray:
        """classify() of images a front still has to decode (decode() returns them as uint8 [H, W, C]): room for
        `count` inputs is checked first, so a burst does not pay to decode what it cannot run, and decoding
        (milliseconds for megabytes of PNG; Pillow releases the GIL) runs off the event loop."""
        self.check_capacity(count, protocol)
        images = await asyncio.get_running_loop().run_in_executor(None, decode)
        return await self.classify(images, protocol)

    def _check_kind(self, kind: str) -> None:
        if self.kind != kind:
            raise InvalidRequestError("model", f"{self.name} {DOES[self.kind]}; ask a model that {DOES[kind]}")

    async def _call(self, kind: str, field: str, inputs: list, options: dict, protocol: str):
        started, outcome = time.monotonic(), ERROR
        try:
            self.check_inputs(field, len(inputs))
            call = _Call(asyncio.get_running_loop(), inputs, options)
            with self._cond:
                self._refuse_if_full(len(inputs))
                self._queued_inputs += len(inputs)
                self._idle.clear()
                self._arrivals.append(call)
                self._cond.notify()
            try:
                result = await call.future
            finally:
                call.ended = True  # a caller that left: its inputs not yet run are skipped
            outcome = OK
            return result
        except (QueueFullError, ServerDrainingError):
            outcome = REJECTED
            raise
        finally:
            self.observer.on_request(self.name, protocol, kind, len(inputs), time.monotonic() - started, outcome)

    # ---- the batch thread ----

    def _run(self) -> None:
        try:
            while self._round():
                pass
        except BaseException as e:  # a bug here must not leave callers waiting for ever
            log.exception("the batch thread of %s failed", self.name)
            self._fail_everything(EngineStepError(f"model {self.name} failed ({type(e).__name__}); see the server log"))
            raise
        self._fail_everything(ServerDrainingError("the server stopped before this call ran; retry"))

    def _round(self) -> bool:
        with self._cond:
            while not self._arrivals and not self._stopping:
                wait = self._policy.wait_seconds(time.monotonic())
                if wait == 0:
                    break
                self._cond.wait(wait)
            if self._stopping:
                return False
            arrivals, self._arrivals = self._arrivals, []
        for call in arrivals:
            self._admit(call)
        batch = self._policy.next_batch(time.monotonic())
        if batch is not None:
            self._execute(batch)
        return True

    def _admit(self, call: _Call) -> None:
        """Tokenize or preprocess a call's inputs and queue them; a call with a bad input fails whole."""
        if call.ended:
            return self._release(len(call.inputs))
        try:
            prepared = self.graph.prepare(call.inputs, **call.options)
        except Exception as e:
            if not isinstance(e, InvalidRequestError):
                log.exception("preparing the inputs of a call to %s failed", self.name)
                e = EngineStepError(f"model {self.name} could not prepare the inputs ({type(e).__name__})")
            call.settle(error=e)
            return self._release(len(call.inputs))
        call.tokens = [tokens for _, tokens in prepared]
        now = time.monotonic()
        for index, (data, tokens) in enumerate(prepared):
            self._policy.add(_Input(call, index, data, tokens), tokens, now)

    def _execute(self, batch: Batch) -> None:
        live = [item for item in batch.items if not item.call.ended]
        # Runs of similar length (server/batching.py): padding a short text to a long one costs the long one.
        for group in length_groups([item.tokens for item in live]):
            self._run_group([live[i] for i in group])
        self._release(len(batch.items))

    def _run_group(self, items: list) -> None:
        started = time.perf_counter()
        try:
            outputs = self.graph.run([item.data for item in items])  # [B, D] or [B, L]
        except Exception as e:
            log.exception("a run of %s on %d inputs failed", self.name, len(items))
            error = EngineStepError(f"model {self.name} failed on a batch of {len(items)} inputs "
                                    f"({type(e).__name__}); see the server log")
            for item in items:
                item.call.settle(error=error)
            return
        self.observer.on_batch(self.name, len(items), len(items) * max(item.tokens for item in items),
                               time.perf_counter() - started)
        for item, row in zip(items, outputs):
            self._deliver(item, row)

    def _deliver(self, item: _Input, row: np.ndarray) -> None:
        call = item.call
        call.rows[item.index] = row
        call.remaining -= 1
        if call.remaining == 0:
            call.settle(result=self.graph.result(call.rows, call.tokens))

    def _release(self, inputs: int) -> None:
        with self._cond:
            self._queued_inputs -= inputs
            if self._queued_inputs == 0:
                self._idle.set()

    def _fail_everything(self, error: BaseException) -> None:
        with self._cond:
            calls, self._arrivals = self._arrivals, []
        while (batch := self._policy.next_batch(float("inf"))) is not None:
            calls += [item.call for item in batch.items]
        for call in calls:
            call.settle(error=error)
        with self._cond:
            self._queued_inputs = 0
            self._idle.set()
