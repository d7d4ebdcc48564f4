"""The edge: protobuf messages in, core dataclasses out, and back. Nothing else touches protobuf."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from attnserve.v1 import generation_pb2 as pb
from server import requests
from server.contract import ModelCard
from server.inspection import Inspection, InspectionJob, InspectionResult, inspection_job
from server.prompts import PromptCodec
from server.types import FinishReason, GenerationRequest, GenerationUpdate, RequestFields, ServedModel, TokenLogprob
from server.validation import Limits

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def input_fields(message) -> RequestFields:
    """The input (prompt, chat messages or token ids) of a GenerateRequest or TokenizeRequest."""
    kind = message.WhichOneof("input")
    if kind == "prompt":
        return RequestFields(prompt=message.prompt)
    if kind == "messages":
        return RequestFields(messages=tuple((m.role, m.content) for m in message.messages.messages))
    if kind == "prompt_token_ids":
        return RequestFields(prompt_token_ids=tuple(message.prompt_token_ids.ids))
    return RequestFields()


def request_fields(message: pb.GenerateRequest) -> RequestFields:
    sampling = message.sampling
    return dataclasses.replace(
        input_fields(message),
        max_new_tokens=message.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p if sampling.HasField("top_p") else None,
        repetition_penalty=sampling.repetition_penalty if sampling.HasField("repetition_penalty") else None,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(message.stop),
        logprobs=message.logprobs,
        request_id=message.request_id,
        ignore_eos=message.ignore_eos,
    )


def prompt_ids(message, codec: PromptCodec, limits: Limits) -> list[int]:
    """Token ids of a GenerateRequest's or TokenizeRequest's input, whichever form it takes."""
    return requests.prompt_ids(input_fields(message), codec, limits)


def request_from_proto(message: pb.GenerateRequest, codec: PromptCodec, limits: Limits,
                       time_remaining: Optional[float]) -> GenerationRequest:
    return requests.generation_request(request_fields(message), codec, limits, time_remaining)


def logprobs_to_proto(logprobs: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                        top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top])
        for lp in logprobs
    ]


def stream_response(request_id: str, update: GenerationUpdate) -> pb.GenerateStreamResponse:
    response = pb.GenerateStreamResponse(
        request_id=request_id, text=update.text, token_ids=update.token_ids,
        logprobs=logprobs_to_proto(update.logprobs),
    )
    if update.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[update.finish_reason]
        response.usage.CopyFrom(pb.Usage(prompt_tokens=update.prompt_tokens, completion_tokens=update.completion_tokens))
    return response


def unary_response(request_id: str, updates: list[GenerationUpdate]) -> pb.GenerateResponse:
    last = updates[-1]
    return pb.GenerateResponse(
        request_id=request_id,
        text="".join(u.text for u in updates),
        token_ids=[t for u in updates for t in u.token_ids],
        finish_reason=FINISH_REASONS[last.finish_reason],
        usage=pb.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens),
        logprobs=logprobs_to_proto(tuple(lp for u in updates for lp in u.logprobs)),
    )


def model_info(served: ServedModel, inspection: Optional[Inspection] = None,
               served_models: Sequence[str] = ()) -> pb.ModelInfo:
    info = pb.ModelInfo(**dataclasses.asdict(served), served_models=list(served_models) or [served.name])
    if inspection is not None:
        limits = inspection.limits
        info.MergeFrom(pb.ModelInfo(
            inspection_available=inspection.available, inspection_max_tokens=limits.max_tokens,
            inspection_max_generated_tokens=limits.max_generated_tokens, inspection_max_floats=limits.max_floats,
            inspection_max_queued=limits.max_queued))
    return info


def inspection_from_proto(message: pb.InspectAttentionRequest, codec: PromptCodec, limits: Limits,
                          inspection: Inspection) -> InspectionJob:
    ids = prompt_ids(message, codec, limits)
    return inspection_job(ids, list(message.layers), list(message.heads), message.generated_tokens,
                          inspection.card, inspection.limits, prompt_field=message.WhichOneof("input") or "prompt")


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ATTENTION_TAG = varint(pb.InspectAttentionResponse.DESCRIPTOR.fields_by_name["attention"].number << 3 | 2)


def inspection_response(result: InspectionResult, codec: PromptCodec, card: ModelCard) -> bytes:
    """The serialized InspectAttentionResponse. Built head by head: serializing one message of tens of MB would
    hold the GIL (and stall the engine thread and the event loop) for as long as it takes; concatenated messages
    are one message in protobuf's wire format, their repeated fields joined in order."""
    ids = list(result.token_ids)
    parts = [pb.InspectAttentionResponse(
        token_ids=ids, tokens=codec.token_strings(ids),
        token_texts=[codec.tokenizer.decode([i], skip_special_tokens=False) for i in ids],
        prompt_tokens=result.prompt_tokens, generated_tokens=result.generated_tokens,
        layers=card.n_layers, heads=card.n_heads, kv_heads=card.n_kv_heads,
    ).SerializeToString()]
    for h in result.heads:
        head = pb.HeadAttention(layer=h.layer, head=h.head, kv_head=h.kv_head,
                                probabilities=h.probabilities.astype("<f4", copy=False).tobytes(),
                                entropy=h.entropy.tolist()).SerializeToString()
        parts += [_ATTENTION_TAG, varint(len(head)), head]
    return b"".join(parts)


def tokenize_response(token_ids: list[int], tokens: list[str]) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(token_ids=token_ids, tokens=tokens)
