"""`inference.GRPCInferenceService`, the Open Inference Protocol (KServe v2), on the gRPC port.

    ModelInfer / ModelStreamInfer ─► server/kserve_convert.py ─► RequestFields
        ─► server/requests.py generation_request (the native checks) ─► GenerationService.updates (the engine)
                                 └─► EmbedInputs / ClassifyInputs ─► BatchedModel.embed / classify
                                     (encoders and image classifiers, by the request's model_name)

Every model the server serves is a KServe model of its own name: the decoder
(its --served-model-name), each encoder and each image classifier, with its own
tensors in ModelMetadata (server/kserve_convert.py says which).

ModelStreamInfer is decoupled: each request read from the stream runs as its
own task, every chunk of tokens goes back as one ModelStreamInferResponse under
the request's `id`, and its last carries `triton_final_response` true (an
encoder's or classifier's answer is a single response, final at once). The
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
from typing import AsyncIterator, Callable, Optional

import grpc

from inference import grpc_service_pb2 as pb
from server import images
from server import kserve_convert as convert
from server import requests
from server.contract import KIND_ENCODER
from server.encoders import BatchedModel
from server.errors import AttnserveError, InvalidRequestError, to_status
from server.models import ServedModels
from server.service import (GenerationService, Undecodable, decoded, errors_to_status, merge_updates,
                            safe_parser, unary_handler)
from server.types import GenerationRequest

log = logging.getLogger("attnserve.kserve")
SERVICE_DESCRIPTOR = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE_DESCRIPTOR.full_name
PROTOCOL = "kserve"  # the `protocol` label of this front's requests in the metrics
STREAM_QUEUE_RESPONSES = 16  # responses a stream holds for a client that does not read, before its requests wait
_END = object()


def _aborting(context: grpc.aio.ServicerContext):
    return errors_to_status(context, "KServe")


def _stream_error(error: BaseException, request_id: str) -> pb.ModelStreamInferResponse:
    if not isinstance(error, AttnserveError):
        log.exception("unexpected error in a KServe stream", exc_info=error)
    code, message = to_status(error)
    prefix = f"request {request_id[:100]}: " if request_id else ""
    return pb.ModelStreamInferResponse(error_message=f"{prefix}[{code.name}] {message}")


def _decode_all(encoded: list[bytes], limits: images.ImageLimits) -> list:
    """IMAGE's PNG or JPEG files to uint8 [H, W, C] arrays; a bad one is named by its index."""
    return [images.decode(data, limits, f"{convert.IMAGE}[{i}]") for i, data in enumerate(encoded)]


class InferenceService:
    """`service` answers the decoder's requests under `served_name`; `models` holds every model served (by
    default the service's registry), the batched ones answered by their own batch threads."""

    def __init__(self, service: GenerationService, served_name: str, version: str, serving: Callable[[], bool],
                 models: Optional[ServedModels] = None):
        self.service = service
        self.served_name = served_name
        self.version = version
        self._serving = serving  # what grpc health says: False while draining or broken
        self.models = models if models is not None else service.models
        self.has_decoder = self.models.decoder is not None
        # The names a client may ask for: the decoder's as it is served, then the batched models'.
        self.names = ([served_name] if self.has_decoder else []) + list(self.models.batched)

    def ready(self) -> bool:
        return self._serving() and (not self.has_decoder or self.service.engine.broken is None)

    def _batched(self, name: str, version: str) -> Optional[BatchedModel]:
        """The encoder or classifier a request names; None for the decoder; NOT_FOUND for any other name."""
        convert.check_model(name, version, self.names)
        return None if self.has_decoder and name == self.served_name else self.models.batched[name]

    def _request(self, message, context) -> GenerationRequest:
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
            decoded(message, "ModelReadyRequest")
            batched = self._batched(message.name, message.version)
            return pb.ModelReadyResponse(ready=self._serving() if batched is not None else self.ready())

    async def ServerMetadata(self, message, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="attnserve", version=self.version)

    async def ModelMetadata(self, message, context) -> pb.ModelMetadataResponse:
        async with _aborting(context):
            decoded(message, "ModelMetadataRequest")
            batched = self._batched(message.name, message.version)
            if batched is None:
                return convert.model_metadata(self.served_name)
            if batched.kind == KIND_ENCODER:
                return convert.encoder_metadata(batched.name, batched.card.embedding_dim)
            return convert.classifier_metadata(batched.name, len(batched.card.labels))

    async def RepositoryIndex(self, message, context) -> pb.RepositoryIndexResponse:
        async with _aborting(context):
            decoded(message, "RepositoryIndexRequest")
            names = list(self.names)
            ready = {name: self.ready() if self.has_decoder and name == self.served_name else self._serving()
                     for name in names}
            return convert.repository_index(names, ready, only_ready=message.ready)

    # ---- inference ----

    async def ModelInfer(self, message, context) -> pb.ModelInferResponse:
        async with _aborting(context):
            decoded(message, "ModelInferRequest")
            batched = self._batched(message.model_name, message.model_version)
            if batched is not None:
                return await self._infer_batched(batched, message)
            request = self._request(message, context)
            async with contextlib.aclosing(self.service.updates(request)) as updates:
                merged = merge_updates([u async for u in updates])
            return convert.infer_response(self.served_name, message.id, merged)

    async def _infer_batched(self, model: BatchedModel, message) -> pb.ModelInferResponse:
        """An encoder's embeddings or a classifier's probabilities, the model's own checks named as KServe names."""
        try:
            if model.kind == KIND_ENCODER:
                return await self._embed(model, message)
            return await self._classify(model, message)
        except InvalidRequestError as e:
            raise convert.batched_error(e) from None

    async def _embed(self, model: BatchedModel, message) -> pb.ModelInferResponse:
        texts = convert.embed_inputs(message, model.settings.max_inputs_per_request)
        result = await model.embed(texts.texts, texts.truncate, PROTOCOL)
        return convert.embed_response(model.name, message.id, result.vectors, result.token_counts, texts.outputs)

    async def _classify(self, model: BatchedModel, message) -> pb.ModelInferResponse:
        limits = self.models.image_limits
        pictures = convert.classify_inputs(message, model.settings.max_inputs_per_request, limits.max_pixels)
        if pictures.encoded:
            probabilities = await model.classify_encoded(
                len(pictures.images), lambda: _decode_all(pictures.images, limits), PROTOCOL)
        else:  # raw PIXELS, already uint8 arrays
            probabilities = await model.classify(pictures.images, PROTOCOL)
        return convert.classify_response(model.name, message.id, probabilities, model.card.labels, pictures.outputs)

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
            decoded(message, "ModelInferRequest")
            empty_final = convert.wants_empty_final_response(message)
            batched = self._batched(message.model_name, message.model_version)
            if batched is not None:
                response = await self._infer_batched(batched, message)
                response.parameters[convert.FINAL_RESPONSE].bool_param = not empty_final
                await responses.put(pb.ModelStreamInferResponse(infer_response=response))
            else:
                request = self._request(message, context)
                async with contextlib.aclosing(self.service.updates(request)) as updates:
                    async for update in updates:
                        final = update.finished and not empty_final
                        await responses.put(pb.ModelStreamInferResponse(
                            infer_response=convert.infer_response(self.served_name, request_id, update, final)))
            if empty_final:
                await responses.put(pb.ModelStreamInferResponse(
                    infer_response=convert.empty_final_response(message.model_name, request_id)))
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
            "RepositoryIndex": unary(self.RepositoryIndex, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.ModelStreamInfer, request_deserializer=safe_parser(pb.ModelInferRequest),
                response_serializer=pb.ModelStreamInferResponse.SerializeToString),
        })
