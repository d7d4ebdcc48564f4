"""The KServe v2 edge: Open Inference Protocol tensors and parameters in, RequestFields out; responses back.

    ModelInferRequest ─► named inputs and parameters ─► RequestFields ─► server/requests.py (native checks)
    GenerationUpdate(s) ─► ModelInferResponse: `text_output` BYTES [1], read by position

The model takes one prompt per request, `text_input` (BYTES, one element), and
the sampling settings Triton's LLM backends name, each either a request
parameter or a one-element input tensor: max_tokens, temperature, top_k,
top_p, seed, stop (BYTES, any number of elements; as a parameter, one string)
and ignore_eos. Tensor data comes typed (`contents`) or raw
(`raw_input_contents`, one entry per input, little-endian; a BYTES element is
a 4-byte little-endian length, then its bytes). Only what is wrong with the
tensors themselves is checked here; values go through the same checks as the
native API, whose error messages are renamed to these names (`kserve_error`).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import grpc
import numpy as np

from inference import grpc_service_pb2 as pb
from server.errors import AttnserveError, InvalidRequestError
from server.http_errors import translate
from server.types import GenerationUpdate, RequestFields

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
MODEL_VERSION = "1"  # the one version served; an empty version means it too
PLATFORM = "attnserve"
FINAL_RESPONSE = "triton_final_response"  # set on every streamed response, true on a request's last
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"  # the client wants the final flag on its own response

_INTEGERS = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
_FLOATS = ("FP32", "FP64")
# Raw little-endian layout of each fixed-size datatype, and the typed-contents field that carries it.
_RAW_DTYPES = {"BOOL": "<?", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "UINT8": "<u1",
               "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "FP32": "<f4", "FP64": "<f8"}
_CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                   "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


@dataclass(frozen=True)
class Setting:
    """One optional input: the tensor datatypes it accepts, what ModelMetadata advertises, its kind of value."""

    name: str
    kind: str  # "int", "float", "bool" or "strings"
    datatypes: tuple[str, ...]
    advertised: str
    shape: tuple[int, ...] = (1,)


SETTINGS = {s.name: s for s in (
    Setting("max_tokens", "int", _INTEGERS, "INT32"),
    Setting("temperature", "float", _FLOATS, "FP32"),
    Setting("top_k", "int", _INTEGERS, "INT32"),
    Setting("top_p", "float", _FLOATS, "FP32"),
    Setting("seed", "int", _INTEGERS, "UINT64"),
    Setting("stop", "strings", ("BYTES",), "BYTES", (-1,)),
    Setting("ignore_eos", "bool", ("BOOL",), "BOOL"),
)}
INPUT_NAMES = (TEXT_INPUT, *SETTINGS)

# The native checks' field names (server/validation.py) as a KServe client named them.
_FIELD_NAMES = {"prompt": TEXT_INPUT, "max_new_tokens": "max_tokens", "sampling.seed": "seed", "request_id": "id"}


class ModelNotFoundError(AttnserveError):
    """A model name or version this server does not serve."""

    code = grpc.StatusCode.NOT_FOUND


def kserve_error(error: InvalidRequestError) -> InvalidRequestError:
    """A native check's error with this protocol's names: `max_new_tokens` -> `max_tokens`, `prompt` -> `text_input`."""
    return translate(error, _FIELD_NAMES)


def check_model(name: str, version: str, served_name: str) -> None:
    if name != served_name:
        raise ModelNotFoundError(f"model `{name[:100]}` is not served here; this server serves `{served_name}`")
    if version not in ("", MODEL_VERSION):
        raise ModelNotFoundError(f"model `{served_name}` has no version `{version[:100]}`; "
                                 f"its only version is {MODEL_VERSION}")


# ---- BYTES elements ------------------------------------------------------------------------------


def decode_bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """The elements of a raw BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequestError(name, f"raw BYTES data ends inside an element's 4-byte length (at byte {offset})")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidRequestError(name, f"raw BYTES element of {length} bytes runs past the data's "
                                            f"{len(raw)} bytes")
        elements.append(bytes(raw[offset:offset + length]))
        offset += length
    return elements


def encode_bytes_elements(elements: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# ---- the request ---------------------------------------------------------------------------------


def _element_count(tensor: pb.ModelInferRequest.InferInputTensor) -> int:
    if any(d < 0 for d in tensor.shape):
        raise InvalidRequestError(tensor.name, f"shape {list(tensor.shape)} has a negative dimension")
    return math.prod(tensor.shape)


def tensor_values(tensor: pb.ModelInferRequest.InferInputTensor, raw: Optional[bytes]) -> list:
    """A tensor's elements as Python values (bytes for BYTES), from raw data or typed contents."""
    name, datatype = tensor.name, tensor.datatype
    count = _element_count(tensor)
    if datatype == "BYTES":
        values = decode_bytes_elements(raw, name) if raw is not None else list(tensor.contents.bytes_contents)
    elif datatype in _RAW_DTYPES:
        if raw is None:
            values = list(getattr(tensor.contents, _CONTENTS_FIELD[datatype]))
        else:
            itemsize = np.dtype(_RAW_DTYPES[datatype]).itemsize
            if len(raw) % itemsize:
                raise InvalidRequestError(name, f"raw data of {len(raw)} bytes is not a whole number of "
                                                f"{datatype} elements ({itemsize} bytes each)")
            values = np.frombuffer(raw, dtype=_RAW_DTYPES[datatype]).tolist()
    else:
        raise InvalidRequestError(name, f"datatype {datatype[:20]!r} is not one this server reads")
    if len(values) != count:
        raise InvalidRequestError(name, f"shape {list(tensor.shape)} holds {count} elements but the data has "
                                        f"{len(values)}")
    return values


def _input_value(tensor: pb.ModelInferRequest.InferInputTensor, raw: Optional[bytes]):
    """The value of a named input tensor, checked for datatype and shape."""
    name = tensor.name
    setting = SETTINGS.get(name)
    accepted = ("BYTES",) if setting is None else setting.datatypes
    if tensor.datatype not in accepted:
        raise InvalidRequestError(name, f"datatype is {tensor.datatype[:20]!r}; this input takes "
                                        f"{' or '.join(accepted)}")
    values = tensor_values(tensor, raw)
    if setting is not None and setting.kind == "strings":
        return tuple(_text(v, name) for v in values)
    if len(values) != 1:
        raise InvalidRequestError(name, f"shape {list(tensor.shape)} holds {len(values)} elements; this input "
                                        "takes exactly one (shape [1]): one prompt per request")
    if setting is None:
        return _text(values[0], name)
    return _checked(setting, values[0])


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(name, "is not valid UTF-8") from None


def _parameter_value(name: str, parameter: pb.InferParameter):
    """The value of a request parameter, checked for type."""
    choice = parameter.WhichOneof("parameter_choice")
    if name not in SETTINGS:
        raise InvalidRequestError(name, f"is not a parameter this server knows; it takes {', '.join(SETTINGS)}")
    setting = SETTINGS[name]
    expected = {"int": ("int64_param", "uint64_param"), "float": ("double_param", "int64_param", "uint64_param"),
                "bool": ("bool_param",), "strings": ("string_param",)}[setting.kind]
    if choice not in expected:
        raise InvalidRequestError(name, f"is a {choice or 'parameter with no value'}; this parameter takes "
                                        f"{' or '.join(expected)}")
    value = getattr(parameter, choice)
    return (value,) if setting.kind == "strings" else _checked(setting, value)


def _checked(setting: Setting, value):
    """What the native API's protobuf types guarantee before its checks run: sign and range."""
    if setting.kind == "int":
        value = int(value)
        if value < 0 or value >= 2 ** (64 if setting.name == "seed" else 31):
            raise InvalidRequestError(setting.name, f"is {value}; it must be >= 0 and fit in "
                                                    f"{'64' if setting.name == 'seed' else '31'} bits")
    elif setting.kind == "float":
        value = float(value)
    else:
        value = bool(value)
    return value


def request_fields(message: pb.ModelInferRequest) -> RequestFields:
    """What a ModelInferRequest asks for, its tensors and parameters checked; values are checked later."""
    if message.raw_input_contents and len(message.raw_input_contents) != len(message.inputs):
        raise InvalidRequestError("raw_input_contents", f"has {len(message.raw_input_contents)} entries for "
                                                        f"{len(message.inputs)} inputs; send one per input")
    values: dict = {}
    for index, tensor in enumerate(message.inputs):
        if tensor.name not in INPUT_NAMES:
            raise InvalidRequestError(tensor.name[:100] or "inputs", f"is not an input of this model; its inputs "
                                                                     f"are {', '.join(INPUT_NAMES)}")
        if tensor.name in values:
            raise InvalidRequestError(tensor.name, "is given twice")
        if message.raw_input_contents and tensor.HasField("contents"):
            raise InvalidRequestError(tensor.name, "has typed contents while the request sends raw_input_contents; "
                                                   "send one or the other")
        raw = message.raw_input_contents[index] if message.raw_input_contents else None
        values[tensor.name] = _input_value(tensor, raw)
    for name, parameter in message.parameters.items():
        if name == EMPTY_FINAL_RESPONSE:
            continue  # how to mark a stream's end: the servicer reads it
        if name in values:
            raise InvalidRequestError(name, "is given both as a parameter and as an input tensor; send one")
        values[name] = _parameter_value(name, parameter)
    for requested in message.outputs:
        if requested.name != TEXT_OUTPUT:
            raise InvalidRequestError(requested.name[:100] or "outputs", f"is not an output of this model; its only "
                                                                         f"output is {TEXT_OUTPUT}")
    if TEXT_INPUT not in values:
        raise InvalidRequestError(TEXT_INPUT, "is missing; send the prompt as a BYTES input of shape [1]")
    return RequestFields(
        prompt=values[TEXT_INPUT],
        max_new_tokens=values.get("max_tokens", 0),
        temperature=values.get("temperature", 0.0),
        top_k=values.get("top_k", 0),
        top_p=values.get("top_p"),
        seed=values.get("seed"),
        stop=values.get("stop", ()),
        ignore_eos=values.get("ignore_eos", False),
        request_id=message.id,
    )


def wants_empty_final_response(message: pb.ModelInferRequest) -> bool:
    parameter = message.parameters.get(EMPTY_FINAL_RESPONSE)
    return parameter is not None and parameter.WhichOneof("parameter_choice") == "bool_param" and parameter.bool_param


# ---- the responses -------------------------------------------------------------------------------


def infer_response(model_name: str, request_id: str, update: GenerationUpdate,
                   final: Optional[bool] = None) -> pb.ModelInferResponse:
    """The text of `update` as `text_output`; with its ending and usage once finished. `final` (streams only)
    sets triton_final_response."""
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=MODEL_VERSION, id=request_id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])],
        raw_output_contents=[encode_bytes_elements([update.text.encode("utf-8")])],
    )
    if final is not None:
        response.parameters[FINAL_RESPONSE].bool_param = final
    if update.finish_reason is not None:
        response.parameters["finish_reason"].string_param = update.finish_reason.value
        response.parameters["prompt_tokens"].int64_param = update.prompt_tokens
        response.parameters["completion_tokens"].int64_param = update.completion_tokens
    return response


def empty_final_response(model_name: str, request_id: str) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=MODEL_VERSION, id=request_id)
    response.parameters[FINAL_RESPONSE].bool_param = True
    return response


def model_metadata(served_name: str) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=served_name, versions=[MODEL_VERSION], platform=PLATFORM,
        inputs=[tensor(name=TEXT_INPUT, datatype="BYTES", shape=[1])]
        + [tensor(name=s.name, datatype=s.advertised, shape=list(s.shape)) for s in SETTINGS.values()],
        outputs=[tensor(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])],
    )

