"""Request limits and the checks that enforce them. Every message names the field and the limit."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from server.errors import InvalidRequestError
from server.types import SamplingParams


@dataclass(frozen=True)
class Limits:
    context: int  # min(model context, tokens per KV slot): prompt + max_new_tokens must fit
    vocab_size: int
    default_max_new_tokens: int
    max_new_tokens_limit: int
    max_stop_strings: int
    max_stop_string_length: int
    max_logprobs: int
    # Prompt text longer than this cannot fit in the context, and is refused before it is tokenized:
    # tokenizing megabytes takes seconds and holds the GIL, stalling every stream. 0 = no limit.
    max_prompt_chars: int = 0
    max_request_id_chars: int = 256  # the id is echoed in every stream message


def prompt_text(text: str, limits: Limits, field: str) -> str:
    if limits.max_prompt_chars and len(text) > limits.max_prompt_chars:
        raise InvalidRequestError(
            field, f"is {len(text)} characters; no text over {limits.max_prompt_chars} characters fits in the "
                   f"context of {limits.context} tokens")
    return text


def request_id(value: str, limits: Limits) -> str:
    if len(value) > limits.max_request_id_chars:
        raise InvalidRequestError("request_id", f"is {len(value)} characters; at most {limits.max_request_id_chars} are allowed")
    return value


def _finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise InvalidRequestError(field, f"must be a finite number, got {value}")
    return value


def sampling_params(temperature: float, top_k: int, top_p: Optional[float], repetition_penalty: Optional[float],
                    seed: Optional[int]) -> SamplingParams:
    if _finite("sampling.temperature", temperature) < 0:
        raise InvalidRequestError("sampling.temperature", f"must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise InvalidRequestError("sampling.top_k", f"must be >= 0 (0 = no limit), got {top_k}")
    top_p = 1.0 if top_p is None else _finite("sampling.top_p", top_p)
    if not 0 < top_p <= 1:
        raise InvalidRequestError("sampling.top_p", f"must be in (0, 1], got {top_p}")
    penalty = 1.0 if repetition_penalty is None else _finite("sampling.repetition_penalty", repetition_penalty)
    if penalty <= 0:
        raise InvalidRequestError("sampling.repetition_penalty", f"must be > 0 (1 = none), got {penalty}")
    return SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                          repetition_penalty=float(penalty), seed=seed)


def max_new_tokens(requested: int, prompt_tokens: int, limits: Limits) -> int:
    value = requested or limits.default_max_new_tokens
    if value > limits.max_new_tokens_limit:
        raise InvalidRequestError("max_new_tokens", f"{value} is above this server's limit of {limits.max_new_tokens_limit}")
    if prompt_tokens + value > limits.context:
        raise InvalidRequestError(
            "max_new_tokens",
            f"the prompt's {prompt_tokens} tokens plus max_new_tokens {value} exceed the context of "
            f"{limits.context} tokens; shorten the prompt or ask for at most {max(limits.context - prompt_tokens, 0)}",
        )
    return value


def prompt_token_ids(ids: Sequence[int], limits: Limits, field: str = "prompt") -> list[int]:
    if not ids:
        raise InvalidRequestError(field, "is empty; send at least one token of prompt")
    if len(ids) >= limits.context:
        raise InvalidRequestError(field, f"is {len(ids)} tokens; the context holds {limits.context} including the answer")
    bad = next((i for i in ids if not 0 <= i < limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(field, f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    return list(ids)


def stop_strings(stops: Sequence[str], limits: Limits) -> tuple[str, ...]:
    if len(stops) > limits.max_stop_strings:
        raise InvalidRequestError("stop", f"{len(stops)} stop strings; at most {limits.max_stop_strings} are allowed")
    for i, stop in enumerate(stops):
        if not stop:
            raise InvalidRequestError(f"stop[{i}]", "is empty")
        if len(stop) > limits.max_stop_string_length:
            raise InvalidRequestError(
                f"stop[{i}]", f"is {len(stop)} characters; at most {limits.max_stop_string_length} are allowed"
            )
    return tuple(stops)


def logprobs(n: int, limits: Limits) -> int:
    if n > limits.max_logprobs:
        raise InvalidRequestError("logprobs", f"{n} is above the limit of {limits.max_logprobs}")
    return n
