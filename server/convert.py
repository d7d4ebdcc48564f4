"""The edge: protobuf messages in, core dataclasses out, and back. Nothing else touches protobuf."""
from __future__ import annotations

import dataclasses
from typing import Optional

from attnserve.v1 import generation_pb2 as pb
from server import requests
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


def model_info(served: ServedModel) -> pb.ModelInfo:
    return pb.ModelInfo(**dataclasses.asdict(served))


def tokenize_response(token_ids: list[int], tokens: list[str]) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(token_ids=token_ids, tokens=tokens)
