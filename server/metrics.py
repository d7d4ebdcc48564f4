"""Prometheus metrics: the engine reports, this module observes. See docs/metrics.md for the table.

Names follow Prometheus conventions: prefix `attnserve_`, units in names,
`_total` on counters, a `model` label everywhere. Each Metrics object owns its
own CollectorRegistry, so tests and several servers in one process never clash.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from export.contract import ModelCard
from server.engine import EngineObserver, RequestReport, StepReport

# Latency buckets: a CPU decode step of a small model takes ~1-50 ms and a TTFT
# under load can reach tens of seconds, so the buckets span 1 ms to 60 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Inter-token and step latencies live between ~0.2 ms (tiny model) and 1 s (a long prefill chunk).
STEP_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)
# Token counts per request or per step: powers of two up to the largest context we serve.
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics(EngineObserver):
    def __init__(self, card: ModelCard, provider: str, version: str, kv_slots: int, slot_capacity: int):
        self.registry = registry = CollectorRegistry()
        self.model = card.name
        self.on_fatal_callbacks: list[Callable[[BaseException], None]] = []
        m = ["model"]

        def histogram(name, doc, buckets, labels=()):
            return Histogram(name, doc, m + list(labels), buckets=buckets, registry=registry)

        self.request_duration = histogram("attnserve_request_duration_seconds", "End-to-end request latency, arrival to last token.", LATENCY_BUCKETS)
        self.ttft = histogram("attnserve_time_to_first_token_seconds", "Arrival to first generated token.", LATENCY_BUCKETS)
        self.itl = histogram("attnserve_inter_token_latency_seconds", "Time between consecutive generated tokens of a request.", STEP_BUCKETS)
        self.queue_time = histogram("attnserve_queue_time_seconds", "Arrival to getting a KV slot.", LATENCY_BUCKETS)
        self.step_duration = histogram("attnserve_engine_step_duration_seconds", "Duration of one engine step, by phase (prefill, decode, mixed).", STEP_BUCKETS, ["phase"])
        self.step_tokens = histogram("attnserve_engine_step_tokens", "Tokens computed in one engine step.", TOKEN_BUCKETS)
        self.request_prompt_tokens = histogram("attnserve_request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.request_generated_tokens = histogram("attnserve_request_generated_tokens", "Generated tokens per request.", TOKEN_BUCKETS)

        self.requests_finished = Counter("attnserve_requests_finished_total", "Requests that ended, by finish reason (error = failed in the engine).", m + ["finish_reason"], registry=registry)
        self.prompt_tokens = Counter("attnserve_prompt_tokens_total", "Prompt tokens of finished requests.", m, registry=registry)
        self.generated_tokens = Counter("attnserve_generated_tokens_total", "Generated tokens.", m, registry=registry)
        self.rejected = Counter("attnserve_requests_rejected_total", "Requests refused before running, by reason.", m + ["reason"], registry=registry)
        self.step_failures = Counter("attnserve_engine_step_failures_total", "Engine steps that raised.", m, registry=registry)

        self.running = Gauge("attnserve_requests_running", "Requests holding a KV slot.", m, registry=registry)
        self.waiting = Gauge("attnserve_requests_waiting", "Requests waiting for a KV slot.", m, registry=registry)
        self.slots_in_use = Gauge("attnserve_kv_slots_in_use", "KV slots in use.", m, registry=registry)
        self.slots_capacity = Gauge("attnserve_kv_slots_capacity", "KV slots preallocated.", m, registry=registry)
        self.kv_tokens_in_use = Gauge("attnserve_kv_tokens_in_use", "Tokens held in the KV cache.", m, registry=registry)
        self.kv_tokens_capacity = Gauge("attnserve_kv_tokens_capacity", "Tokens the KV cache can hold.", m, registry=registry)
        self.info = Info("attnserve_model", "The model served and how.", registry=registry)

        self.grpc_handled = Counter("attnserve_grpc_server_handled_total", "RPCs completed, by method and status code.", m + ["grpc_method", "grpc_code"], registry=registry)
        self.grpc_seconds = Histogram("attnserve_grpc_server_handling_seconds", "RPC handling time, by method.", m + ["grpc_method"], buckets=LATENCY_BUCKETS, registry=registry)

        self.info.info({"model": card.name, "architecture": card.architecture, "dtype": card.dtype,
                        "execution_provider": provider, "version": version})
        self.slots_capacity.labels(self.model).set(kv_slots)
        self.kv_tokens_capacity.labels(self.model).set(kv_slots * slot_capacity)
        for gauge in (self.running, self.waiting, self.slots_in_use, self.kv_tokens_in_use):
            gauge.labels(self.model).set(0)
        for reason in ("length", "stop", "eos", "cancelled", "error"):
            self.requests_finished.labels(self.model, reason)
        for reason in ("queue_full", "draining"):
            self.rejected.labels(self.model, reason)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server on a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

    # ---- EngineObserver --------------------------------------------------------------------

    def on_step(self, report: StepReport) -> None:
        phase = "mixed" if report.prefill_tokens and report.decode_tokens else ("prefill" if report.prefill_tokens else "decode")
        self.step_duration.labels(self.model, phase).observe(report.duration_s)
        self.step_tokens.labels(self.model).observe(report.prefill_tokens + report.decode_tokens)
        self.running.labels(self.model).set(report.running)
        self.waiting.labels(self.model).set(report.waiting)
        self.slots_in_use.labels(self.model).set(report.slots_in_use)
        self.kv_tokens_in_use.labels(self.model).set(report.tokens_in_use)

    def on_request_finished(self, report: RequestReport) -> None:
        model = self.model
        reason = report.finish_reason.value if report.finish_reason else "error"
        self.requests_finished.labels(model, reason).inc()
        self.request_duration.labels(model).observe(report.finished - report.arrived)
        if report.admitted is not None:
            self.queue_time.labels(model).observe(report.admitted - report.arrived)
        if report.first_token is not None:
            self.ttft.labels(model).observe(report.first_token - report.arrived)
        times = report.token_times
        for earlier, later in zip(times, times[1:]):
            self.itl.labels(model).observe(later - earlier)
        self.request_prompt_tokens.labels(model).observe(report.prompt_tokens)
        self.request_generated_tokens.labels(model).observe(report.completion_tokens)
        self.prompt_tokens.labels(model).inc(report.prompt_tokens)
        self.generated_tokens.labels(model).inc(report.completion_tokens)
        self.running.labels(model).set(report.running)
        self.waiting.labels(model).set(report.waiting)
        self.slots_in_use.labels(model).set(report.slots_in_use)

    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model, reason).inc()

    def on_step_failed(self, error: BaseException) -> None:
        self.step_failures.labels(self.model).inc()

    def on_fatal(self, error: BaseException) -> None:
        for callback in self.on_fatal_callbacks:
            callback(error)

    # ---- gRPC ------------------------------------------------------------------------------

    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        return _MetricsInterceptor(self)


class _MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and final status code, and times it."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        record = self._recorder(method)
        if handler.unary_unary:
            async def unary(request, context):
                started = time.perf_counter()
                try:
                    response = await handler.unary_unary(request, context)
                except BaseException as e:
                    record(context, e, started)
                    raise
                record(context, None, started)
                return response
            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            async def stream(request, context):
                started = time.perf_counter()
                try:
                    async for response in handler.unary_stream(request, context):
                        yield response
                except BaseException as e:
                    record(context, e, started)
                    raise
                record(context, None, started)
            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _recorder(self, method: str):
        m = self.metrics

        def record(context, error, started):
            m.grpc_handled.labels(m.model, method, _final_code(context, error)).inc()
            m.grpc_seconds.labels(m.model, method).observe(time.perf_counter() - started)
        return record


def _final_code(context, error) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return "OK"
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"
