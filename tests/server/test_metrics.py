"""Metrics: what the engine reports becomes the right samples, every RPC is counted under the code its
client sees, and after N known requests to a real server the counters equal what the responses say."""
from __future__ import annotations

import asyncio
import concurrent.futures
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.contract import ModelCard
from attnserve.v1 import generation_pb2 as pb
from server.client import build_request
from server.engine import RequestReport, StepReport
from server.metrics import Metrics
from server.types import FinishReason

MODEL = "unit-model"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def fresh_metrics(**overrides) -> Metrics:
    card = SimpleNamespace(name=MODEL, architecture="llama", dtype="float32")
    settings = dict(provider="CPUExecutionProvider", version="9.9.9", kv_slots=4, slot_capacity=512,
                    max_queued_requests=32) | overrides
    return Metrics(card, **settings)


# The families labelled by the front a request came through; value() reads their gRPC series unless told.
PROTOCOL_FAMILIES = ("attnserve_requests_finished_total", "attnserve_requests_rejected_total",
                     "attnserve_prompt_tokens_total", "attnserve_generated_tokens_total",
                     "attnserve_request_duration_seconds", "attnserve_time_to_first_token_seconds",
                     "attnserve_inter_token_latency_seconds", "attnserve_queue_time_seconds",
                     "attnserve_request_prompt_tokens", "attnserve_request_generated_tokens")


def value(m: Metrics, name: str, **labels) -> float | None:
    if name.startswith(PROTOCOL_FAMILIES):
        labels.setdefault("protocol", "grpc")
    return m.registry.get_sample_value(name, {"model": MODEL, **labels})


def step(prefill=0, decode=0, duration=0.01, running=1, waiting=0, slots=1, tokens=10) -> StepReport:
    return StepReport(started=0.0, duration_s=duration, prefill_tokens=prefill, decode_tokens=decode, calls=1,
                      running=running, waiting=waiting, slots_in_use=slots, tokens_in_use=tokens)


def finished(reason=FinishReason.LENGTH, arrived=100.0, admitted=100.5, token_times=(101.0, 101.25, 101.75),
             end=102.0, prompt=7, completion=3, running=0, protocol="grpc") -> RequestReport:
    return RequestReport(finish_reason=reason, error=None if reason else "boom", arrived=arrived, admitted=admitted,
                         first_token=token_times[0] if token_times else None, finished=end, prompt_tokens=prompt,
                         completion_tokens=completion, token_times=list(token_times), running=running,
                         waiting=0, slots_in_use=running, protocol=protocol)


# ---- the engine's reports ------------------------------------------------------------------


def test_capacities_info_and_zeroed_series_exist_at_start():
    m = fresh_metrics()
    assert value(m, "attnserve_kv_slots_capacity") == 4
    assert value(m, "attnserve_kv_tokens_capacity") == 4 * 512
    assert value(m, "attnserve_requests_waiting_capacity") == 32
    for gauge in ("attnserve_requests_running", "attnserve_requests_waiting", "attnserve_kv_slots_in_use",
                  "attnserve_kv_tokens_in_use"):
        assert value(m, gauge) == 0
    for reason in ("length", "stop", "eos", "cancelled", "error"):
        assert value(m, "attnserve_requests_finished_total", finish_reason=reason) == 0
    for reason in ("queue_full", "draining"):
        assert value(m, "attnserve_requests_rejected_total", reason=reason) == 0
    assert value(m, "attnserve_prompt_tokens_total") == 0
    assert value(m, "attnserve_generated_tokens_total") == 0
    assert m.registry.get_sample_value("attnserve_model_info", {
        "model": MODEL, "kind": "decoder", "architecture": "llama", "dtype": "float32",
        "execution_provider": "CPUExecutionProvider", "version": "9.9.9"}) == 1


def test_steps_are_timed_by_phase_and_move_the_gauges():
    m = fresh_metrics()
    m.on_step(step(prefill=64, duration=0.030))
    m.on_step(step(decode=3, duration=0.004, running=3, waiting=2, slots=3, tokens=200))
    m.on_step(step(prefill=10, decode=2, duration=0.012))
    m.on_step(step(decode=1, duration=0.003, running=2, waiting=1, slots=2, tokens=150))
    for phase, count, total in (("prefill", 1, 0.030), ("decode", 2, 0.007), ("mixed", 1, 0.012)):
        assert value(m, "attnserve_engine_step_duration_seconds_count", phase=phase) == count
        assert value(m, "attnserve_engine_step_duration_seconds_sum", phase=phase) == pytest.approx(total)
    assert value(m, "attnserve_engine_step_tokens_count") == 4
    assert value(m, "attnserve_engine_step_tokens_sum") == 64 + 3 + 12 + 1
    assert value(m, "attnserve_engine_step_tokens_bucket", le="64.0") == 4
    assert value(m, "attnserve_engine_step_tokens_bucket", le="32.0") == 3
    assert value(m, "attnserve_engine_step_duration_seconds_bucket", phase="decode", le="0.005") == 2
    assert value(m, "attnserve_engine_step_duration_seconds_bucket", phase="prefill", le="0.02") == 0
    # Gauges hold the last report.
    assert (value(m, "attnserve_requests_running"), value(m, "attnserve_requests_waiting")) == (2, 1)
    assert (value(m, "attnserve_kv_slots_in_use"), value(m, "attnserve_kv_tokens_in_use")) == (2, 150)
    # The endpoint picker's KV-cache usage: slots in use over the 4 slots, 0 to 1.
    assert value(m, "attnserve_kv_cache_usage_ratio") == 0.5
    m.on_request_finished(finished(running=0))
    assert value(m, "attnserve_kv_cache_usage_ratio") == 0


def test_a_finished_request_fills_its_latency_and_token_histograms():
    m = fresh_metrics()
    m.on_request_finished(finished(running=1))
    assert value(m, "attnserve_requests_finished_total", finish_reason="length") == 1
    assert value(m, "attnserve_request_duration_seconds_sum") == pytest.approx(2.0)
    assert value(m, "attnserve_queue_time_seconds_sum") == pytest.approx(0.5)
    assert value(m, "attnserve_time_to_first_token_seconds_sum") == pytest.approx(1.0)
    assert value(m, "attnserve_time_to_first_token_seconds_bucket", le="1.0") == 1
    assert value(m, "attnserve_time_to_first_token_seconds_bucket", le="0.5") == 0
    # Three tokens make two gaps: 0.25 s and 0.5 s.
    assert value(m, "attnserve_inter_token_latency_seconds_count") == 2
    assert value(m, "attnserve_inter_token_latency_seconds_sum") == pytest.approx(0.75)
    assert value(m, "attnserve_inter_token_latency_seconds_bucket", le="0.2") == 0
    assert value(m, "attnserve_inter_token_latency_seconds_bucket", le="0.5") == 2
    assert value(m, "attnserve_request_prompt_tokens_sum") == 7
    assert value(m, "attnserve_request_generated_tokens_sum") == 3
    assert value(m, "attnserve_prompt_tokens_total") == 7
    assert value(m, "attnserve_generated_tokens_total") == 3
    assert value(m, "attnserve_requests_running") == 1


def test_failed_and_never_admitted_requests_count_without_inventing_latencies():
    m = fresh_metrics()
    m.on_request_finished(finished(reason=None, admitted=None, token_times=(), completion=0))
    m.on_request_finished(finished(reason=FinishReason.CANCELLED, admitted=None, token_times=(), completion=0))
    assert value(m, "attnserve_requests_finished_total", finish_reason="error") == 1
    assert value(m, "attnserve_requests_finished_total", finish_reason="cancelled") == 1
    assert value(m, "attnserve_request_duration_seconds_count") == 2
    assert value(m, "attnserve_queue_time_seconds_count") is None
    assert value(m, "attnserve_time_to_first_token_seconds_count") is None
    assert value(m, "attnserve_inter_token_latency_seconds_count") is None
    assert value(m, "attnserve_prompt_tokens_total") == 14


def test_kv_tokens_drop_to_zero_when_the_last_request_leaves_between_steps():
    m = fresh_metrics()
    m.on_step(step(decode=2, running=2, slots=2, tokens=300))
    m.on_request_finished(finished(reason=FinishReason.CANCELLED, running=1))
    assert value(m, "attnserve_kv_tokens_in_use") == 300  # the next step corrects it
    m.on_request_finished(finished(reason=FinishReason.CANCELLED, running=0))
    assert value(m, "attnserve_kv_tokens_in_use") == 0
    assert value(m, "attnserve_kv_slots_in_use") == 0


def test_rejections_and_step_failures_are_counted_by_reason():
    m = fresh_metrics()
    m.on_rejected("queue_full")
    m.on_rejected("queue_full")
    m.on_rejected("draining")
    m.on_step_failed(RuntimeError("x"))
    assert value(m, "attnserve_requests_rejected_total", reason="queue_full") == 2
    assert value(m, "attnserve_requests_rejected_total", reason="draining") == 1
    assert value(m, "attnserve_engine_step_failures_total") == 1


def test_requests_are_counted_under_the_protocol_their_front_set():
    m = fresh_metrics()
    for protocol in ("grpc", "http"):  # both fronts read 0 before their first request
        assert value(m, "attnserve_requests_finished_total", protocol=protocol, finish_reason="stop") == 0
        assert value(m, "attnserve_requests_rejected_total", protocol=protocol, reason="queue_full") == 0
        assert value(m, "attnserve_generated_tokens_total", protocol=protocol) == 0
    m.on_request_finished(finished(protocol="http", prompt=5, completion=3))
    m.on_request_finished(finished(protocol="grpc", prompt=7, completion=2))
    m.on_request_finished(finished(protocol="http", prompt=1, completion=4))
    m.on_rejected("queue_full", "http")
    assert value(m, "attnserve_requests_finished_total", protocol="http", finish_reason="length") == 2
    assert value(m, "attnserve_requests_finished_total", protocol="grpc", finish_reason="length") == 1
    assert value(m, "attnserve_generated_tokens_total", protocol="http") == 7
    assert value(m, "attnserve_prompt_tokens_total", protocol="grpc") == 7
    assert value(m, "attnserve_time_to_first_token_seconds_count", protocol="http") == 2
    assert value(m, "attnserve_inter_token_latency_seconds_count", protocol="http") == 4
    assert value(m, "attnserve_requests_rejected_total", protocol="http", reason="queue_full") == 1
    assert value(m, "attnserve_requests_rejected_total", protocol="grpc", reason="queue_full") == 0
    # A front of another name: free-form, its zero series on request, its reports under its own name.
    assert value(m, "attnserve_requests_finished_total", protocol="kserve", finish_reason="stop") is None
    m.add_protocol("kserve")
    assert value(m, "attnserve_requests_finished_total", protocol="kserve", finish_reason="stop") == 0
    m.on_request_finished(finished(protocol="kserve", reason=FinishReason.STOP))
    assert value(m, "attnserve_requests_finished_total", protocol="kserve", finish_reason="stop") == 1


def test_every_generation_method_and_code_attnserve_returns_starts_at_zero():
    m = fresh_metrics()
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    m.init_grpc_service(service)
    for method in service.methods:
        rpc_type = "server_stream" if method.server_streaming else "unary"
        labels = dict(grpc_service="attnserve.v1.Generation", grpc_method=method.name, grpc_type=rpc_type)
        for code in ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                     "INTERNAL", "UNAVAILABLE"):
            assert value(m, "attnserve_grpc_server_handled_total", grpc_code=code, **labels) == 0
        assert value(m, "attnserve_grpc_server_handling_seconds_count", **labels) == 0


def test_names_follow_prometheus_conventions_and_carry_the_model_label():
    m = fresh_metrics()
    m.init_grpc_service(pb.DESCRIPTOR.services_by_name["Generation"])
    families = list(m.registry.collect())
    assert len(families) >= 20
    for family in families:
        assert family.name.startswith("attnserve_") and ":" not in family.name
        if family.type == "counter":
            assert family.samples[0].name == family.name + "_total"
        if "seconds" in family.name or "duration" in family.name or "latency" in family.name:
            assert family.name.endswith("_seconds"), family.name
        for sample in family.samples:
            assert sample.labels.get("model") == MODEL, sample


def documented_metrics(section: str = "## Table") -> dict[str, tuple[str, set[str]]]:
    """The table under one heading of docs/metrics.md: name -> (type, label names)."""
    table = DOCS.read_text().split(section, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`attnserve_"):
            rows[cells[0].strip("`")] = (cells[1], set(re.findall(r"`(\w+)`", cells[2])))
    return rows


def test_docs_table_lists_exactly_the_registered_metrics_with_their_types_and_labels():
    m = fresh_metrics()
    m.init_grpc_service(pb.DESCRIPTOR.services_by_name["Generation"])
    for prefill, decode in ((8, 0), (0, 2), (4, 1)):  # every phase, so every labelled child exists
        m.on_step(step(prefill=prefill, decode=decode))
    m.on_request_finished(finished())
    registered = {}
    for family in m.registry.collect():
        exposed_type = {"info": "gauge"}.get(family.type, family.type)
        name = family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        registered[name] = (exposed_type, labels)
    documented = documented_metrics()
    assert set(documented) == set(registered), (set(documented) ^ set(registered))
    for name, (kind, labels) in registered.items():
        assert documented[name] == (kind, labels), name


def test_the_engine_imports_no_prometheus_code():
    code = "import sys, server.engine; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---- the gRPC interceptor on a real server ---------------------------------------------------


async def _ok(request, context):
    return b"ok"


async def _abort(request, context):
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")


slow_started: list[float] = []  # when each call of _slow reached its handler


async def _slow(request, context):
    slow_started.append(time.perf_counter())
    await asyncio.sleep(5)
    return b"late"


async def _raise(request, context):
    raise ValueError("a bug")


async def _stream_ok(request, context):
    for _ in range(3):
        yield b"x"


async def _stream_abort(request, context):
    yield b"x"
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")


async def _stream_slow(request, context):
    for _ in range(100):
        yield b"x"
        await asyncio.sleep(0.05)


async def _stream_written(request, context):
    """A streaming handler that writes and returns, as the health service's Watch does."""
    for _ in range(2):
        await context.write(b"w")


async def _sum_stream(requests, context):
    return b"%d" % len([r async for r in requests])


async def _echo_stream(requests, context):
    async for r in requests:
        yield r


def _identity(data):
    return data


HANDLERS = {
    **{name: grpc.unary_unary_rpc_method_handler(f, _identity, _identity)
       for name, f in [("Ok", _ok), ("Abort", _abort), ("Slow", _slow), ("Raise", _raise)]},
    **{name: grpc.unary_stream_rpc_method_handler(f, _identity, _identity)
       for name, f in [("StreamOk", _stream_ok), ("StreamAbort", _stream_abort), ("StreamSlow", _stream_slow),
                      ("StreamWritten", _stream_written)]},
    "Sum": grpc.stream_unary_rpc_method_handler(_sum_stream, _identity, _identity),
    "Echo": grpc.stream_stream_rpc_method_handler(_echo_stream, _identity, _identity),
}


async def _drive_every_kind_of_rpc(m: Metrics) -> dict[str, grpc.StatusCode]:
    """Call each method once through the interceptor; returns the code each client saw."""
    server = grpc.aio.server(interceptors=[m.grpc_interceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Probe", HANDLERS),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seen = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            async def unary(name, timeout=5.0):
                try:
                    await channel.unary_unary(f"/test.Probe/{name}")(b"", timeout=timeout)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    return e.code()

            async def stream(name, timeout=5.0, cancel_after=None):
                call = channel.unary_stream(f"/test.Probe/{name}")(b"", timeout=timeout)
                try:
                    received = 0
                    async for _ in call:
                        received += 1
                        if cancel_after and received >= cancel_after:
                            call.cancel()
                            return grpc.StatusCode.CANCELLED
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    return e.code()

            for name in ("Ok", "Abort", "Raise"):
                seen[name] = await unary(name)
            seen["Slow/deadline"] = await unary("Slow", timeout=0.3)
            slow_calls = len(slow_started)
            slow = channel.unary_unary("/test.Probe/Slow")(b"", timeout=5)
            await _until(lambda: len(slow_started) > slow_calls)  # the call reached its handler
            await asyncio.sleep(0.3)  # and ran there 0.3 s at least (handling_seconds_sum below)
            slow.cancel()
            seen["Slow/cancel"] = grpc.StatusCode.CANCELLED
            seen["StreamOk"] = await stream("StreamOk")
            seen["StreamAbort"] = await stream("StreamAbort")
            written = [r async for r in channel.unary_stream("/test.Probe/StreamWritten")(b"", timeout=5)]
            seen["StreamWritten"] = grpc.StatusCode.OK if written == [b"w", b"w"] else None
            seen["StreamSlow/deadline"] = await stream("StreamSlow", timeout=0.3)
            for attempt in range(5):  # the handler is cancelled or closed, depending on where it was
                seen[f"StreamSlow/cancel{attempt}"] = await stream("StreamSlow", cancel_after=1 + attempt)
            seen["Sum"] = (await channel.stream_unary("/test.Probe/Sum")(iter([b"a", b"b"]), timeout=5)) == b"2" and grpc.StatusCode.OK
            echoed = [r async for r in channel.stream_stream("/test.Probe/Echo")(iter([b"a", b"b"]), timeout=5)]
            seen["Echo"] = grpc.StatusCode.OK if echoed == [b"a", b"b"] else None
            seen["Missing"] = await unary("Missing")
            # Cancelled handlers record when their task unwinds: wait until each call that reached a handler
            # (every entry of `seen` but Missing) is counted.
            await _until(lambda: _handled_total(m) >= len(seen) - 1)
    finally:
        await server.stop(0)
    return seen


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _handled_total(m: Metrics) -> float:
    return sum(s.value for f in m.registry.collect() if f.name == "attnserve_grpc_server_handled"
               for s in f.samples if s.name.endswith("_total"))


def test_interceptor_counts_each_rpc_under_the_code_its_client_saw():
    m = fresh_metrics()
    seen = asyncio.run(_drive_every_kind_of_rpc(m))
    assert seen["Missing"] == grpc.StatusCode.UNIMPLEMENTED
    expected = {  # (method, type, code) -> count
        ("Ok", "unary", "OK"): 1,
        ("Abort", "unary", "INVALID_ARGUMENT"): 1,
        ("Raise", "unary", "UNKNOWN"): 1,
        ("Slow", "unary", "DEADLINE_EXCEEDED"): 1,
        ("Slow", "unary", "CANCELLED"): 1,
        ("StreamOk", "server_stream", "OK"): 1,
        ("StreamAbort", "server_stream", "RESOURCE_EXHAUSTED"): 1,
        ("StreamWritten", "server_stream", "OK"): 1,
        ("StreamSlow", "server_stream", "DEADLINE_EXCEEDED"): 1,
        ("StreamSlow", "server_stream", "CANCELLED"): 5,
        ("Sum", "client_stream", "OK"): 1,
        ("Echo", "bidi_stream", "OK"): 1,
    }
    for (method, rpc_type, code), count in expected.items():
        labels = dict(grpc_service="test.Probe", grpc_method=method, grpc_type=rpc_type)
        assert value(m, "attnserve_grpc_server_handled_total", grpc_code=code, **labels) == count, (method, code)
    counted = sum(s.value for f in m.registry.collect() if f.name == "attnserve_grpc_server_handled"
                  for s in f.samples if s.name.endswith("_total"))
    assert counted == sum(expected.values())  # nothing counted twice, the unimplemented method not at all
    assert value(m, "attnserve_grpc_server_handling_seconds_count", grpc_service="test.Probe",
                 grpc_method="Slow", grpc_type="unary") == 2
    assert value(m, "attnserve_grpc_server_handling_seconds_sum", grpc_service="test.Probe",
                 grpc_method="Slow", grpc_type="unary") >= 0.5
    # The client codes agree with what was recorded.
    assert seen["Abort"] == grpc.StatusCode.INVALID_ARGUMENT and seen["Raise"] == grpc.StatusCode.UNKNOWN
    assert seen["Slow/deadline"] == seen["StreamSlow/deadline"] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seen["StreamAbort"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert seen["StreamWritten"] == grpc.StatusCode.OK


# ---- a real server after N known requests ----------------------------------------------------


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples, name, **labels) -> float:
    wanted = set(labels.items())
    matching = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    assert matching, f"{name}{labels} not on /metrics"
    return sum(matching)


def wait_for(port, name, expected, timeout=10.0, **labels):
    """The engine reports a request just after its client got the answer: give it a moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sample(scrape(port), name, **labels) >= expected:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_counters_equal_what_n_known_requests_returned(test_model_dir, server_process):
    server = server_process(test_model_dir, "--kv-slots", "4", "--max-seq-len", "1024", "--max-queued-requests", "64")
    stub = server.stub()
    model = ModelCard.load(test_model_dir).name
    prompts = [[5 + i] * (3 + 4 * i) for i in range(8)]
    max_new = [1, 2, 5, 8, 13, 3, 21, 4]

    def unary(i):
        return stub.Generate(build_request(prompt_token_ids=prompts[i], max_new_tokens=max_new[i], ignore_eos=True),
                             timeout=60)

    def streamed(i):
        chunks = list(stub.GenerateStream(build_request(prompt_token_ids=prompts[i], max_new_tokens=max_new[i],
                                                        ignore_eos=True), timeout=60))
        return chunks[-1]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        unary_responses = list(pool.map(unary, range(5)))
        stream_ends = list(pool.map(streamed, range(5, 8)))
    usages = [r.usage for r in unary_responses] + [c.usage for c in stream_ends]
    invalid = 0
    for too_many in (5000, 4000):
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(build_request(prompt_token_ids=[5], max_new_tokens=too_many), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        invalid += 1
    n = len(usages)
    assert [u.completion_tokens for u in usages] == max_new

    port = server.metrics_port
    wait_for(port, "attnserve_requests_finished_total", n, model=model)
    s = scrape(port)
    generation = dict(model=model, grpc_service="attnserve.v1.Generation")
    assert sample(s, "attnserve_grpc_server_handled_total", grpc_method="Generate", grpc_code="OK", **generation) == 5
    assert sample(s, "attnserve_grpc_server_handled_total", grpc_method="GenerateStream", grpc_code="OK", **generation) == 3
    assert sample(s, "attnserve_grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **generation) == invalid
    assert sample(s, "attnserve_grpc_server_handling_seconds_count", **generation) == n + invalid
    assert sample(s, "attnserve_requests_finished_total", model=model, finish_reason="length") == n
    assert sample(s, "attnserve_requests_finished_total", model=model) == n  # invalid ones never reach the engine
    assert sample(s, "attnserve_requests_finished_total", model=model, protocol="grpc") == n
    assert sample(s, "attnserve_requests_finished_total", model=model, protocol="http") == 0
    for histogram in ("attnserve_request_duration_seconds", "attnserve_time_to_first_token_seconds",
                      "attnserve_queue_time_seconds", "attnserve_request_prompt_tokens",
                      "attnserve_request_generated_tokens"):
        assert sample(s, histogram + "_count", model=model) == n, histogram
        assert sample(s, histogram + "_bucket", model=model, le="+Inf") == n, histogram
    prompt_total = sum(u.prompt_tokens for u in usages)
    generated_total = sum(u.completion_tokens for u in usages)
    assert prompt_total == sum(len(p) for p in prompts)
    assert sample(s, "attnserve_prompt_tokens_total", model=model) == prompt_total
    assert sample(s, "attnserve_generated_tokens_total", model=model) == generated_total
    assert sample(s, "attnserve_request_prompt_tokens_sum", model=model) == prompt_total
    assert sample(s, "attnserve_request_generated_tokens_sum", model=model) == generated_total
    assert sample(s, "attnserve_inter_token_latency_seconds_count", model=model) == generated_total - n
    # Every computed token went through an engine step: the prompts plus all but each request's last token.
    assert sample(s, "attnserve_engine_step_tokens_sum", model=model) == prompt_total + generated_total - n
    assert sample(s, "attnserve_kv_slots_in_use", model=model) == 0

    # Then one deadline and two clients that leave mid-stream: counted under the codes those clients saw.
    # Whether gRPC or the engine notices the deadline first, the client reads DEADLINE_EXCEEDED.
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(build_request(prompt_token_ids=[7] * 8, max_new_tokens=1000, ignore_eos=True), timeout=0.08)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(2):
        call = stub.GenerateStream(build_request(prompt_token_ids=[9] * 8, max_new_tokens=1000, ignore_eos=True), timeout=60)
        next(call)
        call.cancel()
    wait_for(port, "attnserve_requests_finished_total", 3, model=model, finish_reason="cancelled")
    wait_for(port, "attnserve_grpc_server_handled_total", 2, grpc_code="CANCELLED", **generation)
    s = scrape(port)
    assert sample(s, "attnserve_requests_finished_total", model=model, finish_reason="cancelled") == 3
    generate_codes = {code: sample(s, "attnserve_grpc_server_handled_total", grpc_method="Generate", grpc_code=code,
                                   **generation) for code in ("OK", "DEADLINE_EXCEEDED")}
    assert generate_codes == {"OK": 5, "DEADLINE_EXCEEDED": 1}
    assert sample(s, "attnserve_grpc_server_handled_total", grpc_method="GenerateStream", grpc_code="CANCELLED", **generation) == 2
    assert sample(s, "attnserve_grpc_server_handled_total", grpc_code="UNKNOWN", **generation) == 0
