"""`inference.GRPCInferenceService`, the Open Inference Protocol (KServe v2), on the gRPC port.

    ModelInfer / ModelStreamInfer ─► server/kserve_convert.py ─► RequestFields
        ─► server/requests.py generation_request (the native checks) ─► GenerationService.updates (the engine)

ModelStreamInfer is decoupled: each request read from the stream runs as its
own task, every chunk of tokens goes back as one ModelStreamInferResponse under
the request's `id`, and its last carries `triton_final_response` true. The
tasks put their responses on one bounded queue, so a client that does not read
makes them wait and the engine pauses its requests as it does for native
streams. A stream that ends early (the client cancels or leaves) cancels its
requests, which frees their KV slots.

Errors leave through two functions only, `_aborting` (a unary call ends with
the status server/errors.py assigns) and `_stream_error` (a stream's request
that fails is answered with `error_message` and the stream stays open, as
Triton does).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Callable

import grpc

from inference import grpc_service_pb2 as pb
from server import kserve_convert as convert
from server import requests
from server.errors import AttnserveError, InvalidRequestError, to_status
from server.service import (GenerationService, Undecodable, errors_to_status, merge_updates, safe_parser,
                            unary_handler)
from server.types import GenerationRequest

log = logging.getLogger("attnserve.kserve")
SERVICE_DESCRIPTOR = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE_DESCRIPTOR.full_name
PROTOCOL = "kserve"  # the `protocol` label of this front's requests in the metrics
STREAM_QUEUE_RESPONSES = 16  # responses a stream holds for a client that does not read, before its requests wait
_END = object()


def _decoded(message, kind: str):
    if isinstance(message, Undecodable):
        raise InvalidRequestError("request", f"is not a valid {kind} ({message.error})")
    return message


def _aborting(context: grpc.aio.ServicerContext):
    return errors_to_status(context, "KServe")


def _stream_error(error: BaseException, request_id: str) -> pb.ModelStreamInferResponse:
    if not isinstance(error, AttnserveError):
        log.exception("unexpected error in a KServe stream", exc_info=error)
    code, message = to_status(error)
    prefix = f"request {request_id[:100]}: " if request_id else ""
    return pb.ModelStreamInferResponse(error_message=f"{prefix}[{code.name}] {message}")


class InferenceService:
    def __init__(self, service: GenerationService, served_name: str, version: str, serving: Callable[[], bool]):
        self.service = service
        self.served_name = served_name
        self.version = version
        self._serving = serving  # what grpc health says: False while draining or broken

    def ready(self) -> bool:
        return self._serving() and self.service.engine.broken is None

    def _request(self, message, context) -> GenerationRequest:
        _decoded(message, "ModelInferRequest")
        convert.check_model(message.model_name, message.model_version, self.served_name)
        fields = convert.request_fields(message)
        self.service.engine.check_capacity(PROTOCOL)  # a burst must not pay to tokenize what it cannot run
        try:
            generation = requests.generation_request(fields, self.service.codec, self.service.limits,
                                                     context.time_remaining())
        except InvalidRequestError as e:
            raise convert.kserve_error(e) from None
        generation.protocol = PROTOCOL
        return generation

    # ---- health and metadata ----

    async def ServerLive(self, message, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, message, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, message, context) -> pb.ModelReadyResponse:
        async with _aborting(context):
            _decoded(message, "ModelReadyRequest")
            convert.check_model(message.name, message.version, self.served_name)
            return pb.ModelReadyResponse(ready=self.ready())

    async def ServerMetadata(self, message, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="attnserve", version=self.version)

    async def ModelMetadata(self, message, context) -> pb.ModelMetadataResponse:
        async with _aborting(context):
            _decoded(message, "ModelMetadataRequest")
            convert.check_model(message.name, message.version, self.served_name)
            return convert.model_metadata(self.served_name)

    # ---- inference ----

    async def ModelInfer(self, message, context) -> pb.ModelInferResponse:
        async with _aborting(context):
            request = self._request(message, context)
            async with contextlib.aclosing(self.service.updates(request)) as updates:
                merged = merge_updates([u async for u in updates])
            return convert.infer_response(self.served_name, message.id, merged)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        responses: asyncio.Queue = asyncio.Queue(STREAM_QUEUE_RESPONSES)
        answering: set[asyncio.Task] = set()

        async def read_requests() -> None:
            try:
                async for message in request_iterator:
                    task = asyncio.create_task(self._answer(message, context, responses))
                    answering.add(task)
                    task.add_done_callback(answering.discard)
                if answering:
                    await asyncio.wait(set(answering))  # the client sent its last request: finish them all
            except asyncio.CancelledError:
                raise  # the call is over: nobody reads the queue any more
            except Exception:
                await responses.put(_END)
                raise
            await responses.put(_END)

        reader = asyncio.create_task(read_requests())
        try:
            while (response := await responses.get()) is not _END:
                yield response
            await reader  # re-raises what ended the client's side of the call, if that failed
        finally:
            # The client cancelled or left, or the server stops: every request of this stream ends here.
            for task in (reader, *answering):
                task.cancel()

    async def _answer(self, message, context, responses: asyncio.Queue) -> None:
        """One request of a stream: its chunks, or the error that ended it, onto the stream's queue."""
        request_id = "" if isinstance(message, Undecodable) else message.id
        try:
            request = self._request(message, context)
            empty_final = convert.wants_empty_final_response(message)
            async with contextlib.aclosing(self.service.updates(request)) as updates:
                async for update in updates:
                    final = update.finished and not empty_final
                    await responses.put(pb.ModelStreamInferResponse(
                        infer_response=convert.infer_response(self.served_name, request_id, update, final)))
            if empty_final:
                await responses.put(pb.ModelStreamInferResponse(
                    infer_response=convert.empty_final_response(self.served_name, request_id)))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await responses.put(_stream_error(e, request_id))

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers whose parsers turn undecodable bytes into INVALID_ARGUMENT, not INTERNAL."""
        unary = unary_handler
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "ServerLive": unary(self.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(self.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(self.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(self.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": unary(self.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": unary(self.ModelInfer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.ModelStreamInfer, request_deserializer=safe_parser(pb.ModelInferRequest),
                response_serializer=pb.ModelStreamInferResponse.SerializeToString),
        })
