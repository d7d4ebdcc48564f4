"""The one place where exceptions become OpenAI-shaped HTTP errors.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

The exceptions are the gRPC API's own (server/errors.py) plus the two only
HTTP has (a wrong model name, a missing route). Field names in messages are
the OpenAI request's, not the protobuf's: the checks are shared, their
wording is translated here.
"""
from __future__ import annotations

import json
from typing import Optional

from server.errors import (AttnserveError, DeadlineExceededError, InvalidRequestError, NotFoundError, QueueFullError,
                           RequestTooLargeError, ServerDrainingError, UnauthenticatedError)


class ModelNotFoundError(NotFoundError):
    def __init__(self, model: str, served: str):
        super().__init__(f"The model `{model[:100]}` does not exist; this server serves `{served}`")


class RouteNotFoundError(AttnserveError):
    pass


# The gRPC request's field names, as server/validation.py reports them, and the OpenAI request's.
# `max_new_tokens` and `logprobs` depend on the route and on which field the client sent.
_FIELDS = {
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.repetition_penalty": "repetition_penalty",
    "prompt_token_ids": "prompt",
}


def openai_field(field: str, aliases: Optional[dict[str, str]] = None) -> str:
    """The OpenAI name of a gRPC field name (`sampling.temperature` -> `temperature`, `stop[1]` -> `stop`)."""
    if field.startswith("stop["):
        return "stop"
    return (aliases or {}).get(field) or _FIELDS.get(field, field)


def translate(error: InvalidRequestError, aliases: Optional[dict[str, str]] = None) -> InvalidRequestError:
    """The same error with the OpenAI field name in its `field` and its message."""
    name = openai_field(error.field, aliases)
    problem = str(error)[len(error.field) + 2:]  # InvalidRequestError's text is "field: problem"
    for grpc_name, http_name in {**_FIELDS, **(aliases or {})}.items():
        problem = problem.replace(grpc_name, http_name)
    return InvalidRequestError(name, problem)


# (exception type, HTTP status, OpenAI error type, error code), most specific first: the one place where
# engine outcomes become HTTP answers. Anything else is a bug: 500, without a traceback.
_STATUS = (
    (InvalidRequestError, 400, "invalid_request_error", None),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (NotFoundError, 404, "invalid_request_error", "model_not_found"),  # a name the model registry does not know
    (RouteNotFoundError, 404, "invalid_request_error", "not_found"),
    (UnauthenticatedError, 401, "invalid_request_error", "invalid_api_key"),
    (RequestTooLargeError, 413, "invalid_request_error", "request_too_large"),
    (QueueFullError, 429, "rate_limit_error", "rate_limit_exceeded"),
    (ServerDrainingError, 503, "server_error", "server_unavailable"),
    (DeadlineExceededError, 504, "server_error", "timeout"),
    (AttnserveError, 500, "server_error", None),
)


def classify(error: BaseException) -> tuple[int, str, Optional[str], str]:
    """(HTTP status, OpenAI error type, error code, message) of any exception; never a traceback."""
    for kind, status, error_type, code in _STATUS:
        if isinstance(error, kind):
            return status, error_type, code, str(error)
    return 500, "server_error", None, f"internal error ({type(error).__name__}); see the server log"


def error_body(error: BaseException) -> tuple[int, dict, bytes]:
    """(status, extra headers, JSON body) for an error response."""
    status, kind, code, message = classify(error)
    param = error.field if isinstance(error, InvalidRequestError) else None
    headers = {"Retry-After": "1"} if status in (429, 503) else {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="attnserve"'
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return status, headers, json.dumps(body).encode()
