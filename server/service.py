"""The gRPC service: it converts, submits to the engine and awaits; it never touches engine state.

Every handler runs inside `_errors_to_status`, the one place where exceptions
become gRPC status codes (server/errors.py decides which).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from proto.attnserve.v1 import generation_pb2 as pb
from server import convert
from server.engine import Engine
from server.errors import AttnserveError, InvalidRequestError, to_status
from server.prompts import PromptCodec
from server.types import GenerationRequest, GenerationUpdate
from server.validation import Limits

log = logging.getLogger("attnserve.service")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


class _Undecodable:
    """Stands in for a request that failed to parse, so the handler can answer INVALID_ARGUMENT."""

    def __init__(self, error: Exception):
        self.error = error


def _safe_parser(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as e:
            return _Undecodable(e)
    return parse


@contextlib.asynccontextmanager
async def _errors_to_status(context: grpc.aio.ServicerContext):
    try:
        yield
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as e:
        if not isinstance(e, AttnserveError):
            log.exception("unexpected error in a handler")
        code, message = to_status(e)
        await context.abort(code, message)


class GenerationService:
    def __init__(self, engine: Engine, codec: PromptCodec, limits: Limits, model_info: pb.ModelInfo):
        self.engine = engine
        self.codec = codec
        self.limits = limits
        self.model_info = model_info

    def _request(self, message, context) -> GenerationRequest:
        if isinstance(message, _Undecodable):
            raise InvalidRequestError("request", f"is not a valid GenerateRequest ({message.error})")
        return convert.request_from_proto(message, self.codec, self.limits, context.time_remaining())

    async def _updates(self, request: GenerationRequest) -> AsyncIterator[GenerationUpdate]:
        """Submit to the engine and yield its updates; leaving early (client gone) cancels the request."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[GenerationUpdate] = asyncio.Queue()
        handle = self.engine.submit(request, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u))
        finished = False
        try:
            while not finished:
                update = await updates.get()
                if update.error is not None:
                    finished = True
                    raise update.error
                finished = update.finished
                yield update
        finally:
            if not finished:
                self.engine.cancel(handle)

    async def Generate(self, message, context) -> pb.GenerateResponse:
        async with _errors_to_status(context):
            request = self._request(message, context)
            updates = [u async for u in self._updates(request)]
            return convert.unary_response(request.request_id, updates)

    async def GenerateStream(self, message, context):
        async with _errors_to_status(context):
            request = self._request(message, context)
            async for update in self._updates(request):
                yield convert.stream_response(request.request_id, update)

    async def GetModelInfo(self, message, context) -> pb.ModelInfo:
        return self.model_info

    async def Tokenize(self, message, context) -> pb.TokenizeResponse:
        async with _errors_to_status(context):
            if isinstance(message, _Undecodable):
                raise InvalidRequestError("request", f"is not a valid TokenizeRequest ({message.error})")
            ids = convert.prompt_ids(message, self.codec, self.limits)
            return pb.TokenizeResponse(token_ids=ids, tokens=self.codec.token_strings(ids))

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers with parsers that turn undecodable bytes into INVALID_ARGUMENT, not INTERNAL."""
        def unary(method, request_type, response_type):
            return grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=_safe_parser(request_type),
                response_serializer=response_type.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Generate": unary(self.Generate, pb.GenerateRequest, pb.GenerateResponse),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self.GenerateStream, request_deserializer=_safe_parser(pb.GenerateRequest),
                response_serializer=pb.GenerateStreamResponse.SerializeToString),
            "GetModelInfo": unary(self.GetModelInfo, pb.GetModelInfoRequest, pb.ModelInfo),
            "Tokenize": unary(self.Tokenize, pb.TokenizeRequest, pb.TokenizeResponse),
        })
