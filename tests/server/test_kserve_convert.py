"""The KServe v2 edge's pure translation (server/kserve_convert.py): tensors and parameters in, responses out.

The service itself, driven by Triton's client against a real server, is tests/server/test_kserve.py.
"""
from __future__ import annotations

import struct

import grpc
import pytest

from inference import grpc_service_pb2 as pb
from server import kserve_convert as convert
from server.errors import InvalidRequestError, to_status
from server.types import FinishReason, GenerationUpdate, RequestFields

Tensor = pb.ModelInferRequest.InferInputTensor


def raw_request(text: bytes = b"The capital of", **tensors) -> pb.ModelInferRequest:
    """As tritonclient sends a request: every input's data in raw_input_contents."""
    message = pb.ModelInferRequest(model_name="test", id="r1")
    message.inputs.append(Tensor(name="text_input", datatype="BYTES", shape=[1]))
    message.raw_input_contents.append(convert.encode_bytes_elements([text]))
    for name, (datatype, raw, shape) in tensors.items():
        message.inputs.append(Tensor(name=name, datatype=datatype, shape=shape))
        message.raw_input_contents.append(raw)
    return message


def invalid(message) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as error:
        convert.request_fields(message)
    return error.value


def test_bytes_elements_round_trip_and_truncated_data_is_refused():
    elements = [b"", b"hello", "caf\u00e9".encode(), bytes(range(256))]
    raw = convert.encode_bytes_elements(elements)
    assert raw[:4] == b"\x00\x00\x00\x00" and raw[4:8] == struct.pack("<I", 5)
    assert convert.decode_bytes_elements(raw, "x") == elements
    with pytest.raises(InvalidRequestError, match="x: raw BYTES data ends inside"):
        convert.decode_bytes_elements(b"\x05\x00", "x")
    with pytest.raises(InvalidRequestError, match="runs past"):
        convert.decode_bytes_elements(struct.pack("<I", 9) + b"abc", "x")


def test_raw_and_typed_contents_and_parameters_give_the_same_fields():
    expected = RequestFields(prompt="The capital of", max_new_tokens=12, temperature=0.5, top_k=40, top_p=0.9,
                             seed=7, stop=("\n", "."), ignore_eos=True, request_id="r1")
    raw = raw_request(max_tokens=("INT32", struct.pack("<i", 12), [1]),
                      temperature=("FP32", struct.pack("<f", 0.5), [1]),
                      top_k=("INT64", struct.pack("<q", 40), [1, 1]),
                      top_p=("FP64", struct.pack("<d", 0.9), [1]),
                      seed=("UINT64", struct.pack("<Q", 7), [1]),
                      stop=("BYTES", convert.encode_bytes_elements([b"\n", b"."]), [2]),
                      ignore_eos=("BOOL", b"\x01", [1]))
    assert convert.request_fields(raw) == expected

    typed = pb.ModelInferRequest(model_name="test", id="r1", inputs=[
        Tensor(name="text_input", datatype="BYTES", shape=[1],
               contents=pb.InferTensorContents(bytes_contents=[b"The capital of"])),
        Tensor(name="max_tokens", datatype="INT32", shape=[1], contents=pb.InferTensorContents(int_contents=[12])),
        Tensor(name="temperature", datatype="FP64", shape=[1], contents=pb.InferTensorContents(fp64_contents=[0.5])),
        Tensor(name="top_k", datatype="UINT32", shape=[1], contents=pb.InferTensorContents(uint_contents=[40])),
        Tensor(name="top_p", datatype="FP64", shape=[1], contents=pb.InferTensorContents(fp64_contents=[0.9])),
        Tensor(name="seed", datatype="INT64", shape=[1], contents=pb.InferTensorContents(int64_contents=[7])),
        Tensor(name="stop", datatype="BYTES", shape=[1, 2],
               contents=pb.InferTensorContents(bytes_contents=[b"\n", b"."])),
        Tensor(name="ignore_eos", datatype="BOOL", shape=[1], contents=pb.InferTensorContents(bool_contents=[True])),
    ])
    assert convert.request_fields(typed) == expected

    as_parameters = raw_request()
    parameters = as_parameters.parameters
    parameters["max_tokens"].int64_param = 12
    parameters["temperature"].double_param = 0.5
    parameters["top_k"].uint64_param = 40
    parameters["top_p"].double_param = 0.9
    parameters["seed"].int64_param = 7
    parameters["ignore_eos"].bool_param = True
    parameters[convert.EMPTY_FINAL_RESPONSE].bool_param = True  # read by the servicer, not a sampling setting
    assert convert.request_fields(as_parameters) == RequestFields(
        prompt="The capital of", max_new_tokens=12, temperature=0.5, top_k=40, top_p=0.9, seed=7, ignore_eos=True,
        request_id="r1")
    assert convert.wants_empty_final_response(as_parameters)
    as_parameters.parameters["stop"].string_param = "\n"
    assert convert.request_fields(as_parameters).stop == ("\n",)


def test_an_integer_temperature_parameter_is_a_temperature():
    # tritonclient sends `temperature=0` as int64_param: Python's 0 is an int.
    message = raw_request()
    message.parameters["temperature"].int64_param = 0
    assert convert.request_fields(message).temperature == 0.0


@pytest.mark.parametrize("change, field, words", [
    (lambda m: (m.inputs.append(Tensor(name="prompt", datatype="BYTES", shape=[1])), m.raw_input_contents.append(b"")),
     "prompt", "not an input"),
    (lambda m: setattr(m.inputs[0], "datatype", "INT32"), "text_input", "datatype is 'INT32'"),
    (lambda m: m.inputs[0].shape.__setitem__(0, 2), "text_input", "holds 2 elements but the data has 1"),
    (lambda m: m.inputs[0].shape.__setitem__(0, -1), "text_input", "negative dimension"),
    (lambda m: m.raw_input_contents.__setitem__(0, convert.encode_bytes_elements([b"\xff\xfe"])),
     "text_input", "not valid UTF-8"),
    (lambda m: m.raw_input_contents.append(b"extra"), "raw_input_contents", "2 entries for 1 inputs"),
    (lambda m: m.parameters["bogus"].bool_param, "bogus", "not a parameter"),
    (lambda m: setattr(m.parameters["temperature"], "string_param", "hot"), "temperature", "string_param"),
    (lambda m: setattr(m.parameters["max_tokens"], "int64_param", -1), "max_tokens", "must be >= 0"),
    (lambda m: setattr(m.parameters["seed"], "int64_param", -5), "seed", "must be >= 0"),
    (lambda m: setattr(m.parameters["ignore_eos"], "int64_param", 1), "ignore_eos", "bool_param"),
    (lambda m: m.outputs.add(name="logits"), "logits", "not an output"),
])
def test_bad_tensors_and_parameters_are_refused_by_name(change, field, words):
    message = raw_request()
    change(message)
    error = invalid(message)
    assert error.field == field and words in str(error), str(error)
    assert to_status(error)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_what_only_the_request_as_a_whole_can_get_wrong():
    assert invalid(pb.ModelInferRequest(model_name="test")).field == "text_input"  # no prompt at all
    batch = raw_request()
    batch.inputs[0].shape[:] = [2]
    batch.raw_input_contents[0] = convert.encode_bytes_elements([b"a", b"b"])
    assert "one prompt per request" in str(invalid(batch))
    twice = raw_request(max_tokens=("INT32", struct.pack("<i", 4), [1]))
    twice.parameters["max_tokens"].int64_param = 4
    assert "both as a parameter and as an input tensor" in str(invalid(twice))
    mixed = raw_request()
    mixed.inputs[0].contents.bytes_contents.append(b"typed too")
    assert "send one or the other" in str(invalid(mixed))
    scalar = raw_request(top_k=("INT32", struct.pack("<ii", 1, 2), [2]))
    assert invalid(scalar).field == "top_k"
    ragged = raw_request(temperature=("FP32", b"\x00\x00\x80", [1]))
    assert "not a whole number of FP32 elements" in str(invalid(ragged))


def test_native_check_errors_get_this_protocols_names():
    renamed = convert.kserve_error(InvalidRequestError(
        "max_new_tokens", "the prompt's 9 tokens plus max_new_tokens 2000 exceed the context of 1024 tokens"))
    assert renamed.field == "max_tokens" and str(renamed).startswith("max_tokens: the text_input's 9 tokens plus "
                                                                     "max_tokens 2000")
    assert convert.kserve_error(InvalidRequestError("sampling.temperature", "must be >= 0")).field == "temperature"
    assert convert.kserve_error(InvalidRequestError("sampling.seed", "x")).field == "seed"
    assert convert.kserve_error(InvalidRequestError("stop[1]", "is empty")).field == "stop"
    assert convert.kserve_error(InvalidRequestError("request_id", "is 300 characters")).field == "id"


def test_unknown_models_and_versions_are_not_found():
    convert.check_model("test", "", "test")
    convert.check_model("test", "1", "test")
    for name, version in (("other", ""), ("test", "2")):
        with pytest.raises(convert.ModelNotFoundError) as error:
            convert.check_model(name, version, "test")
        assert to_status(error.value)[0] == grpc.StatusCode.NOT_FOUND


def test_responses_carry_text_output_by_position_and_mark_the_final_one():
    update = GenerationUpdate(token_ids=(5, 6), text="Paris.", finish_reason=FinishReason.EOS, prompt_tokens=4,
                              completion_tokens=2)
    response = convert.infer_response("test", "r1", update, final=True)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("text_output", "BYTES", [1])]
    assert convert.decode_bytes_elements(response.raw_output_contents[0], "text_output") == [b"Paris."]
    assert response.parameters["triton_final_response"].bool_param is True
    assert response.parameters["finish_reason"].string_param == "eos"
    assert response.parameters["completion_tokens"].int64_param == 2
    chunk = convert.infer_response("test", "r1", GenerationUpdate(token_ids=(5,), text="Par"), final=False)
    assert chunk.parameters["triton_final_response"].bool_param is False and "finish_reason" not in chunk.parameters
    assert "triton_final_response" not in convert.infer_response("test", "", update).parameters  # unary
    empty = convert.empty_final_response("test", "r1")
    assert not empty.outputs and empty.parameters["triton_final_response"].bool_param


def test_model_metadata_lists_the_prompt_the_settings_and_the_output():
    metadata = convert.model_metadata("test")
    assert metadata.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs][:2] == [
        ("text_input", "BYTES", [1]), ("max_tokens", "INT32", [1])]
    assert {t.name for t in metadata.inputs} == set(convert.INPUT_NAMES)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("text_output", "BYTES", [1])]
