"""Drives a server with Triton's own client, `tritonclient.grpc`, in a process of its own; the KServe tests run it.

tritonclient's generated code registers the protocol's messages (`inference.ModelInferRequest`, ...) in
protobuf's default descriptor pool, and so does attnserve's: one process cannot import both. So the tests
run this script, which imports only tritonclient, with a JSON list of calls, and read one JSON result per call:

    python tests/server/kserve_tritonclient.py TARGET '[{"op": "infer", "model": "test", "text": "hi", ...}]'

Ops: live, ready, model_ready, server_metadata, model_metadata, infer, stream, descriptors. A call that
raises answers {"error": {"status": "StatusCode.INVALID_ARGUMENT", "message": ...}}. An infer's result lists
every output tensor the server sent, in its order ("outputs": [{"name", "datatype", "shape", "value"}]); a
BYTES input takes its elements as text ("value") or as base64 ("base64", e.g. PNG files).
"""
from __future__ import annotations

import base64
import json
import queue
import sys

import numpy as np


def _inputs(call: dict, grpcclient, np_dtype):
    """text_input from `text`, then any other `inputs`: [{"name", "datatype", "shape", "value": [...]}]."""
    tensors = []
    specs = ([{"name": "text_input", "datatype": "BYTES", "shape": [1], "value": [call["text"]]}]
             if "text" in call else []) + call.get("inputs", [])
    for spec in specs:
        tensor = grpcclient.InferInput(spec["name"], spec["shape"], spec["datatype"])
        if spec["datatype"] == "BYTES" and "base64" in spec:
            data = np.array([base64.b64decode(v) for v in spec["base64"]], dtype=np.object_)
        elif spec["datatype"] == "BYTES":
            data = np.array([v.encode() for v in spec["value"]], dtype=np.object_)
        else:
            data = np.array(spec["value"], dtype=np_dtype(spec["datatype"]))
        tensor.set_data_from_numpy(data.reshape(spec["shape"]))
        tensors.append(tensor)
    return tensors


def _outputs(call: dict, grpcclient):
    return [grpcclient.InferRequestedOutput(name) for name in call["outputs"]] if "outputs" in call else None


def _result(result) -> dict:
    response = result.get_response()
    parameters = {key: getattr(value, value.WhichOneof("parameter_choice"))
                  for key, value in response.parameters.items()}
    text = result.as_numpy("text_output")
    outputs = []
    for output in response.outputs:
        values = result.as_numpy(output.name)
        outputs.append({"name": output.name, "datatype": output.datatype, "shape": list(values.shape),
                        "value": [v.decode() for v in values.reshape(-1)] if output.datatype == "BYTES"
                        else values.reshape(-1).tolist()})
    return {"id": response.id, "model_name": response.model_name, "model_version": response.model_version,
            "text": None if text is None or text.size == 0 else b"".join(text.reshape(-1)).decode(),
            "shape": None if text is None else list(text.shape), "parameters": parameters, "outputs": outputs}


def _stream(client, call: dict, grpcclient, np_dtype) -> dict:
    """Send every request of `requests` on one stream; collect the responses (and errors) as they come.
    With `cancel_after` n: cancel the stream once n responses came."""
    arrived: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: arrived.put((result, error)))
    for request in call["requests"]:
        client.async_stream_infer(call.get("model", "test"), _inputs(request, grpcclient, np_dtype),
                                  request_id=request.get("id", ""), parameters=request.get("parameters"),
                                  outputs=_outputs(request, grpcclient),
                                  enable_empty_final_response=request.get("empty_final", False))
    responses, finals, expected = [], 0, len(call["requests"])
    while finals < expected and len(responses) < call.get("cancel_after", 10 ** 6):
        result, error = arrived.get(timeout=call.get("timeout", 60))
        if error is not None:
            responses.append({"error": error.message()})
            finals += 1
            continue
        responses.append(_result(result))
        finals += bool(responses[-1]["parameters"].get("triton_final_response"))
    client.stop_stream(cancel_requests="cancel_after" in call)
    return {"responses": responses}


def _descriptors() -> dict:
    """Every message of tritonclient's grpc_service.proto: {full name: {field: [number, type, label, type name]}}."""
    from tritonclient.grpc import service_pb2

    messages = {}

    def visit(message):
        messages[message.full_name] = {
            f.name: [f.number, f.type, "repeated" if f.is_repeated else "optional",
                     f.message_type.full_name if f.message_type else ""]
            for f in message.fields}
        messages[message.full_name]["oneofs"] = {o.name: [f.name for f in o.fields] for o in message.oneofs}
        for nested in message.nested_types:
            visit(nested)

    for message in service_pb2.DESCRIPTOR.message_types_by_name.values():
        visit(message)
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
               for m in service.methods}
    return {"messages": messages, "methods": methods, "service": service.full_name}


def run(target: str, calls: list[dict]) -> list[dict]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException, triton_to_np_dtype

    client = grpcclient.InferenceServerClient(target)
    results = []
    for call in calls:
        op, model, version = call["op"], call.get("model", "test"), call.get("version", "")
        headers = call.get("headers")  # e.g. {"authorization": "Bearer KEY"}
        try:
            if op == "live":
                results.append({"value": client.is_server_live()})
            elif op == "ready":
                results.append({"value": client.is_server_ready(headers=headers)})
            elif op == "model_ready":
                results.append({"value": client.is_model_ready(model, version)})
            elif op == "server_metadata":
                results.append({"value": client.get_server_metadata(as_json=True)})
            elif op == "model_metadata":
                results.append({"value": client.get_model_metadata(model, version, as_json=True)})
            elif op == "repository_index":
                results.append({"value": client.get_model_repository_index(as_json=True)})
            elif op == "infer":
                result = client.infer(model, _inputs(call, grpcclient, triton_to_np_dtype), model_version=version,
                                      outputs=_outputs(call, grpcclient), request_id=call.get("id", ""),
                                      parameters=call.get("parameters"), client_timeout=call.get("timeout", 60),
                                      headers=headers)
                results.append(_result(result))
            elif op == "stream":
                results.append(_stream(client, call, grpcclient, triton_to_np_dtype))
            elif op == "descriptors":
                results.append(_descriptors())
            else:
                raise ValueError(f"unknown op {op}")
        except InferenceServerException as e:
            results.append({"error": {"status": e.status(), "message": e.message()}})
    client.close()
    return results


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], json.loads(sys.argv[2]))))
