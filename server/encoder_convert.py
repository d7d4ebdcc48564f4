"""The edge for encoders and image classifiers: Embed and Classify messages to core types and back.

The decoder's messages are server/convert.py's; this module holds the rest, so that neither grows long.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from attnserve.v1 import generation_pb2 as pb
from server import contract, images
from server.encoders import BatchedModel
from server.convert import varint
from server.errors import InvalidRequestError
from server.images import ImageLimits
from server.types import EmbedResult


def _tag(message, field: str, wire_type: int) -> bytes:
    return varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | wire_type)


_LENGTH_DELIMITED, _VARINT = 2, 0
_VALUES = _tag(pb.Embedding, "values", _LENGTH_DELIMITED)  # repeated float: packed, little-endian float32
_TOKENS = _tag(pb.Embedding, "tokens", _VARINT)
_MODEL = _tag(pb.EmbedResponse, "model", _LENGTH_DELIMITED)
_EMBEDDINGS = _tag(pb.EmbedResponse, "embeddings", _LENGTH_DELIMITED)
_PROMPT_TOKENS = _tag(pb.EmbedResponse, "prompt_tokens", _VARINT)


def embed_response(model: str, result: EmbedResult) -> bytes:
    """The serialized EmbedResponse, written directly from the float32 rows. Through protobuf objects, 128 vectors
    of 384 floats take 2.5 ms of the event loop (a Python float each); as bytes, a small fraction of that."""
    name = model.encode()
    parts = [_MODEL, varint(len(name)), name]
    for vector, tokens in zip(result.vectors.astype("<f4", copy=False), result.token_counts):
        values = vector.tobytes()
        embedding = b"".join((_VALUES, varint(len(values)), values, _TOKENS, varint(tokens)))
        parts += [_EMBEDDINGS, varint(len(embedding)), embedding]
    parts += [_PROMPT_TOKENS, varint(sum(result.token_counts))]
    return b"".join(parts)


def images_from_proto(message: pb.ClassifyRequest, limits: ImageLimits) -> list[np.ndarray]:
    """Each Image to uint8 [H, W, C]. Decodes: call it off the event loop."""
    pixels = []
    for i, image in enumerate(message.images):
        field = f"images[{i}]"
        kind = image.WhichOneof("data")
        if kind == "encoded":
            pixels.append(images.decode(image.encoded, limits, f"{field}.encoded"))
        elif kind == "raw":
            raw = image.raw
            pixels.append(images.raw(raw.data, raw.height, raw.width, raw.channels, limits, f"{field}.raw"))
        else:
            raise InvalidRequestError(field, "is empty; set `encoded` (PNG or JPEG bytes) or `raw`")
    return pixels


def classify_response(model: str, labels: Sequence[str], probabilities: np.ndarray, top_k: int) -> pb.ClassifyResponse:
    """probabilities float32 [N, L]: per image its top_k labels (0 = all), most probable first."""
    k = min(top_k, len(labels)) if top_k else len(labels)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]  # [N, k]
    return pb.ClassifyResponse(model=model, results=[
        pb.Classification(labels=[pb.LabelProbability(label=labels[j], index=int(j), probability=float(row[j]))
                                  for j in indices])
        for row, indices in zip(probabilities, order)
    ])


def model_info(model: BatchedModel, served_models: Sequence[str], version: str,
               image_limits: ImageLimits) -> pb.ModelInfo:
    card, settings = model.card, model.settings
    info = pb.ModelInfo(
        name=model.name, kind=model.kind, dtype=card.dtype, execution_provider=model.provider, version=version,
        served_models=list(served_models), batch_window_ms=settings.window_seconds * 1000,
        max_batch=settings.max_batch, max_batch_tokens=settings.max_batch_tokens,
        max_queued_inputs=settings.max_queued_inputs, max_inputs_per_request=settings.max_inputs_per_request,
    )
    if model.kind == contract.KIND_ENCODER:
        info.MergeFrom(pb.ModelInfo(embedding_dim=card.embedding_dim, pooling=card.pooling,
                                    normalized=card.normalized, max_input_tokens=card.max_tokens))
    else:
        spec = model.graph.spec
        info.MergeFrom(pb.ModelInfo(labels=list(card.labels), image_height=spec.height, image_width=spec.width,
                                    image_channels=spec.channels, max_image_bytes=image_limits.max_bytes,
                                    max_image_pixels=image_limits.max_pixels))
    return info
