"""Core types of the engine. Protobuf messages exist only at the edge (server/convert.py)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from server.contract import KIND_DECODER


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached, or the slot's capacity
    STOP = "stop"  # a stop string matched
    EOS = "eos"  # the model emitted an end-of-sequence token
    CANCELLED = "cancelled"  # client cancelled, deadline passed, or the server is stopping


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    repetition_penalty: float = 1.0  # 1 = none; >1 discourages tokens already in prompt or output
    seed: Optional[int] = None  # None = a random seed chosen by the server

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class RequestFields:
    """A generation request as a client stated it, before validation: what each protocol's edge fills in
    (server/convert.py for gRPC, server/openai_convert.py for HTTP) and server/requests.py checks, once for all.

    Exactly one of prompt, messages and prompt_token_ids is the input (None: not given); None elsewhere means
    "not set, take the default"."""

    prompt: Optional[str] = None
    messages: Optional[tuple[tuple[str, str], ...]] = None  # (role, content)
    prompt_token_ids: Optional[tuple[int, ...]] = None
    max_new_tokens: int = 0  # 0 = the server's default
    temperature: float = 0.0
    top_k: int = 0
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    request_id: str = ""
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    """A validated request, as the engine sees it: token ids in, token ids out."""

    request_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    logprobs: int = 0  # top-n alternatives to report per generated token; 0 = none
    deadline: Optional[float] = None  # time.monotonic() after which the request is cancelled
    ignore_eos: bool = False  # generate past end-of-sequence tokens (benchmarks want fixed lengths)
    # The front the request came through ("grpc", "http", ...): each front sets its own, and the metrics
    # label what the engine reports about the request with it. A free string: a new front needs no change here.
    protocol: str = "grpc"


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob) of the top-n alternatives


@dataclass(frozen=True)
class GenerationUpdate:
    """What the engine sends to a request's stream: new tokens and text, and at the end, why it finished."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: Optional[FinishReason] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[BaseException] = None  # set when the engine failed this request

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True)
class ServedModel:
    """What GetModelInfo reports: the model served and the limits this server enforces on it."""

    name: str
    architecture: str
    dtype: str
    execution_provider: str
    vocab_size: int
    max_positions: int  # the model's own context
    max_seq_len: int  # tokens per KV slot here: prompt + generated
    kv_slots: int
    max_new_tokens_limit: int
    has_chat_template: bool
    max_stop_strings: int
    max_stop_string_length: int
    max_logprobs: int
    version: str  # attnserve's
    kind: str = KIND_DECODER


@dataclass(frozen=True)
class EmbedResult:
    """An encoder's answer to one call: a vector per text, in the order of the texts."""

    vectors: np.ndarray  # float32 [N, D]
    token_counts: list[int]  # tokens each text became, special tokens included, after any truncation
