"""The OpenAI-compatible HTTP API: aiohttp on the same event loop as grpc.aio, the same engine path.

    POST /v1/completions, /v1/chat/completions ─► server/openai_convert.py ─► RequestFields
        ─► server/requests.py generation_request (the gRPC API's checks) ─► GenerationService.updates
    POST /v1/embeddings ─► server/openai_convert.py ─► an encoder's BatchedModel.embed (server/encoders.py)
    GET /v1/models, GET /health (open even with API keys: probes carry none)
    POST /tokenize, /detokenize: the gRPC Tokenize's counterparts, in vLLM's shape
    GET /metrics: the metrics port's registry again, for routers that scrape the port they route to
        (an InferencePool's endpoint picker); an API key only where the metrics port asks for one

Every error leaves through `_error_response` (server/http_errors.py decides
the status). A client that goes away cancels its request: aiohttp cancels the
handler, and closing the updates generator cancels it in the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from aiohttp import web

from server import openai_convert, requests, validation
from server.api_keys import ACCEPTED, MISSING, ApiKeys
from server.contract import KIND_ENCODER
from server.errors import AttnserveError, InvalidRequestError, NotFoundError, RequestTooLargeError, UnauthenticatedError
from server.http_errors import ModelNotFoundError, RouteNotFoundError, error_body, translate
from server.metrics import HTTP_ROUTES as ROUTES  # one list: the metrics create these series at zero
from server.service import GenerationService, merge_updates

log = logging.getLogger("attnserve.http")
PROTOCOL = "http"  # the `protocol` label of this front's requests in the metrics
TIMEOUT_HEADER = "X-Request-Timeout"  # seconds, like the body's `timeout`: the shorter one wins


@dataclass
class HttpSettings:
    served_name: str
    max_request_bytes: int
    serving: Callable[[], bool]  # what grpc health says: False while draining or broken
    keys: Optional[ApiKeys] = None
    on_api_key_checked: Callable[[str], None] = lambda outcome: None
    on_request: Callable[[str, int], None] = lambda route, status: None  # (route, HTTP status) per request
    exposition: Optional[Callable[[], tuple[bytes, str]]] = None  # /metrics (body, content type); None: no route
    metrics_key_check: Optional[Callable[[Optional[str]], str]] = None  # the metrics port's rule (security.py)


def _error_response(error: BaseException) -> web.Response:
    if not isinstance(error, AttnserveError):
        log.exception("unexpected error in an HTTP handler", exc_info=error)
    status, headers, body = error_body(error)
    return web.Response(status=status, headers=headers, body=body, content_type="application/json")


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


class HttpApi:
    def __init__(self, service: GenerationService, settings: HttpSettings):
        self.service = service
        self.settings = settings
        self.created = int(time.time())
        tokenizer = service.codec.tokenizer
        self._token_text = lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_request_bytes,
                              middlewares=[self._count, self._errors, self._auth])
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/health", self.health)
        if self.settings.exposition is not None:
            app.router.add_get("/metrics", self.metrics)
        return app

    # ---- middlewares, outermost first ----

    @web.middleware
    async def _count(self, request: web.Request, handler):
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        route = "/v1/models" if route.startswith("/v1/models") else route
        response = await handler(request)
        self.settings.on_request(route if route in ROUTES else "other", response.status)
        return response

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error_response(RequestTooLargeError(
                f"the request body is over --max-request-bytes {self.settings.max_request_bytes}"))
        except web.HTTPNotFound:
            return _error_response(RouteNotFoundError(f"no route {request.method} {request.path[:200]}"))
        except web.HTTPMethodNotAllowed as e:
            return _error_response(InvalidRequestError("method", f"{request.method} is not allowed on "
                                                                 f"{request.path[:200]}; use {', '.join(e.allowed_methods)}"))
        except web.HTTPClientError as e:  # aiohttp's own refusals of a malformed request
            return _error_response(InvalidRequestError("request", e.reason))
        except Exception as e:
            return _error_response(e)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        # Before the body is read: an unauthenticated client costs no parsing.
        keys = self.settings.keys
        guarded = request.path.startswith("/v1/") or request.path in ("/tokenize", "/detokenize")
        check = keys.check if keys is not None and guarded else None
        if request.path == "/metrics":
            check = self.settings.metrics_key_check
        if check is not None:
            outcome = check(request.headers.get("Authorization"))
            self.settings.on_api_key_checked(outcome)
            if outcome != ACCEPTED:
                raise UnauthenticatedError(
                    "this endpoint requires an API key: send the header `Authorization: Bearer KEY`"
                    if outcome == MISSING else "the API key is not valid")
        return await handler(request)

    # ---- routes ----

    async def health(self, request: web.Request) -> web.Response:
        serving = self.settings.serving() and self.service.engine.broken is None
        return web.json_response({"status": "serving" if serving else "not serving"}, status=200 if serving else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        # Rendered off the event loop: a scrape every 50 ms (an endpoint picker's default) must not hold up streams.
        body, content_type = await asyncio.get_running_loop().run_in_executor(None, self.settings.exposition)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def tokenize(self, request: web.Request) -> web.Response:
        fields = openai_convert.tokenize_fields(openai_convert.parse_body(await request.read()),
                                                self.settings.served_name)
        try:
            ids = requests.prompt_ids(fields, self.service.codec, self.service.limits)
        except InvalidRequestError as e:
            raise translate(e) from None
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": self.service.limits.context})

    async def detokenize(self, request: web.Request) -> web.Response:
        ids = openai_convert.detokenize_ids(openai_convert.parse_body(await request.read()))
        try:
            validation.prompt_token_ids(ids, self.service.limits, "tokens")
        except InvalidRequestError as e:
            raise translate(e) from None
        return web.json_response({"prompt": self.service.codec.tokenizer.decode(ids, skip_special_tokens=False)})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(openai_convert.models(self.settings.served_name, self.created,
                                                       self.service.limits.context))

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.settings.served_name:
            raise ModelNotFoundError(request.match_info["model"], self.settings.served_name)
        return web.json_response(openai_convert.model_card(self.settings.served_name, self.created,
                                                           self.service.limits.context))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def embeddings(self, request: web.Request) -> web.Response:
        wanted = openai_convert.embedding_request(openai_convert.parse_body(await request.read()))
        models = self.service.models
        try:
            model = models.resolve(wanted.model, KIND_ENCODER)
        except NotFoundError:
            raise ModelNotFoundError(wanted.model, models.describe()) from None
        openai_convert.check_dimensions(wanted, model.card.embedding_dim)
        try:
            result = await model.embed(wanted.texts, wanted.truncate, PROTOCOL)
        except InvalidRequestError as e:
            raise openai_convert.embedding_error(e) from None
        return web.json_response(openai_convert.embedding_response(model.name, result, wanted.encoding_format))

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrived = time.monotonic()
        body = openai_convert.parse_body(await request.read())
        fields, options = openai_convert.to_request_fields(body, chat, self.settings.served_name)
        # The deadline counts from arrival, as gRPC's does; the engine ends the request there (504).
        timeouts = [t for t in (options.timeout, openai_convert.header_timeout(request.headers.get(TIMEOUT_HEADER)))
                    if t is not None]
        time_remaining = min(timeouts) - (time.monotonic() - arrived) if timeouts else None
        self.service.engine.check_capacity(PROTOCOL)  # a burst must not pay to tokenize what it cannot run
        try:
            generation = requests.generation_request(fields, self.service.codec, self.service.limits, time_remaining)
        except InvalidRequestError as e:
            raise translate(e, options.field_names) from None
        generation.protocol = PROTOCOL
        response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        async with contextlib.aclosing(self.service.updates(generation)) as updates:
            if not options.stream:
                merged = merge_updates([u async for u in updates])
                return web.json_response(openai_convert.response(response_id, created, options, merged,
                                                                 self._token_text))
            return await self._stream(request, updates, response_id, created, options)

    async def _stream(self, request: web.Request, updates, response_id: str, created: int,
                      options: openai_convert.Options) -> web.StreamResponse:
        # The first update comes before the headers: a request the engine refuses still gets its status.
        first = await anext(updates)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        update, offset, is_first = first, 0, True
        try:
            while True:
                await response.write(_sse(openai_convert.chunk(response_id, created, options, update,
                                                               self._token_text, offset, is_first)))
                offset, is_first = offset + len(update.text), False
                if update.finished:
                    break
                update = await anext(updates)
            if options.include_usage:
                await response.write(_sse(openai_convert.usage_chunk(response_id, created, options, update)))
        except (ConnectionError, OSError):
            raise  # the client left: the generator's cleanup cancels the request
        except Exception as e:
            # Headers are sent: the status cannot change, so the error travels as one more event.
            if not isinstance(e, AttnserveError):
                log.exception("unexpected error in an HTTP stream")
            await response.write(_sse(json.loads(error_body(e)[2])))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response


async def start(api: HttpApi, host: str, port: int, ssl_context: Optional[ssl.SSLContext]) -> web.AppRunner:
    """Serve the API on this event loop; the caller stops it with `await runner.cleanup()`."""
    # handler_cancellation: a client that disconnects cancels its handler, and so its engine request.
    # shutdown_timeout: streams still open when the server stops (after the drain) get a second to end.
    runner = web.AppRunner(api.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
