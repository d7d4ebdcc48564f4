"""Every error a client can see, and the one place that maps them to gRPC status codes.

Handlers raise these (or let the engine report them); server/service.py turns
any exception into a status with `to_status`, so no request ever ends in
UNKNOWN or with a Python traceback.
"""
from __future__ import annotations

import grpc


class AttnserveError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidRequestError(AttnserveError):
    """Bad input. The message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFoundError(AttnserveError):
    """A model name this server does not serve; the message lists the names it serves."""

    code = grpc.StatusCode.NOT_FOUND


class RequestTooLargeError(AttnserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QueueFullError(AttnserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ServerDrainingError(AttnserveError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(AttnserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPreconditionError(AttnserveError):
    """The model dir cannot answer this call (a graph it lacks); the message says how to re-export it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnauthenticatedError(AttnserveError):
    """No API key, or a wrong one. The message never repeats the key."""

    code = grpc.StatusCode.UNAUTHENTICATED


class EngineStepError(AttnserveError):
    """An engine step failed; only the requests in that step see it."""

    code = grpc.StatusCode.INTERNAL


def to_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, AttnserveError):
        return error.code, str(error)
    # Anything else is a bug in attnserve: say so, without leaking a traceback to the client.
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"
