"""Deadlines, graceful shutdown and health: what an orchestrator relies on."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attnserve.v1 import generation_pb2 as pb
from server.client import build_request
from tests.server.helpers import HeldStream, wait_until

CANCELLED = 'finish_reason="cancelled"'


def test_deadline_cancels_and_frees_the_slot(test_server):
    # The counter is shared by every test on test_server: this test's own cancellation is the difference.
    cancelled_before = test_server.metric("attnserve_requests_finished_total", CANCELLED)
    # A stream that cannot finish before its deadline on any machine: it advances only when read (HeldStream).
    stream = HeldStream(test_server.target, [3, 4, 5], max_new_tokens=1000, timeout=3.0)
    try:
        stream.read()  # running: it holds a KV slot
        assert stream.call.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # blocks until the call ends
    finally:
        stream.close()
    assert test_server.wait_for_metric("attnserve_kv_slots_in_use", 0) == 0
    wait_until(lambda: test_server.metric("attnserve_requests_finished_total", CANCELLED) > cancelled_before, 10,
               "the deadline's cancellation was never counted")
    assert test_server.metric("attnserve_requests_finished_total", CANCELLED) - cancelled_before == 1


def test_health_and_reflection_are_on(test_server):
    channel = grpc.insecure_channel(test_server.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "attnserve.v1.Generation"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service="attnserve.v1.Generation"), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"attnserve.v1.Generation", "grpc.health.v1.Health"} <= names


def test_reflection_lets_a_generic_client_call_generate(test_server):
    """A client with no generated code: it fetches the descriptors by reflection and builds the request."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(test_server.target)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="attnserve.v1.Generation")
    response = next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=5)))
    pool = descriptor_pool.DescriptorPool()
    for raw in response.file_descriptor_response.file_descriptor_proto:
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
    request_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("attnserve.v1.GenerateRequest"))
    response_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("attnserve.v1.GenerateResponse"))
    generate = channel.unary_unary("/attnserve.v1.Generation/Generate", request_serializer=request_class.SerializeToString,
                                   response_deserializer=response_class.FromString)
    message = request_class(max_new_tokens=5, ignore_eos=True)
    message.prompt_token_ids.ids.extend([10, 11, 12])
    assert len(generate(message, timeout=30).token_ids) == 5


def test_sigterm_during_load_finishes_accepted_requests_and_exits_0(test_model_dir, server_process):
    # The stall timeout outlasts the test: the held streams wait for this test, not for a timer.
    server = server_process(test_model_dir, "--kv-slots", "4", "--max-seq-len", "1024", "--drain-grace-seconds", "60",
                            "--stream-stall-timeout-seconds", "600")
    stub = server.stub()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    # Four running requests that advance only when read, so the drain cannot end before the checks below,
    # however fast the machine; eight more wait behind them for a slot.
    running = [HeldStream(server.target, [7 + i, 8, 9], max_new_tokens=600) for i in range(4)]
    try:
        for stream in running:
            stream.read()
        queued = [stub.Generate.future(build_request(prompt_token_ids=[11 + i, 8, 9], max_new_tokens=300,
                                                     ignore_eos=True), timeout=120) for i in range(8)]
        # The waiting gauge moves when the engine steps, and it steps only for a held stream that was read:
        # read them in turn (some dozens of tokens each time) until it counts the eight.
        reads = []

        def eight_queued() -> bool:
            running[len(reads) % 4].read()
            reads.append(1)
            return server.metric("attnserve_requests_waiting") == 8

        wait_until(eight_queued, 30, lambda: f"{server.metric('attnserve_requests_waiting')} of 8 requests queued")
        assert server.metric("attnserve_requests_finished_total") == 0  # 4 slots held, 8 queued, none finished

        server.process.send_signal(15)
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(service="attnserve.v1.Generation"), timeout=5)
                   .status == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "health never turned NOT_SERVING")
        with pytest.raises(grpc.RpcError) as info:  # new work is refused while draining
            stub.Generate(build_request(prompt_token_ids=[1, 2], max_new_tokens=2), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # Still draining: nothing has finished, nothing can until the held streams are read.
        assert server.metric("attnserve_requests_finished_total") == 0 and server.process.poll() is None

        for stream in running:  # the accepted requests finish in full, the running and the queued ones
            assert stream.finish().tokens == 600 and stream.finish_reason == pb.FINISH_REASON_LENGTH
        assert all(len(f.result().token_ids) == 300 for f in queued)
    finally:
        for stream in running:
            stream.close()
    assert server.process.wait(60) == 0
    assert any("stopped" in line for line in server.log)
