"""KServe v2 (the Open Inference Protocol) on the gRPC port, driven by Triton's own client, `tritonclient.grpc`.

tritonclient and attnserve's generated code register the same protobuf names, so the client runs in a
process of its own (tests/server/kserve_tritonclient.py) against a real server; what it answers must
equal the native API's answers to the same requests. The pure translation is tests/server/test_kserve_convert.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc as kpb_grpc
from server.client import AttnserveClient
from server.kserve_convert import decode_bytes_elements
from tests.server.helpers import ROOT, InProcessServer, queue_held_full, wait_until

DRIVER = ROOT / "tests" / "server" / "kserve_tritonclient.py"
FLAGS = ("--kv-slots", "4", "--max-seq-len", "1024", "--max-new-tokens-limit", "1000")
PROMPT = "def fibonacci(n):\n    "
PROMPT_IDS = [5, 17, 42, 9, 88, 3, 21]


def triton(target: str, *calls: dict, timeout: float = 120) -> list[dict]:
    """Run the calls with tritonclient in its own process; one result per call."""
    done = subprocess.run([sys.executable, str(DRIVER), target, json.dumps(list(calls))], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def status_of(result: dict) -> str:
    """The status a failed call ended with, as tritonclient reports it (StatusCode.NOT_FOUND -> NOT_FOUND)."""
    assert "error" in result, result
    return result["error"]["status"].removeprefix("StatusCode.")


@pytest.fixture(scope="module")
def server(test_model_dir, server_class):
    server = server_class(test_model_dir, *FLAGS)
    yield server
    server.stop()


def native(server, **request):
    with AttnserveClient(server.target, timeout=60) as client:
        return client.generate(**request)


# ---- the protocol itself -------------------------------------------------------------------------


def test_every_declared_message_and_rpc_matches_tritonclients_descriptors():
    (theirs,) = triton("127.0.0.1:1", {"op": "descriptors"})  # reads descriptors only: no server needed
    ours = kpb.DESCRIPTOR
    assert ours.package == "inference"
    checked = []

    def compare(message):
        assert message.full_name in theirs["messages"], f"{message.full_name} is not in Triton's grpc_service.proto"
        fields = theirs["messages"][message.full_name]
        for field in message.fields:
            kind = field.message_type.full_name if field.message_type else ""
            label = "repeated" if field.is_repeated else "optional"
            assert fields.get(field.name) == [field.number, field.type, label, kind], \
                f"{message.full_name}.{field.name}: ours {[field.number, field.type, label, kind]}, " \
                f"Triton's {fields.get(field.name)}"
            checked.append(f"{message.full_name}.{field.name}")
        assert {o.name: [f.name for f in o.fields] for o in message.oneofs} == fields["oneofs"]
        for nested in message.nested_types:
            compare(nested)

    for message in ours.message_types_by_name.values():
        compare(message)
    service = ours.services_by_name["GRPCInferenceService"]
    assert service.full_name == theirs["service"] == "inference.GRPCInferenceService"
    for method in service.methods:
        assert theirs["methods"][method.name] == [method.input_type.full_name, method.output_type.full_name,
                                                  method.client_streaming, method.server_streaming], method.name
    assert len(checked) > 60 and "inference.InferParameter.double_param" in checked


def test_liveness_readiness_and_metadata(server):
    live, ready, model_ready, unknown, wrong_version, server_metadata, metadata = triton(
        server.target, {"op": "live"}, {"op": "ready"}, {"op": "model_ready"}, {"op": "model_ready", "model": "nope"},
        {"op": "model_ready", "version": "7"}, {"op": "server_metadata"}, {"op": "model_metadata"})
    assert live["value"] is True and ready["value"] is True and model_ready["value"] is True
    assert status_of(unknown) == "NOT_FOUND" and "nope" in unknown["error"]["message"]
    assert status_of(wrong_version) == "NOT_FOUND"
    assert server_metadata["value"]["name"] == "attnserve"
    metadata = metadata["value"]
    assert metadata["name"] == "test" and metadata["versions"] == ["1"]
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]}
    assert inputs["text_input"] == ("BYTES", ["1"]) and inputs["temperature"] == ("FP32", ["1"])
    assert set(inputs) == {"text_input", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos"}
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [("text_output", "BYTES", ["1"])]


def test_reflection_lists_and_describes_the_service(server):
    """What grpcurl needs to call the service with no .proto file at hand."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    assert "inference.GRPCInferenceService" in {s.name for s in listed.list_services_response.service}
    assert described.file_descriptor_response.file_descriptor_proto  # the serialized grpc_service.proto


def test_greedy_and_seeded_answers_equal_the_native_apis(server):
    sampled = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 11}
    as_parameters, as_tensors, seeded = triton(
        server.target,
        {"op": "infer", "text": PROMPT, "id": "greedy-1", "parameters": {"max_tokens": 24, "ignore_eos": True}},
        {"op": "infer", "text": PROMPT, "outputs": ["text_output"], "inputs": [
            {"name": "max_tokens", "datatype": "INT32", "shape": [1], "value": [24]},
            {"name": "ignore_eos", "datatype": "BOOL", "shape": [1], "value": [True]}]},
        {"op": "infer", "text": PROMPT, "parameters": {"max_tokens": 24, **sampled}})
    greedy = native(server, prompt=PROMPT, max_new_tokens=24, ignore_eos=True)
    assert as_parameters["text"] == as_tensors["text"] == greedy.text and greedy.text
    assert as_parameters["id"] == "greedy-1" and as_parameters["model_version"] == "1"
    assert as_parameters["shape"] == [1]
    assert as_parameters["parameters"]["completion_tokens"] == len(greedy.token_ids) == 24
    assert as_parameters["parameters"]["finish_reason"] == "length"
    native_seeded = native(server, prompt=PROMPT, max_new_tokens=24, **sampled)
    assert seeded["text"] == native_seeded.text
    assert seeded["parameters"]["completion_tokens"] == len(native_seeded.token_ids)


def test_a_stream_answers_each_request_in_chunks_under_its_id(server):
    requests = [{"id": "a", "text": PROMPT, "parameters": {"max_tokens": 128, "ignore_eos": True}},
                {"id": "b", "text": "import os\n", "parameters": {"max_tokens": 16, "ignore_eos": True},
                 "empty_final": True},
                {"id": "c", "text": PROMPT, "parameters": {"temperature": -1.0}}]
    (streamed,) = triton(server.target, {"op": "stream", "requests": requests})
    responses = streamed["responses"]
    errors = [r["error"] for r in responses if "error" in r]
    assert len(errors) == 1 and "request c" in errors[0] and "[INVALID_ARGUMENT] temperature: " in errors[0]
    for request in requests[:2]:
        mine = [r for r in responses if r.get("id") == request["id"]]
        finals = [r["parameters"]["triton_final_response"] for r in mine]
        assert finals == [False] * (len(mine) - 1) + [True], (request["id"], finals)
        unary = native(server, prompt=request["text"], max_new_tokens=request["parameters"]["max_tokens"],
                       ignore_eos=True)
        assert "".join(r["text"] or "" for r in mine) == unary.text
        ended = [r for r in mine if "finish_reason" in r["parameters"]]
        assert [r["parameters"]["completion_tokens"] for r in ended] == [request["parameters"]["max_tokens"]]
    a = [r for r in responses if r.get("id") == "a"]
    assert len(a) >= 2, "128 tokens came back as one response, not streamed"
    b = [r for r in responses if r.get("id") == "b"]
    assert b[-1]["text"] is None and b[-1]["parameters"] == {"triton_final_response": True}  # asked for


def test_typed_contents_are_read_like_raw_contents(server):
    """tritonclient always sends raw_input_contents; other v2 clients send typed contents."""
    request = kpb.ModelInferRequest(model_name="test", inputs=[
        kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1, 1],
                                               contents=kpb.InferTensorContents(bytes_contents=[PROMPT.encode()])),
        kpb.ModelInferRequest.InferInputTensor(name="max_tokens", datatype="INT64", shape=[1],
                                               contents=kpb.InferTensorContents(int64_contents=[12]))])
    with grpc.insecure_channel(server.target) as channel:
        response = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    (text,) = decode_bytes_elements(response.raw_output_contents[0], "text_output")
    assert text.decode() == native(server, prompt=PROMPT, max_new_tokens=12).text


def test_bad_input_gets_invalid_argument_naming_it_and_an_unknown_model_not_found(server):
    results = triton(
        server.target,
        {"op": "infer", "text": PROMPT, "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1],
                                                    "value": ["x"]}]},
        {"op": "infer", "inputs": [{"name": "text_input", "datatype": "INT32", "shape": [1], "value": [3]}]},
        {"op": "infer", "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2], "value": ["a", "b"]}]},
        {"op": "infer", "text": PROMPT, "parameters": {"temperature": -0.5}},
        {"op": "infer", "text": PROMPT, "parameters": {"max_tokens": 5000}},
        {"op": "infer", "text": PROMPT, "parameters": {"beam_width": 2}},
        {"op": "infer", "text": PROMPT, "inputs": [{"name": "top_p", "datatype": "FP32", "shape": [1],
                                                    "value": [1.5]}]},
        {"op": "infer", "text": PROMPT, "outputs": ["logits"]},
        {"op": "infer", "text": PROMPT, "model": "gpt-5"},
        {"op": "infer", "text": PROMPT, "version": "2"},
    )
    named = ["prompt", "text_input", "text_input", "temperature", "max_tokens", "beam_width", "top_p", "logits"]
    for result, name in zip(results, named):
        assert status_of(result) == "INVALID_ARGUMENT", result
        assert result["error"]["message"].startswith(f"{name}: "), result
    assert "1000" in results[4]["error"]["message"]  # the limit, as the native API states it
    assert [status_of(r) for r in results[-2:]] == ["NOT_FOUND", "NOT_FOUND"]


# ---- the engine behind it ------------------------------------------------------------------------


def test_cancelling_a_stream_frees_its_kv_slot_and_requests_count_as_kserve(server):
    (streamed,) = triton(server.target, {"op": "stream", "cancel_after": 1, "requests": [
        {"id": "long", "text": PROMPT, "parameters": {"max_tokens": 900, "ignore_eos": True}}]})
    assert streamed["responses"][0]["parameters"]["triton_final_response"] is False
    wait_until(lambda: server.metric("attnserve_kv_slots_in_use") == 0, 30, "a cancelled stream kept its KV slot")
    wait_until(lambda: server.metric("attnserve_requests_finished_total",
                                     'finish_reason="cancelled",model="test",protocol="kserve"') >= 1,
               30, "the cancelled request was not counted under protocol kserve")
    assert server.metric("attnserve_requests_finished_total", 'protocol="kserve"') >= 2
    assert server.metric("attnserve_grpc_server_handled_total",
                         'grpc_code="OK",grpc_method="ModelInfer",grpc_service="inference.GRPCInferenceService"') >= 1


def test_a_full_queue_is_resource_exhausted(test_model_dir):
    server = InProcessServer(test_model_dir, kv_slots=1, max_queued_requests=1, max_seq_len=1024)
    try:
        with queue_held_full(server, PROMPT_IDS):
            (refused,) = triton(server.target, {"op": "infer", "text": PROMPT, "parameters": {"max_tokens": 4}})
            assert status_of(refused) == "RESOURCE_EXHAUSTED", refused
            assert server.metric("attnserve_requests_rejected_total", 'protocol="kserve",reason="queue_full"') == 1
    finally:
        server.stop()


def test_a_draining_server_reads_not_ready_and_refuses_with_unavailable(test_model_dir):
    server = InProcessServer(test_model_dir, kv_slots=1, max_seq_len=256)
    try:
        server.run(server.server.set_serving(False))  # what draining and a broken engine do first
        server.engine.begin_drain()
        ready, model_ready, live, refused = triton(
            server.target, {"op": "ready"}, {"op": "model_ready"}, {"op": "live"},
            {"op": "infer", "text": PROMPT, "parameters": {"max_tokens": 4}})
        assert ready["value"] is False and model_ready["value"] is False and live["value"] is True
        assert status_of(refused) == "UNAVAILABLE", refused
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop()


def test_api_keys_guard_the_service_like_the_native_one(test_model_dir, server_class):
    keyed = server_class(test_model_dir, *FLAGS, env={"ATTNSERVE_API_KEYS": "sekret"})
    try:
        missing, wrong, ready, answered = triton(
            keyed.target, {"op": "infer", "text": PROMPT, "parameters": {"max_tokens": 2}},
            {"op": "ready", "headers": {"authorization": "Bearer nope"}},
            {"op": "ready", "headers": {"authorization": "Bearer sekret"}},
            {"op": "infer", "text": PROMPT, "parameters": {"max_tokens": 2},
             "headers": {"authorization": "Bearer sekret"}})
        assert status_of(missing) == status_of(wrong) == "UNAUTHENTICATED"
        assert ready["value"] is True and answered["parameters"]["completion_tokens"] == 2
    finally:
        keyed.stop()
