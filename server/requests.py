"""From what a client asked for (RequestFields, any protocol) to a validated GenerationRequest.

Pure: no protobuf, no JSON, no I/O. The gRPC and HTTP edges fill in RequestFields from
their own wire formats; everything they have in common is checked here, with
server/validation.py's limits, so both APIs refuse the same requests with the same
messages (the HTTP edge renames the fields to OpenAI's).
"""
from __future__ import annotations

import time
import uuid
from typing import Optional

from server import validation
from server.errors import InvalidRequestError
from server.prompts import PromptCodec
from server.types import GenerationRequest, RequestFields
from server.validation import Limits


def prompt_ids(fields: RequestFields, codec: PromptCodec, limits: Limits) -> list[int]:
    """Token ids of the request's input, whichever form it takes."""
    if fields.prompt is not None:
        if not fields.prompt:
            raise InvalidRequestError("prompt", "is empty; send some text")
        prompt = validation.prompt_text(fields.prompt, limits, "prompt")
        return validation.prompt_token_ids(codec.encode_prompt(prompt), limits, "prompt")
    if fields.messages is not None:
        if len(fields.messages) > limits.context:  # a chat template frames each message in tokens
            raise InvalidRequestError("messages", f"{len(fields.messages)} messages cannot fit in the "
                                                  f"context of {limits.context} tokens")
        validation.prompt_text("".join(content for _, content in fields.messages), limits, "messages")
        return validation.prompt_token_ids(codec.encode_chat(list(fields.messages), limits.max_prompt_chars),
                                           limits, "messages")
    if fields.prompt_token_ids is not None:
        return validation.prompt_token_ids(list(fields.prompt_token_ids), limits, "prompt_token_ids")
    raise InvalidRequestError("prompt", "is missing; set one of prompt, messages or prompt_token_ids")


def generation_request(fields: RequestFields, codec: PromptCodec, limits: Limits,
                       time_remaining: Optional[float]) -> GenerationRequest:
    ids = prompt_ids(fields, codec, limits)
    params = validation.sampling_params(temperature=fields.temperature, top_k=fields.top_k, top_p=fields.top_p,
                                        repetition_penalty=fields.repetition_penalty, seed=fields.seed)
    return GenerationRequest(
        request_id=validation.request_id(fields.request_id, limits) or uuid.uuid4().hex,
        prompt_token_ids=ids,
        max_new_tokens=validation.max_new_tokens(fields.max_new_tokens, len(ids), limits),
        sampling=params,
        stop=validation.stop_strings(list(fields.stop), limits),
        logprobs=validation.logprobs(fields.logprobs, limits),
        deadline=time.monotonic() + time_remaining if time_remaining is not None else None,
        ignore_eos=fields.ignore_eos,
    )
