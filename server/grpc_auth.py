"""The gRPC API-key check: one interceptor, before any handler runs and before any request is parsed.

    call ──► metrics interceptor ──► ApiKeyInterceptor ──accepted──► handler (parse, validate, queue)
                 (counts the code)        │
                                          └─missing/wrong──► UNAUTHENTICATED (server/errors.py), nothing parsed

Services named in `open_services` (by default health and reflection, so that
probes and grpcurl's describe keep working) skip the check.
"""
from __future__ import annotations

from typing import Callable

import grpc

from server.api_keys import ACCEPTED, MISSING, ApiKeys
from server.errors import UnauthenticatedError, to_status

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")


def _refusal(outcome: str) -> UnauthenticatedError:
    if outcome == MISSING:
        return UnauthenticatedError("this server requires an API key: send the metadata `authorization: Bearer KEY`")
    return UnauthenticatedError("the API key is not valid")


def _refusing_handler(handler: grpc.RpcMethodHandler, error: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that reads nothing and ends the call with `error`'s status."""
    code, message = to_status(error)

    async def refuse(request, context):
        await context.abort(code, message)

    async def refuse_stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover (abort raises): makes this an async generator, as a streaming handler is

    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    # No deserializer: the request bytes are never parsed.
    return factory(refuse_stream if handler.response_streaming else refuse)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys, open_services: frozenset[str], on_checked: Callable[[str], None]):
        self.keys = keys
        self.open_services = open_services
        self.on_checked = on_checked  # told each outcome (accepted, missing, wrong): metrics count them

    async def intercept_service(self, continuation, handler_call_details):
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        if service in self.open_services:
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        authorization = next((value for key, value in metadata if key == "authorization"), None)
        outcome = self.keys.check(authorization)
        self.on_checked(outcome)
        handler = await continuation(handler_call_details)
        if outcome == ACCEPTED or handler is None:
            return handler
        return _refusing_handler(handler, _refusal(outcome))
