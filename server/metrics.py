"""Prometheus metrics: the engine reports, this module observes. docs/metrics.md has the table.

Names follow Prometheus conventions: prefix `attnserve_`, units in names,
`_total` on counters, a `model` label everywhere. Each Metrics object owns its
own CollectorRegistry, so tests and several servers in one process never clash.

Series that dashboards and alerts divide by are created at zero when the
server starts (every finish reason, rejection reason and, per Generation
method, every status code attnserve returns), so a quiet server reads 0
rather than "No data".

Families that count requests (finished, rejected, their tokens and latencies)
carry a `protocol` label: the front the request came through, as the front set
GenerationRequest.protocol ("grpc", "http", ...). Engine-wide state (steps,
slots, the queue) has none: every front shares one engine.

Encoders and image classifiers (server/encoders.py's BatchedModel, one batch
thread each) report to the same object as a BatchObserver: their `attnserve_batch_*`
families exist once the first such model is added (add_batched_model), each
model's series at zero from then on, and `attnserve_model_info` has one series
per served model of any kind.
"""
from __future__ import annotations

import asyncio
import inspect
import ssl
import threading
import time
from socketserver import ThreadingMixIn
from typing import Callable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info,
                               disable_created_metrics, generate_latest, make_wsgi_app)

from server.api_keys import ACCEPTED, OUTCOMES
from server.contract import KIND_DECODER, KIND_ENCODER, KIND_IMAGE_CLASSIFIER, ModelCard
from server.encoders import BatchObserver
from server.engine import EngineObserver, RequestReport, StepReport

# Buckets (upper bounds), chosen for this workload; docs/metrics.md gives the reasoning.
# Request-level latencies (end to end, time to first token, queue wait, RPC handling):
# a tiny model answers in about a millisecond; SmolLM2 on CPU takes tens of ms to a
# first token and 2048 tokens at ~20-50 ms each take 40-100 s end to end. The
# 1-2-4-8 steps above one second keep the TTFT alert threshold (2 s) on a bound.
REQUEST_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                           1, 2, 4, 8, 15, 30, 60, 120)
# Per-token and per-step durations: a decode step takes 0.2 ms (tiny model, one row)
# to ~50 ms (SmolLM2, 16 rows, CPU); a long prefill chunk up to a second or two.
STEP_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)
# Token counts per request or per step: powers of two up to the longest context served.
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# Texts or images per request and per batch run: powers of two up to the largest --max-inputs-per-request
# worth allowing; a run holds at most --max-batch of them (32 by default).
INPUT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# One batch run of an encoder or classifier: a tiny test model takes a fraction of a millisecond; 32 texts of
# 256 tokens through all-MiniLM-L6-v2 are about 0.2 TFLOP (24 MFLOP a token), seconds on one CPU thread.
BATCH_RUN_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5, 10)

# A handler cancelled this close to its call's deadline was cancelled by that deadline (see final_code).
DEADLINE_SLACK_SECONDS = 0.1

FINISH_REASONS = ("length", "stop", "eos", "cancelled", "error")  # error = failed inside the engine
# What a batched model's request asks for, by the model's kind, and how such a request can end.
BATCH_REQUEST_KINDS = {KIND_ENCODER: "embed", KIND_IMAGE_CLASSIFIER: "classify"}
BATCH_OUTCOMES = ("ok", "error", "rejected")  # rejected = refused before queueing (queue full, draining)
REJECTION_REASONS = ("queue_full", "draining")
# The fronts every server has series for from the start; a front of another name calls add_protocol().
PROTOCOLS = ("grpc", "http")
# The HTTP API's routes (server/http_api.py); anything else counts as "other".
HTTP_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize",
               "/detokenize", "/health", "/metrics")
# The status codes attnserve's own handlers end with (server/errors.py, client cancellation, deadlines, bugs).
GRPC_CODES_RETURNED = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED",
                       "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE", "UNAUTHENTICATED")


class Metrics(EngineObserver, BatchObserver):
    def __init__(self, card: ModelCard, provider: str, version: str, kv_slots: int, slot_capacity: int,
                 max_queued_requests: int, protocols: tuple[str, ...] = PROTOCOLS):
        self.registry = registry = CollectorRegistry()
        self.model = card.name
        m = ["model"]

        p = ["protocol"]  # on the families that count requests (module docstring)

        def histogram(name, doc, buckets, labels=()):
            return Histogram(name, doc, m + list(labels), buckets=buckets, registry=registry)

        def counter(name, doc, labels=()):
            return Counter(name, doc, m + list(labels), registry=registry)

        def gauge(name, doc):
            return Gauge(name, doc, m, registry=registry)

        self.request_duration = histogram("attnserve_request_duration_seconds", "End-to-end request latency, arrival to last token.", REQUEST_LATENCY_BUCKETS, p)
        self.ttft = histogram("attnserve_time_to_first_token_seconds", "Arrival to first generated token.", REQUEST_LATENCY_BUCKETS, p)
        self.itl = histogram("attnserve_inter_token_latency_seconds", "Time between consecutive generated tokens of a request.", STEP_LATENCY_BUCKETS, p)
        self.queue_time = histogram("attnserve_queue_time_seconds", "Arrival to getting a KV slot.", REQUEST_LATENCY_BUCKETS, p)
        self.step_duration = histogram("attnserve_engine_step_duration_seconds", "Duration of one engine step, by phase (prefill, decode, mixed).", STEP_LATENCY_BUCKETS, ["phase"])
        self.step_tokens = histogram("attnserve_engine_step_tokens", "Tokens computed in one engine step.", TOKEN_BUCKETS)
        self.request_prompt_tokens = histogram("attnserve_request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS, p)
        self.request_generated_tokens = histogram("attnserve_request_generated_tokens", "Generated tokens per request.", TOKEN_BUCKETS, p)

        self.requests_finished = counter("attnserve_requests_finished_total", "Requests that ended, by protocol and finish reason (error = failed in the engine).", p + ["finish_reason"])
        self.prompt_tokens = counter("attnserve_prompt_tokens_total", "Prompt tokens of finished requests.", p)
        self.generated_tokens = counter("attnserve_generated_tokens_total", "Generated tokens of finished requests.", p)
        self.rejected = counter("attnserve_requests_rejected_total", "Requests refused before running, by protocol and reason.", p + ["reason"])
        self.step_failures = counter("attnserve_engine_step_failures_total", "Engine steps that raised.")
        self.api_key_checks = counter("attnserve_api_key_checks_total", "API key checks, by outcome (accepted, missing, wrong).", ["outcome"])
        self.http_requests = counter("attnserve_http_requests_total", "OpenAI-compatible HTTP API requests, by route and HTTP status code.", ["route", "code"])

        self.running = gauge("attnserve_requests_running", "Requests holding a KV slot.")
        self.waiting = gauge("attnserve_requests_waiting", "Requests waiting for a KV slot.")
        self.waiting_capacity = gauge("attnserve_requests_waiting_capacity", "Requests that may wait before new ones are refused (--max-queued-requests).")
        self.slots_in_use = gauge("attnserve_kv_slots_in_use", "KV slots in use.")
        self.slots_capacity = gauge("attnserve_kv_slots_capacity", "KV slots preallocated.")
        # The 0-1 KV-cache usage a router's endpoint picker reads (docs/metrics.md): slots, not tokens, because
        # a request reserves a whole slot when admitted, so a pod with every slot taken admits nothing more.
        self.kv_cache_usage = gauge("attnserve_kv_cache_usage_ratio", "Share of the KV cache reserved by requests "
                                    "(KV slots in use over KV slots), 0 to 1.")
        self._kv_slots = kv_slots
        self.kv_tokens_in_use = gauge("attnserve_kv_tokens_in_use", "Tokens held in the KV cache.")
        self.kv_tokens_capacity = gauge("attnserve_kv_tokens_capacity", "Tokens the KV cache can hold.")
        self.info = Info("attnserve_model", "Each model served, its kind and how it runs.", m, registry=registry)

        grpc_labels = ["grpc_service", "grpc_method", "grpc_type"]
        self.grpc_handled = counter("attnserve_grpc_server_handled_total", "RPCs completed, by method and status code.", grpc_labels + ["grpc_code"])
        self.grpc_seconds = histogram("attnserve_grpc_server_handling_seconds", "RPC handling time, by method.", REQUEST_LATENCY_BUCKETS, grpc_labels)

        self.version = version
        self.info.labels(card.name).info({"kind": KIND_DECODER, "architecture": card.architecture,
                                          "dtype": card.dtype, "execution_provider": provider, "version": version})
        self.slots_capacity.labels(self.model).set(kv_slots)
        self.kv_tokens_capacity.labels(self.model).set(kv_slots * slot_capacity)
        self.waiting_capacity.labels(self.model).set(max_queued_requests)
        for g in (self.running, self.waiting, self.slots_in_use, self.kv_tokens_in_use, self.kv_cache_usage):
            g.labels(self.model).set(0)
        self._protocols: list[str] = []
        self._batch: Optional[_BatchFamilies] = None  # made with the first batched model
        self._batched: dict[str, str] = {}  # batched model -> the kind of request it answers
        for protocol in protocols:
            self.add_protocol(protocol)
        self.step_failures.labels(self.model)
        for outcome in OUTCOMES:
            self.api_key_checks.labels(self.model, outcome)
        for route in HTTP_ROUTES:
            self.http_requests.labels(self.model, route, "200")

    def add_protocol(self, protocol: str) -> None:
        """Create a front's request counters at zero, so that its rates read 0 before its first request."""
        for reason in FINISH_REASONS:
            self.requests_finished.labels(self.model, protocol, reason)
        for reason in REJECTION_REASONS:
            self.rejected.labels(self.model, protocol, reason)
        self.prompt_tokens.labels(self.model, protocol)
        self.generated_tokens.labels(self.model, protocol)
        if protocol not in self._protocols:
            self._protocols.append(protocol)
        for model, request_kind in self._batched.items():
            self._batch.add_protocol(model, protocol, request_kind)

    def add_batched_model(self, name: str, kind: str, dtype: str, execution_provider: str,
                          queued_inputs: Optional[Callable[[], int]] = None) -> None:
        """An encoder's or image classifier's series, at zero for every front; `queued_inputs` (read at each
        scrape) says how many of its texts or images are accepted and not yet answered."""
        if kind not in BATCH_REQUEST_KINDS:
            raise ValueError(f"a batched model's kind is {' or '.join(BATCH_REQUEST_KINDS)}, got {kind!r}")
        if self._batch is None:
            self._batch = _BatchFamilies(self.registry)
        self.info.labels(name).info({"kind": kind, "architecture": "transformer", "dtype": dtype,
                                     "execution_provider": execution_provider, "version": self.version})
        self._batched[name] = BATCH_REQUEST_KINDS[kind]
        self._batch.add_model(name, kind, queued_inputs)
        for protocol in self._protocols:
            self._batch.add_protocol(name, protocol, self._batched[name])

    def serve(self, host: str, port: int, ssl_context: Optional[ssl.SSLContext] = None,
              check_api_key: Optional[Callable[[Optional[str]], str]] = None) -> int:
        """Start the /metrics HTTP server on a daemon thread; returns the bound port.

        With `ssl_context` it speaks TLS only; with `check_api_key` a scrape needs `authorization: Bearer KEY`.
        """
        # No `_created` series beside each counter and histogram: they would double the
        # series count, and no dashboard or rule reads them. A process-wide switch.
        disable_created_metrics()
        exposition = make_wsgi_app(self.registry)

        def app(environ, start_response):
            if check_api_key is not None:
                outcome = check_api_key(environ.get("HTTP_AUTHORIZATION"))
                self.on_api_key_checked(outcome)
                if outcome != ACCEPTED:
                    start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                                        ("WWW-Authenticate", 'Bearer realm="attnserve"')])
                    return [b"this endpoint requires an API key: send the header `authorization: Bearer KEY`\n"]
            return exposition(environ, start_response)

        server = make_server(host, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
        if ssl_context is not None:
            # The handshake happens in each connection's own thread, so a slow client cannot hold up accept().
            server.socket = ssl_context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=server.serve_forever, name="attnserve-metrics", daemon=True).start()
        return server.server_port

    def exposition(self) -> tuple[bytes, str]:
        """(/metrics body, its content type), for a listener other than serve()'s: the HTTP API's port."""
        disable_created_metrics()  # as serve() does: the HTTP port may be the only place metrics are scraped
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _set_slots_in_use(self, slots_in_use: int) -> None:
        self.slots_in_use.labels(self.model).set(slots_in_use)
        self.kv_cache_usage.labels(self.model).set(slots_in_use / self._kv_slots if self._kv_slots else 0.0)

    def on_api_key_checked(self, outcome: str) -> None:
        self.api_key_checks.labels(self.model, outcome).inc()

    def on_http_request(self, route: str, status: int) -> None:
        self.http_requests.labels(self.model, route, str(status)).inc()

    def init_grpc_service(self, service) -> None:
        """Create the series of a protobuf ServiceDescriptor's methods at zero, for each code attnserve returns."""
        for method in service.methods:
            labels = (self.model, service.full_name, method.name, _rpc_type(method.client_streaming, method.server_streaming))
            self.grpc_seconds.labels(*labels)
            for code in GRPC_CODES_RETURNED:
                self.grpc_handled.labels(*labels, code)

    # ---- EngineObserver --------------------------------------------------------------------

    def on_step(self, report: StepReport) -> None:
        phase = "mixed" if report.prefill_tokens and report.decode_tokens else ("prefill" if report.prefill_tokens else "decode")
        self.step_duration.labels(self.model, phase).observe(report.duration_s)
        self.step_tokens.labels(self.model).observe(report.prefill_tokens + report.decode_tokens)
        self.running.labels(self.model).set(report.running)
        self.waiting.labels(self.model).set(report.waiting)
        self._set_slots_in_use(report.slots_in_use)
        self.kv_tokens_in_use.labels(self.model).set(report.tokens_in_use)

    def on_request_finished(self, report: RequestReport) -> None:
        model, protocol = self.model, report.protocol
        reason = report.finish_reason.value if report.finish_reason else "error"
        self.requests_finished.labels(model, protocol, reason).inc()
        self.request_duration.labels(model, protocol).observe(report.finished - report.arrived)
        if report.admitted is not None:
            self.queue_time.labels(model, protocol).observe(report.admitted - report.arrived)
        if report.first_token is not None:
            self.ttft.labels(model, protocol).observe(report.first_token - report.arrived)
        times = report.token_times
        if len(times) > 1:
            itl = self.itl.labels(model, protocol)  # one label lookup per request, not per token
            for earlier, later in zip(times, times[1:]):
                itl.observe(later - earlier)
        self.request_prompt_tokens.labels(model, protocol).observe(report.prompt_tokens)
        self.request_generated_tokens.labels(model, protocol).observe(report.completion_tokens)
        self.prompt_tokens.labels(model, protocol).inc(report.prompt_tokens)
        self.generated_tokens.labels(model, protocol).inc(report.completion_tokens)
        self.running.labels(model).set(report.running)
        self.waiting.labels(model).set(report.waiting)
        self._set_slots_in_use(report.slots_in_use)
        if report.running == 0:
            # A request cancelled between steps leaves no step report behind it; with
            # nothing running the cache holds no tokens, and the next step refreshes it otherwise.
            self.kv_tokens_in_use.labels(model).set(0)

    def on_rejected(self, reason: str, protocol: str = "grpc") -> None:
        self.rejected.labels(self.model, protocol, reason).inc()

    def on_step_failed(self, error: BaseException) -> None:
        self.step_failures.labels(self.model).inc()

    # ---- BatchObserver (server/encoders.py), from a batch thread or the event loop -------------

    def on_batch(self, model: str, inputs: int, padded_tokens: int, seconds: float) -> None:
        batch = self._families(model)
        batch.run_inputs.labels(model).observe(inputs)
        batch.run_duration.labels(model).observe(seconds)
        if padded_tokens:  # images have no tokens: their runs would only pile up zeros
            batch.run_padded_tokens.labels(model).observe(padded_tokens)

    def on_request(self, model: str, protocol: str, kind: str, inputs: int, seconds: float, outcome: str) -> None:
        batch = self._families(model)
        batch.requests.labels(model, protocol, kind, outcome).inc()
        if outcome != "rejected":  # refused at once: neither a latency nor a size worth a bucket
            batch.request_duration.labels(model, protocol, kind).observe(seconds)
            batch.request_inputs.labels(model, protocol, kind).observe(inputs)

    def _families(self, model: str) -> "_BatchFamilies":
        if self._batch is None:
            raise RuntimeError(f"batched model {model!r} reports before add_batched_model() named it")
        return self._batch

    # ---- gRPC ------------------------------------------------------------------------------

    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        return _MetricsInterceptor(self)


class _BatchFamilies:
    """The families of the batched models (encoders, image classifiers), in the server's registry.

    Per request: model, protocol and `kind` (embed or classify); per batch run and queue: model alone,
    since one run mixes the requests of every front.
    """

    def __init__(self, registry: CollectorRegistry):
        request = ["model", "protocol", "kind"]
        self.requests = Counter("attnserve_batch_requests_total", "Requests to encoders and image classifiers, by "
                                "protocol, kind (embed, classify) and outcome (ok, error, rejected).",
                                request + ["outcome"], registry=registry)
        self.request_duration = Histogram("attnserve_batch_request_duration_seconds", "A request to an encoder or "
                                          "image classifier, from reaching the model to its answer.", request,
                                          buckets=REQUEST_LATENCY_BUCKETS, registry=registry)
        self.request_inputs = Histogram("attnserve_batch_request_inputs", "Texts or images per request.", request,
                                        buckets=INPUT_BUCKETS, registry=registry)
        self.run_inputs = Histogram("attnserve_batch_run_inputs", "Texts or images in one batch run.", ["model"],
                                    buckets=INPUT_BUCKETS, registry=registry)
        self.run_padded_tokens = Histogram("attnserve_batch_run_padded_tokens", "Tokens an encoder computes in one "
                                           "batch run, padding included (inputs x longest).", ["model"],
                                           buckets=TOKEN_BUCKETS, registry=registry)
        self.run_duration = Histogram("attnserve_batch_run_duration_seconds", "One batch run: padding the batch "
                                      "and the onnxruntime call.", ["model"],
                                      buckets=BATCH_RUN_BUCKETS, registry=registry)
        self.queue_inputs = Gauge("attnserve_batch_queue_inputs", "Texts or images accepted and not yet answered.",
                                  ["model"], registry=registry)

    def add_model(self, model: str, kind: str, queued_inputs: Optional[Callable[[], int]]) -> None:
        self.run_inputs.labels(model)
        self.run_duration.labels(model)
        if kind == KIND_ENCODER:  # an image classifier's runs have no tokens
            self.run_padded_tokens.labels(model)
        queue = self.queue_inputs.labels(model)
        if queued_inputs is not None:
            queue.set_function(queued_inputs)

    def add_protocol(self, model: str, protocol: str, request_kind: str) -> None:
        for outcome in BATCH_OUTCOMES:
            self.requests.labels(model, protocol, request_kind, outcome)
        self.request_duration.labels(model, protocol, request_kind)
        self.request_inputs.labels(model, protocol, request_kind)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in flight never holds up the process's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # one line per scrape on stderr is noise
        pass


def _rpc_type(client_streaming: bool, server_streaming: bool) -> str:
    """The grpc_type label values of the Go and Java gRPC Prometheus interceptors."""
    return {(False, False): "unary", (False, True): "server_stream",
            (True, False): "client_stream", (True, True): "bidi_stream"}[(client_streaming, server_streaming)]


class _MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and final status code, and times it.

    Methods the server does not implement never reach a handler and are not
    counted (the Go and Java interceptors do the same).
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        rpc_type = _rpc_type(handler.request_streaming, handler.response_streaming)
        record = self._recorder(service, method, rpc_type)
        wrap = {"unary": _wrap_unary_response, "client_stream": _wrap_unary_response,
                "server_stream": _wrap_stream_response, "bidi_stream": _wrap_stream_response}[rpc_type]
        behaviour = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
        make_handler = {"unary": grpc.unary_unary_rpc_method_handler,
                        "client_stream": grpc.stream_unary_rpc_method_handler,
                        "server_stream": grpc.unary_stream_rpc_method_handler,
                        "bidi_stream": grpc.stream_stream_rpc_method_handler}[rpc_type]
        return make_handler(wrap(behaviour, record), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)

    def _recorder(self, service: str, method: str, rpc_type: str):
        m = self.metrics
        labels = (m.model, service, method, rpc_type)

        def record(context, error: Optional[BaseException], started: float) -> None:
            m.grpc_handled.labels(*labels, final_code(context, error)).inc()
            m.grpc_seconds.labels(*labels).observe(time.perf_counter() - started)
        return record


def _wrap_unary_response(behaviour, record):
    async def handle(request, context):
        started = time.perf_counter()
        try:
            response = await behaviour(request, context)
        except BaseException as e:
            record(context, e, started)
            raise
        record(context, None, started)
        return response
    return handle


def _wrap_stream_response(behaviour, record):
    if not inspect.isasyncgenfunction(behaviour):
        # A handler that writes with context.write() and returns (the health service's Watch) is a
        # coroutine, not a generator: gRPC tells the two apart by their function type, so keep it.
        return _wrap_unary_response(behaviour, record)

    async def handle(request, context):
        started = time.perf_counter()
        try:
            async for response in behaviour(request, context):
                yield response
        except BaseException as e:
            record(context, e, started)
            raise
        record(context, None, started)
    return handle


def final_code(context, error: Optional[BaseException]) -> str:
    """The status code the client sees.

    A handler that aborted or set a code has it on the context. gRPC cancels a
    handler when its client leaves (CANCELLED) or when the call's deadline
    passes (DEADLINE_EXCEEDED for the client). The client's own deadline timer
    usually fires first and cancels the call a few milliseconds before the
    server's copy of the deadline (which starts when the request arrives), so a
    cancellation that close to the deadline counts as DEADLINE_EXCEEDED.
    Anything else that escapes a handler becomes UNKNOWN in grpc itself.
    """
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return "OK"
    # A stream whose client left is closed (GeneratorExit) or cancelled, depending on where it was.
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)) or context.cancelled():
        remaining = context.time_remaining()
        past_deadline = remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
        return "DEADLINE_EXCEEDED" if past_deadline else "CANCELLED"
    return "UNKNOWN"
