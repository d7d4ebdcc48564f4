"""The OpenAI edge: JSON bodies in, RequestFields out, and updates back as OpenAI's JSON.

Pure functions, no I/O. A body becomes the same RequestFields a gRPC request
does (server/convert.py), so server/requests.py and server/validation.py
check both APIs with the same code. Only what the wire format decides (a
field's JSON type, a negative where gRPC's field is unsigned, a seed beyond
64 bits) and OpenAI fields without a gRPC counterpart are checked here.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from server.errors import InvalidRequestError
from server.http_errors import ModelNotFoundError
from server.types import EmbedResult, FinishReason, GenerationUpdate, RequestFields, TokenLogprob

# Every field the HTTP API reads; any other is ignored (docs/openai.md lists them too).
COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
                     "stream_options", "logprobs", "presence_penalty", "frequency_penalty", "top_k",
                     "repetition_penalty", "ignore_eos", "timeout")
CHAT_FIELDS = tuple(f for f in COMPLETION_FIELDS if f != "prompt") + ("messages", "max_completion_tokens",
                                                                       "top_logprobs")
UNSUPPORTED_UNLESS_ZERO = ("presence_penalty", "frequency_penalty")
OPENAI_DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; gRPC's is 0 (greedy)

FINISH_REASONS = {
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
    FinishReason.LENGTH: "length",
    # Cut short by the deadline or a shutdown: OpenAI has no such reason, and "length" says "truncated".
    FinishReason.CANCELLED: "length",
}


@dataclass(frozen=True)
class Options:
    """What shapes the response rather than the generation."""

    chat: bool
    model: str
    stream: bool = False
    include_usage: bool = False
    logprobs: Optional[int] = None  # top-n alternatives to report per token; None = no logprobs at all
    aliases: tuple[tuple[str, str], ...] = ()  # gRPC field name -> the OpenAI one this request used
    timeout: Optional[float] = None  # seconds from arrival after which the request ends with 504; None = none

    @property
    def field_names(self) -> dict[str, str]:
        return dict(self.aliases)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequestError("body", f"is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    return body


# ---- JSON types: what protobuf's own types check for gRPC ----------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool))


def _typed(body: dict, name: str, check: Callable, kind: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise InvalidRequestError(name, f"must be {kind}, got {json.dumps(value)[:60]}")
    return value


def _int(body: dict, name: str, minimum: int, default=None):
    value = _typed(body, name, _is_int, "an integer", default)
    if value is not None and value < minimum:
        raise InvalidRequestError(name, f"must be >= {minimum}, got {value}")
    return value


def _number(body: dict, name: str, default=None):
    return _typed(body, name, _is_number, "a number", default)


def _bool(body: dict, name: str, default=False) -> bool:
    return _typed(body, name, lambda v: isinstance(v, bool), "true or false", default)


UINT64_END = 2 ** 64  # seeds are 64-bit, as on the gRPC API


# ---- requests ----------------------------------------------------------------------------------

def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequestError("stop", "must be a string, a list of strings or null")
    return stops


def _token_ids(value) -> Optional[list[int]]:
    """A list of ints as token ids, or None if `value` is not one."""
    if isinstance(value, list) and all(_is_int(t) for t in value):
        return value
    return None


def _prompt(prompt) -> RequestFields:
    """A completions `prompt`: text, token ids, or a batch of exactly one of either."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise InvalidRequestError("prompt", f"holds {len(prompt)} prompts; send one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return RequestFields(prompt=prompt)
    ids = _token_ids(prompt)
    if ids is None:
        raise InvalidRequestError("prompt", "must be a string or a list of token ids")
    return RequestFields(prompt_token_ids=tuple(ids))  # an empty list is still token ids: "is empty"


def _message_content(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidRequestError(f"messages[{i}].content", "only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequestError(f"messages[{i}].content", "must be a string or a list of text parts")


def _messages(messages) -> RequestFields:
    if not isinstance(messages, list):
        raise InvalidRequestError("messages", "must be a list of {role, content} objects")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError(f"messages[{i}]", "must be an object with a string `role`")
        chat.append((m["role"], _message_content(m.get("content"), i)))
    return RequestFields(messages=tuple(chat))


def to_request_fields(body: dict, chat: bool, served_name: str) -> tuple[RequestFields, Options]:
    """An OpenAI completions (chat=False) or chat completions body as RequestFields and response options."""
    model = _typed(body, "model", lambda v: isinstance(v, str), "a string", served_name)
    if model != served_name:
        raise ModelNotFoundError(model, served_name)
    n = _int(body, "n", 1, 1)
    if n != 1:
        raise InvalidRequestError("n", f"must be 1 (one choice per request), got {n}")
    for name in UNSUPPORTED_UNLESS_ZERO:
        if _number(body, name, 0) != 0:
            raise InvalidRequestError(name, "is not supported; leave it out or send 0 (repetition_penalty is)")

    aliases = {"prompt_token_ids": "prompt"}
    if chat:
        if "messages" not in body:
            raise InvalidRequestError("messages", "is missing")
        fields = _messages(body["messages"])
    else:
        if "prompt" not in body:
            raise InvalidRequestError("prompt", "is missing")
        fields = _prompt(body["prompt"])

    limit_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    aliases["max_new_tokens"] = limit_name
    top_k = _int(body, "top_k", -1, 0)
    seed = _int(body, "seed", 0)
    if seed is not None and seed >= UINT64_END:
        raise InvalidRequestError("seed", f"{seed} is out of range: seeds are 64-bit")

    if chat:
        aliases["logprobs"] = "top_logprobs"
        top = _int(body, "top_logprobs", 0)
        if top is not None and not _bool(body, "logprobs"):
            raise InvalidRequestError("top_logprobs", "needs `logprobs: true`")
        logprobs = (top or 0) if _bool(body, "logprobs") else None
    else:
        logprobs = _int(body, "logprobs", 0)

    fields = dataclasses.replace(
        fields,
        max_new_tokens=_int(body, limit_name, 1) or 0,  # unset: 0, the server's --default-max-new-tokens
        temperature=_number(body, "temperature", OPENAI_DEFAULT_TEMPERATURE),
        top_p=_number(body, "top_p"),
        repetition_penalty=_number(body, "repetition_penalty"),
        top_k=0 if top_k == -1 else top_k,  # -1: "no limit", as vLLM spells it
        seed=seed,
        stop=tuple(_stop(body)),
        ignore_eos=_bool(body, "ignore_eos"),
        # The engine reports the chosen token's logprob only beside at least one alternative.
        logprobs=max(logprobs, 1) if logprobs is not None else 0,
    )
    stream = _bool(body, "stream")
    timeout = timeout_seconds(_number(body, "timeout"), "timeout")
    stream_options = _typed(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = stream and _bool(stream_options, "include_usage")
    return fields, Options(chat=chat, model=served_name, stream=stream, include_usage=include_usage,
                           logprobs=logprobs, aliases=tuple(aliases.items()), timeout=timeout)


def timeout_seconds(value, name: str) -> Optional[float]:
    """A client's deadline in seconds (the body's `timeout` or the X-Request-Timeout header): positive, finite."""
    if value is None:
        return None
    if not (math.isfinite(value) and value > 0):
        raise InvalidRequestError(name, f"must be a number of seconds > 0, got {value}")
    return float(value)


def header_timeout(header: Optional[str]) -> Optional[float]:
    if header is None:
        return None
    try:
        value = float(header)
    except ValueError:
        raise InvalidRequestError("X-Request-Timeout", f"must be a number of seconds, got {header[:40]!r}") from None
    return timeout_seconds(value, "X-Request-Timeout")


def tokenize_fields(body: dict, served_name: str) -> RequestFields:
    """A /tokenize body (vLLM's shape): `prompt` as for completions, or chat `messages`."""
    model = _typed(body, "model", lambda v: isinstance(v, str), "a string", served_name)
    if model != served_name:
        raise ModelNotFoundError(model, served_name)
    if "messages" in body:
        return _messages(body["messages"])
    if "prompt" not in body:
        raise InvalidRequestError("prompt", "is missing; send `prompt` or `messages`")
    return _prompt(body["prompt"])


def detokenize_ids(body: dict) -> list[int]:
    """The token ids of a /detokenize body; their range is checked with the gRPC API's own check."""
    ids = _token_ids(body.get("tokens"))
    if ids is None:
        raise InvalidRequestError("tokens", "must be a list of token ids")
    return ids


# ---- responses ---------------------------------------------------------------------------------

def finish_reason(update: GenerationUpdate) -> Optional[str]:
    return FINISH_REASONS[update.finish_reason] if update.finish_reason is not None else None


def usage(update: GenerationUpdate) -> dict:
    return {"prompt_tokens": update.prompt_tokens, "completion_tokens": update.completion_tokens,
            "total_tokens": update.prompt_tokens + update.completion_tokens}


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else -9999.0  # JSON has no -Infinity


def chat_logprobs(logprobs: tuple[TokenLogprob, ...], top_n: int, token_text: Callable[[int], str]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, p) for t, p in lp.top[:top_n]]} for lp in logprobs],
            "refusal": None}


def completion_logprobs(logprobs: tuple[TokenLogprob, ...], top_n: int, token_text: Callable[[int], str],
                        offset: int = 0) -> dict:
    tokens = [token_text(lp.token_id) for lp in logprobs]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
            "top_logprobs": [{token_text(t): _finite(p) for t, p in lp.top[:top_n]} for lp in logprobs],
            "text_offset": offsets}


def _choice(options: Options, update: GenerationUpdate, token_text: Callable[[int], str], chunk: bool,
            offset: int = 0, first: bool = False) -> dict:
    logprobs = None
    if options.logprobs is not None:
        logprobs = (chat_logprobs(update.logprobs, options.logprobs, token_text) if options.chat else
                    completion_logprobs(update.logprobs, options.logprobs, token_text, offset))
    reason = finish_reason(update)
    if not options.chat:
        return {"index": 0, "text": update.text, "logprobs": logprobs, "finish_reason": reason}
    if chunk:
        delta = {"role": "assistant", "content": update.text} if first else {"content": update.text}
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    return {"index": 0, "message": {"role": "assistant", "content": update.text, "refusal": None},
            "logprobs": logprobs, "finish_reason": reason}


def response(response_id: str, created: int, options: Options, update: GenerationUpdate,
             token_text: Callable[[int], str]) -> dict:
    """The whole answer: `update` is every update of the request merged into one."""
    return {"id": response_id, "object": "chat.completion" if options.chat else "text_completion",
            "created": created, "model": options.model,
            "choices": [_choice(options, update, token_text, chunk=False)], "usage": usage(update)}


def chunk(response_id: str, created: int, options: Options, update: GenerationUpdate,
          token_text: Callable[[int], str], offset: int = 0, first: bool = False) -> dict:
    """One streamed update; the last one carries finish_reason."""
    body = {"id": response_id, "object": "chat.completion.chunk" if options.chat else "text_completion",
            "created": created, "model": options.model,
            "choices": [_choice(options, update, token_text, chunk=True, offset=offset, first=first)]}
    if options.include_usage:
        body["usage"] = None  # OpenAI's shape: null on every chunk but the usage one
    return body


def usage_chunk(response_id: str, created: int, options: Options, update: GenerationUpdate) -> dict:
    return {"id": response_id, "object": "chat.completion.chunk" if options.chat else "text_completion",
            "created": created, "model": options.model, "choices": [], "usage": usage(update)}


def models(served_name: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [model_card(served_name, created, max_model_len)]}


def model_card(served_name: str, created: int, max_model_len: int) -> dict:
    return {"id": served_name, "object": "model", "created": created, "owned_by": "attnserve",
            "max_model_len": max_model_len}


# ---- embeddings ---------------------------------------------------------------------------------

# The fields POST /v1/embeddings reads. `truncate` is attnserve's (as text-embeddings-inference has it): cut
# texts longer than the encoder reads instead of refusing them.
EMBEDDING_FIELDS = ("model", "input", "encoding_format", "dimensions", "user", "truncate")
ENCODING_FORMATS = ("float", "base64")  # base64: the float32 little-endian bytes, what the openai SDK asks for
_EMBEDDING_INPUT_NAMES = {"texts": "input"}  # server/encoders.py's name for what this API calls `input`


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str  # empty: the only encoder served
    texts: list[str]
    encoding_format: str
    truncate: bool
    dimensions: Optional[int]  # None: the model's own


def embedding_request(body: dict) -> EmbeddingRequest:
    """What a POST /v1/embeddings body asks for; counts and lengths are the encoder's to check."""
    model = body.get("model", "")
    if not isinstance(model, str):
        raise InvalidRequestError("model", f"must be a string (an encoder's name), got {json.dumps(model)[:60]}")
    inputs = body.get("input")
    if isinstance(inputs, str):
        texts = [inputs]
    elif isinstance(inputs, list) and all(isinstance(t, str) for t in inputs):
        texts = inputs
    elif isinstance(inputs, list) and (_token_ids(inputs) is not None or all(_token_ids(t) for t in inputs)):
        raise InvalidRequestError("input", "holds token ids; this server embeds text: send a string or a list of "
                                           "strings")
    else:
        raise InvalidRequestError("input", f"must be a string or a list of strings, got {json.dumps(inputs)[:60]}")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise InvalidRequestError("encoding_format", f"is {json.dumps(encoding_format)[:40]}; it must be "
                                                     f"{' or '.join(ENCODING_FORMATS)}")
    return EmbeddingRequest(model, texts, encoding_format, _bool(body, "truncate"), _int(body, "dimensions", 1))


def check_dimensions(wanted: EmbeddingRequest, embedding_dim: int) -> None:
    """The encoder's vectors have one size: `dimensions` may only repeat it (there is no shortening them)."""
    if wanted.dimensions is not None and wanted.dimensions != embedding_dim:
        raise InvalidRequestError("dimensions", f"is {wanted.dimensions}; model {wanted.model or 'served'}'s "
                                                f"embeddings have {embedding_dim} dimensions, the only size it makes")


def embedding_error(error: InvalidRequestError) -> InvalidRequestError:
    """An encoder's own check in this API's names: `texts[2]` -> `input[2]`, `texts` -> `input`."""
    head, bracket, rest = error.field.partition("[")
    if head not in _EMBEDDING_INPUT_NAMES:
        return error
    return InvalidRequestError(_EMBEDDING_INPUT_NAMES[head] + bracket + rest, str(error)[len(error.field) + 2:])


def embedding_response(model: str, result: EmbedResult, encoding_format: str) -> dict:
    """OpenAI's embedding list; `usage.prompt_tokens` counts the encoder's tokens, special tokens included."""
    def encoded(vector: np.ndarray):
        if encoding_format == "base64":
            return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
        return vector.tolist()

    tokens = int(sum(result.token_counts))
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(vector)}
                     for i, vector in enumerate(result.vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
