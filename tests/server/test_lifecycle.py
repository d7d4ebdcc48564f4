"""Deadlines, graceful shutdown and health: what an orchestrator relies on."""
from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.client import build_request


def test_deadline_cancels_and_frees_the_slot(test_server):
    stub = test_server.stub()
    with pytest.raises(grpc.RpcError) as info:
        # 50 ms: the test model can generate 1000 tokens in under 200 ms on a quiet machine.
        stub.Generate(build_request(prompt_token_ids=[3, 4, 5], max_new_tokens=1000, ignore_eos=True), timeout=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert test_server.wait_for_metric("attnserve_kv_slots_in_use", 0) == 0
    assert test_server.metric("attnserve_requests_finished_total", 'finish_reason="cancelled"') >= 1


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
    server = server_process(test_model_dir, "--kv-slots", "4", "--max-seq-len", "1024", "--drain-grace-seconds", "60")
    stub = server.stub()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    requests = [build_request(prompt_token_ids=[7 + i, 8, 9], max_new_tokens=300, ignore_eos=True) for i in range(12)]
    futures = [stub.Generate.future(r, timeout=120) for r in requests]
    deadline = time.monotonic() + 30
    while server.metric("attnserve_requests_running") < 4:  # accepted and running; the rest are queued
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.process.send_signal(15)
    time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as info:  # new work is refused while draining
        stub.Generate(build_request(prompt_token_ids=[1, 2], max_new_tokens=2), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
    results = [f.result() for f in futures]
    assert all(len(r.token_ids) == 300 for r in results)
    assert server.process.wait(60) == 0
    assert any("stopped" in line for line in server.log)
