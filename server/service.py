"""The gRPC service: it converts, submits to the engine and awaits; it never touches engine state.

Every handler runs inside `errors_to_status`, the one place where exceptions
become gRPC status codes (server/errors.py decides which).

Each request's output travels through an `OutputStream`:

    engine thread ──put()──► LoopMailbox ──► pending updates ──take()──► handler ──yield──► gRPC
                  ◄──backlog(): tokens put, not yet taken                         (blocks while the client
                                                                                   does not read: flow control)

A client that reads slowly makes `yield` block. The engine never waits for
it: it pauses the request once `backlog()` reaches --stream-buffer-tokens,
the handler takes everything pending as one message when it can, and a
request whose output nobody takes for --stream-stall-timeout-seconds is
cancelled, so a stalled client holds neither a KV slot nor unbounded memory.

Embed and Classify go to the encoders and image classifiers the registry
(server/models.py) names; each batches on a thread of its own
(server/encoders.py), and images are decoded off the event loop.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from typing import AsyncIterator, Callable, Optional, Sequence

import grpc
from google.protobuf.message import DecodeError

from attnserve.v1 import generation_pb2 as pb
from server import convert, encoder_convert
from server.contract import KIND_DECODER, KIND_ENCODER, KIND_IMAGE_CLASSIFIER
from server.engine import Engine
from server.errors import AttnserveError, FailedPreconditionError, InvalidRequestError, to_status
from server.inspection import Inspection
from server.models import DecoderModel, ServedModels
from server.prompts import PromptCodec
from server.types import GenerationRequest, GenerationUpdate, ServedModel
from server.validation import Limits

log = logging.getLogger("attnserve.service")
SERVICE_DESCRIPTOR = pb.DESCRIPTOR.services_by_name["Generation"]
SERVICE_NAME = SERVICE_DESCRIPTOR.full_name
PROTOCOL = "grpc"  # the `protocol` this front reports its Embed and Classify calls under


class Undecodable:
    """Stands in for a request that failed to parse, so the handler can answer INVALID_ARGUMENT."""

    def __init__(self, error: Exception):
        self.error = error


def safe_parser(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as e:
            return Undecodable(e)
    return parse


def decoded(message, kind: str):
    """The message, or INVALID_ARGUMENT for one that did not parse."""
    if isinstance(message, Undecodable):
        raise InvalidRequestError("request", f"is not a valid {kind} ({message.error})")
    return message


def unary_handler(method, request_type, response_type) -> grpc.RpcMethodHandler:
    """A unary method whose undecodable request reaches the handler as Undecodable (INVALID_ARGUMENT)."""
    return grpc.unary_unary_rpc_method_handler(method, request_deserializer=safe_parser(request_type),
                                               response_serializer=response_type.SerializeToString)


@contextlib.asynccontextmanager
async def errors_to_status(context: grpc.aio.ServicerContext, service: str = "Generation"):
    """A unary call ends with the status server/errors.py assigns to what it raised (every gRPC service's
    handlers run inside this); an error of no known kind is logged with its traceback first."""
    try:
        yield
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as e:
        if not isinstance(e, AttnserveError):
            log.exception("unexpected error in a %s handler", service)
        code, message = to_status(e)
        await context.abort(code, message)


def merge_updates(updates: Sequence[GenerationUpdate]) -> GenerationUpdate:
    """Consecutive updates of one request as one: their tokens and text, and the last one's ending."""
    if len(updates) == 1:
        return updates[0]
    last = updates[-1]
    return dataclasses.replace(
        last,
        token_ids=tuple(t for u in updates for t in u.token_ids),
        text="".join(u.text for u in updates),
        logprobs=tuple(lp for u in updates for lp in u.logprobs),
    )


class LoopMailbox:
    """Carries calls from the engine thread onto one event loop, waking the loop once per batch.

    call_soon_threadsafe writes to the loop's self-pipe on every call; an engine step
    that emits a token for 64 requests would make 64 such writes and wake the loop up
    to 64 times. Posting here costs a deque append, and one wakeup drains every call
    posted since the last.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._calls: collections.deque = collections.deque()
        self._scheduled = False

    def post(self, fn: Callable, *args) -> None:
        """From any thread: run fn(*args) on the loop, in the order posted."""
        self._calls.append((fn, args))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        # Cleared before draining: a call posted from here on either is drained below or schedules a new drain.
        self._scheduled = False
        while self._calls:
            fn, args = self._calls.popleft()
            fn(*args)


class OutputStream:
    """One request's output between the engine thread and its handler; see the module docstring."""

    def __init__(self, mailbox: LoopMailbox, buffer_tokens: int, stall_timeout: float,
                 wake_engine: Callable[[], None]):
        self._mailbox = mailbox
        self._loop = mailbox.loop
        self._buffer_tokens = buffer_tokens
        self._stall_timeout = stall_timeout
        self._wake_engine = wake_engine
        self.on_stall: Callable[[], None] = lambda: None
        self._put_tokens = 0  # written on the engine thread only
        self._taken_tokens = 0  # written on the event loop only
        self._pending: list[GenerationUpdate] = []
        self._ready = asyncio.Event()
        self._oldest_pending: Optional[float] = None  # loop time the oldest untaken update arrived
        self._stall_timer: Optional[asyncio.TimerHandle] = None
        self._ended = False  # the engine sent the last update: the request holds no slot any more
        self._closed = False  # the handler left: later updates have no reader

    # ---- the engine thread ----

    def put(self, update: GenerationUpdate) -> None:
        self._put_tokens += len(update.token_ids)
        self._mailbox.post(self._push, update)

    def backlog(self) -> int:
        return self._put_tokens - self._taken_tokens

    # ---- the event loop ----

    def _push(self, update: GenerationUpdate) -> None:
        if self._closed:
            return
        if not self._pending:
            self._oldest_pending = self._loop.time()
            if self._stall_timer is None:
                self._stall_timer = self._loop.call_at(self._oldest_pending + self._stall_timeout, self._check_stall)
        self._pending.append(update)
        self._ended = self._ended or update.finished
        self._ready.set()

    def _check_stall(self) -> None:
        self._stall_timer = None
        if self._oldest_pending is None or self._ended:
            return  # everything was taken (the next put re-arms), or the request already left the engine
        due = self._oldest_pending + self._stall_timeout
        if self._loop.time() < due:
            self._stall_timer = self._loop.call_at(due, self._check_stall)
        else:
            self.on_stall()

    async def take(self) -> GenerationUpdate:
        """Wait for output, then take everything pending as one update."""
        await self._ready.wait()
        self._ready.clear()
        updates, self._pending, self._oldest_pending = self._pending, [], None
        update = merge_updates(updates)
        was_full = self.backlog() >= self._buffer_tokens
        self._taken_tokens += len(update.token_ids)
        if was_full:
            self._wake_engine()  # the engine may have paused this request
        return update

    def close(self) -> None:
        self._closed = True
        self._pending.clear()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None


class GenerationService:
    def __init__(self, engine: Engine, codec: PromptCodec, limits: Limits, served: ServedModel,
                 stall_timeout_seconds: float = 30.0, inspection: Optional[Inspection] = None,
                 models: Optional[ServedModels] = None):
        self.engine = engine
        self.codec = codec
        self.limits = limits
        self.inspection = inspection  # InspectAttention, on its own session and thread (server/inspection.py)
        # Every model of this server by name; without one given, the decoder alone.
        self.models = models if models is not None else ServedModels(DecoderModel(served.name, engine.card))
        self.version = served.version
        self.model_info = convert.model_info(served, inspection, self.models.names)
        self.stall_timeout_seconds = stall_timeout_seconds
        self._loop_mailbox: Optional[LoopMailbox] = None

    def _mailbox(self) -> LoopMailbox:
        """The running loop's mailbox, made on first use (the service is built before its loop runs)."""
        loop = asyncio.get_running_loop()
        if self._loop_mailbox is None or self._loop_mailbox.loop is not loop:
            self._loop_mailbox = LoopMailbox(loop)
        return self._loop_mailbox

    def _request(self, message, context) -> GenerationRequest:
        decoded(message, "GenerateRequest")
        if message.model:
            self.models.resolve(message.model, KIND_DECODER)
        self.engine.check_capacity()  # a burst must not pay to tokenize what it cannot run
        return convert.request_from_proto(message, self.codec, self.limits, context.time_remaining())

    async def _updates(self, request: GenerationRequest) -> AsyncIterator[GenerationUpdate]:
        """Submit to the engine and yield its updates; leaving early (client gone) cancels the request."""
        stream = OutputStream(self._mailbox(), self.engine.config.stream_buffer_tokens,
                              self.stall_timeout_seconds, self.engine.wake)
        handle = self.engine.submit(request, stream.put, stream.backlog)
        stream.on_stall = lambda: self._cancel_stalled(handle, request)
        finished = False
        try:
            while not finished:
                update = await stream.take()
                finished = update.finished
                if update.error is not None:
                    if update.token_ids or update.text:  # what came before the failure still reaches the client
                        yield dataclasses.replace(update, error=None)
                    raise update.error
                yield update
        finally:
            stream.close()
            if not finished:
                self.engine.cancel(handle)

    updates = _updates  # the shared submit/await path; the HTTP API (server/http_api.py) uses it too

    def _cancel_stalled(self, handle: int, request: GenerationRequest) -> None:
        log.warning("request %s: the client took no output for %.0f s; cancelling it to free its KV slot",
                    request.request_id, self.stall_timeout_seconds)
        self.engine.cancel(handle)

    async def Generate(self, message, context) -> pb.GenerateResponse:
        async with errors_to_status(context):
            request = self._request(message, context)
            updates = [u async for u in self._updates(request)]
            return convert.unary_response(request.request_id, updates)

    async def GenerateStream(self, message, context):
        async with errors_to_status(context):
            request = self._request(message, context)
            async for update in self._updates(request):
                yield convert.stream_response(request.request_id, update)

    async def GetModelInfo(self, message, context) -> pb.ModelInfo:
        async with errors_to_status(context):
            name = decoded(message, "GetModelInfoRequest").name
            model = self.models.get(name) if name else self.models.default()
            if model.kind == KIND_DECODER:
                return self.model_info
            return encoder_convert.model_info(model, self.models.names, self.version, self.models.image_limits)

    async def Embed(self, message, context) -> bytes:
        async with errors_to_status(context):
            message = decoded(message, "EmbedRequest")
            model = self.models.resolve(message.model, KIND_ENCODER)
            result = await model.embed(list(message.texts), message.truncate, PROTOCOL)
            return encoder_convert.embed_response(model.name, result)

    async def Classify(self, message, context) -> pb.ClassifyResponse:
        async with errors_to_status(context):
            message = decoded(message, "ClassifyRequest")
            model = self.models.resolve(message.model, KIND_IMAGE_CLASSIFIER)
            if message.texts:
                raise InvalidRequestError("texts", f"model {model.name} classifies images; no text classifier is "
                                                   "served")
            model.check_inputs("images", len(message.images))  # before decoding any
            probabilities = await model.classify_encoded(
                len(message.images), lambda: encoder_convert.images_from_proto(message, self.models.image_limits),
                PROTOCOL)
            return encoder_convert.classify_response(model.name, model.card.labels, probabilities, message.top_k)

    async def Tokenize(self, message, context) -> pb.TokenizeResponse:
        async with errors_to_status(context):
            decoded(message, "TokenizeRequest")
            ids = convert.prompt_ids(message, self.codec, self.limits)
            return convert.tokenize_response(ids, self.codec.token_strings(ids))

    async def InspectAttention(self, message, context) -> bytes:
        async with errors_to_status(context):
            decoded(message, "InspectAttentionRequest")
            if self.inspection is None:
                raise FailedPreconditionError("this server was started without InspectAttention")
            self.inspection.check_available()
            job = convert.inspection_from_proto(message, self.codec, self.limits, self.inspection)
            return await self.inspection.run(
                job, finish=lambda result: convert.inspection_response(result, self.codec, self.inspection.card))

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers with parsers that turn undecodable bytes into INVALID_ARGUMENT, not INTERNAL."""
        unary = unary_handler
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Generate": unary(self.Generate, pb.GenerateRequest, pb.GenerateResponse),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self.GenerateStream, request_deserializer=safe_parser(pb.GenerateRequest),
                response_serializer=pb.GenerateStreamResponse.SerializeToString),
            "GetModelInfo": unary(self.GetModelInfo, pb.GetModelInfoRequest, pb.ModelInfo),
            "Tokenize": unary(self.Tokenize, pb.TokenizeRequest, pb.TokenizeResponse),
            # Answered already serialized, straight from the float32 vectors (encoder_convert.embed_response).
            "Embed": grpc.unary_unary_rpc_method_handler(
                self.Embed, request_deserializer=safe_parser(pb.EmbedRequest), response_serializer=bytes),
            "Classify": unary(self.Classify, pb.ClassifyRequest, pb.ClassifyResponse),
            # Answered already serialized (tens of MB), on the inspection thread rather than on the event loop.
            "InspectAttention": grpc.unary_unary_rpc_method_handler(
                self.InspectAttention, request_deserializer=safe_parser(pb.InspectAttentionRequest),
                response_serializer=bytes),
        })
