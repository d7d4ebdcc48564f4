"""The KServe v2 edge: Open Inference Protocol tensors and parameters in, RequestFields out; responses back.

    ModelInferRequest ─► named inputs and parameters ─► RequestFields ─► server/requests.py (native checks)
    GenerationUpdate(s) ─► ModelInferResponse: `text_output` BYTES [1], read by position

Encoders and image classifiers take batches of texts or images and answer
tensors (the section "encoders and image classifiers" below):

    ModelInferRequest ─► EmbedInputs / ClassifyInputs ─► BatchedModel (server/encoders.py)
    vectors / probabilities ─► ModelInferResponse: EMBEDDINGS, or PROBABILITIES and LABEL

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
from typing import Optional, Sequence, Union

import numpy as np

from inference import grpc_service_pb2 as pb
from server.errors import InvalidRequestError, NotFoundError
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


class ModelNotFoundError(NotFoundError):
    """A model name or version this server does not serve."""


def kserve_error(error: InvalidRequestError) -> InvalidRequestError:
    """A native check's error with this protocol's names: `max_new_tokens` -> `max_tokens`, `prompt` -> `text_input`."""
    return translate(error, _FIELD_NAMES)


def check_model(name: str, version: str, served: Union[str, Sequence[str]]) -> None:
    """NOT_FOUND unless `name` is one of the served names (`served`: one name, or every one) at a version it has."""
    served = [served] if isinstance(served, str) else list(served)
    if name not in served:
        raise ModelNotFoundError(f"model `{name[:100]}` is not served here; this server serves "
                                 f"{', '.join(f'`{n}`' for n in served)}")
    if version not in ("", MODEL_VERSION):
        raise ModelNotFoundError(f"model `{name}` has no version `{version[:100]}`; "
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



# ---- encoders and image classifiers --------------------------------------------------------------
#
#   encoder:           TEXT BYTES [N] or [N, 1]                  -> EMBEDDINGS FP32 [N, D]
#                      parameter `truncate` (bool): cut texts longer than the model takes instead of refusing them
#   image classifier:  IMAGE BYTES [N] or [N, 1] (PNG or JPEG)  -> PROBABILITIES FP32 [N, labels]
#                      or PIXELS UINT8 [N, H, W, C] (C = 1 or 3)    LABEL BYTES [N] (the most probable label)
#
# N is at most the server's --max-inputs-per-request; images of any size are resized to the model's.

TEXT = "TEXT"
EMBEDDINGS = "EMBEDDINGS"
IMAGE = "IMAGE"
PIXELS = "PIXELS"
PROBABILITIES = "PROBABILITIES"
LABEL = "LABEL"
TRUNCATE = "truncate"
ENCODER_OUTPUTS = (EMBEDDINGS,)
CLASSIFIER_OUTPUTS = (PROBABILITIES, LABEL)
PIXEL_CHANNELS = (1, 3)
_BATCHED_FIELDS = {"texts": TEXT, "images": IMAGE}  # server/encoders.py's names for the inputs


@dataclass(frozen=True)
class EmbedInputs:
    texts: list[str]
    truncate: bool
    outputs: tuple[str, ...]  # in the order the response carries them


@dataclass(frozen=True)
class ClassifyInputs:
    images: list  # encoded PNG or JPEG bytes (IMAGE), or uint8 arrays [H, W, C] (PIXELS)
    encoded: bool
    outputs: tuple[str, ...]


def _named_tensors(message: pb.ModelInferRequest, accepted: dict[str, str]) -> dict:
    """{name: (tensor, raw data or None)} of a batched model's request, each name one it accepts
    (`accepted`: name -> datatype), once."""
    if message.raw_input_contents and len(message.raw_input_contents) != len(message.inputs):
        raise InvalidRequestError("raw_input_contents", f"has {len(message.raw_input_contents)} entries for "
                                                        f"{len(message.inputs)} inputs; send one per input")
    tensors: dict = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        if name not in accepted:
            raise InvalidRequestError(name[:100] or "inputs", f"is not an input of this model; its inputs are "
                                                              f"{', '.join(accepted)}")
        if name in tensors:
            raise InvalidRequestError(name, "is given twice")
        if tensor.datatype != accepted[name]:
            raise InvalidRequestError(name, f"datatype is {tensor.datatype[:20]!r}; this input takes {accepted[name]}")
        if message.raw_input_contents and tensor.HasField("contents"):
            raise InvalidRequestError(name, "has typed contents while the request sends raw_input_contents; "
                                            "send one or the other")
        tensors[name] = (tensor, message.raw_input_contents[index] if message.raw_input_contents else None)
    return tensors


def _requested_outputs(message: pb.ModelInferRequest, outputs: tuple[str, ...]) -> tuple[str, ...]:
    """The outputs asked for, in the request's order; all of the model's when none is named (as Triton does)."""
    asked = []
    for requested in message.outputs:
        if requested.name not in outputs:
            raise InvalidRequestError(requested.name[:100] or "outputs", f"is not an output of this model; its "
                                                                         f"outputs are {', '.join(outputs)}")
        if requested.name in asked:
            raise InvalidRequestError(requested.name, "is asked for twice")
        asked.append(requested.name)
    return tuple(asked) or outputs


def _model_parameters(message: pb.ModelInferRequest) -> list:
    """The request's parameters but the stream's own (how to mark its end: the servicer reads it)."""
    return [(name, p) for name, p in message.parameters.items() if name != EMPTY_FINAL_RESPONSE]


def batched_error(error: InvalidRequestError) -> InvalidRequestError:
    """A batched model's own check with this protocol's names: `texts[3]` -> `TEXT[3]`, `images` -> `IMAGE`."""
    head, bracket, rest = error.field.partition("[")
    if head not in _BATCHED_FIELDS:
        return error
    return InvalidRequestError(_BATCHED_FIELDS[head] + bracket + rest, str(error)[len(error.field) + 2:])


def _count_of_list(tensor: pb.ModelInferRequest.InferInputTensor, what: str, max_inputs: int) -> None:
    """N of a list of texts or images, shape [N] or [N, 1]: at least one, at most `max_inputs`."""
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 0:
        raise InvalidRequestError(tensor.name, f"shape {shape} is not [N] or [N, 1]: one {what} per element")
    _checked_count(tensor.name, shape[0], what, max_inputs)


def _checked_count(name: str, count: int, what: str, max_inputs: int) -> None:
    if count == 0:
        raise InvalidRequestError(name, f"holds no {what}s; send at least one")
    if count > max_inputs:
        raise InvalidRequestError(name, f"holds {count} {what}s; this server takes at most {max_inputs} per "
                                        "request (--max-inputs-per-request)")


def embed_inputs(message: pb.ModelInferRequest, max_inputs: int) -> EmbedInputs:
    """The texts an encoder's request sends, and whether to truncate them; their lengths are checked later."""
    tensors = _named_tensors(message, {TEXT: "BYTES"})
    if TEXT not in tensors:
        raise InvalidRequestError(TEXT, "is missing; send the texts as a BYTES input of shape [N]")
    tensor, raw = tensors[TEXT]
    _count_of_list(tensor, "text", max_inputs)
    texts = [_text(value, f"{TEXT}[{i}]") for i, value in enumerate(tensor_values(tensor, raw))]
    truncate = False
    for name, parameter in _model_parameters(message):
        if name != TRUNCATE:
            raise InvalidRequestError(name, f"is not a parameter of this model; it takes {TRUNCATE}")
        choice = parameter.WhichOneof("parameter_choice")
        if choice != "bool_param":
            raise InvalidRequestError(name, f"is a {choice or 'parameter with no value'}; this parameter takes "
                                            "bool_param")
        truncate = parameter.bool_param
    return EmbedInputs(texts, truncate, _requested_outputs(message, ENCODER_OUTPUTS))


def classify_inputs(message: pb.ModelInferRequest, max_inputs: int, max_pixels: int) -> ClassifyInputs:
    """The images an image classifier's request sends: encoded files (IMAGE) or raw pixels (PIXELS); the
    files are decoded, and every image's size checked, later (server/images.py)."""
    tensors = _named_tensors(message, {IMAGE: "BYTES", PIXELS: "UINT8"})
    if len(tensors) != 1:
        raise InvalidRequestError(IMAGE if not tensors else PIXELS,
                                  f"{'is missing' if not tensors else 'is sent with IMAGE'}; send either IMAGE "
                                  "(PNG or JPEG files, BYTES [N]) or PIXELS (UINT8 [N, H, W, C])")
    unknown = [name for name, _ in _model_parameters(message)]
    if unknown:
        raise InvalidRequestError(unknown[0], "is not a parameter of this model; it takes none")
    outputs = _requested_outputs(message, CLASSIFIER_OUTPUTS)
    if IMAGE in tensors:
        tensor, raw = tensors[IMAGE]
        _count_of_list(tensor, "image", max_inputs)
        return ClassifyInputs(tensor_values(tensor, raw), True, outputs)
    tensor, raw = tensors[PIXELS]
    return ClassifyInputs(list(_pixels(tensor, raw, max_inputs, max_pixels)), False, outputs)


def _pixels(tensor: pb.ModelInferRequest.InferInputTensor, raw: Optional[bytes], max_inputs: int,
            max_pixels: int) -> np.ndarray:
    """PIXELS as uint8 [N, H, W, C], read straight from the raw bytes (no Python list per pixel)."""
    shape = list(tensor.shape)
    if len(shape) != 4 or any(d <= 0 for d in shape[1:]) or shape[0] < 0:
        raise InvalidRequestError(PIXELS, f"shape {shape} is not [N, H, W, C] with H, W and C at least 1")
    if shape[3] not in PIXEL_CHANNELS:
        raise InvalidRequestError(PIXELS, f"has {shape[3]} channels; images have 1 (grayscale) or 3 (RGB)")
    _checked_count(PIXELS, shape[0], "image", max_inputs)
    if shape[1] * shape[2] > max_pixels:
        raise InvalidRequestError(PIXELS, f"images are {shape[2]} x {shape[1]} = {shape[1] * shape[2]} pixels; at "
                                          f"most {max_pixels} are allowed")
    if raw is not None:
        data = np.frombuffer(raw, dtype=np.uint8)
    else:
        values = np.asarray(tensor.contents.uint_contents, dtype=np.uint32)  # typed UINT8 travels as uint32
        if values.size and values.max() > 255:
            raise InvalidRequestError(PIXELS, "has values outside 0..255, the range of UINT8")
        data = values.astype(np.uint8)
    if data.size != math.prod(shape):
        raise InvalidRequestError(PIXELS, f"shape {shape} holds {math.prod(shape)} elements but the data has "
                                          f"{data.size}")
    return data.reshape(shape)  # [N, H, W, C]


def _float32_output(name: str, values: np.ndarray) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    return (pb.ModelInferResponse.InferOutputTensor(name=name, datatype="FP32", shape=list(values.shape)),
            np.ascontiguousarray(values, dtype="<f4").tobytes())


def _bytes_output(name: str, elements: Sequence[bytes]) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    return (pb.ModelInferResponse.InferOutputTensor(name=name, datatype="BYTES", shape=[len(elements)]),
            encode_bytes_elements(elements))


def _tensors_response(model_name: str, request_id: str, outputs: dict, order: Sequence[str]) -> pb.ModelInferResponse:
    """The outputs named in `order` (what the request asked for), each with its raw data, by position."""
    chosen = [outputs[name]() for name in order]  # each made only if asked for
    return pb.ModelInferResponse(model_name=model_name, model_version=MODEL_VERSION, id=request_id,
                                 outputs=[tensor for tensor, _ in chosen],
                                 raw_output_contents=[raw for _, raw in chosen])


def embed_response(model_name: str, request_id: str, vectors: np.ndarray, token_counts: Sequence[int],
                   order: Sequence[str]) -> pb.ModelInferResponse:
    """EMBEDDINGS FP32 [N, D]; the texts' tokens (special tokens included) in the `prompt_tokens` parameter."""
    response = _tensors_response(model_name, request_id, {EMBEDDINGS: lambda: _float32_output(EMBEDDINGS, vectors)},
                                 order)
    response.parameters["prompt_tokens"].int64_param = int(sum(token_counts))
    return response


def classify_response(model_name: str, request_id: str, probabilities: np.ndarray, labels: Sequence[str],
                      order: Sequence[str]) -> pb.ModelInferResponse:
    """PROBABILITIES FP32 [N, labels] and LABEL BYTES [N], each image's most probable label."""
    return _tensors_response(model_name, request_id, {
        PROBABILITIES: lambda: _float32_output(PROBABILITIES, probabilities),
        LABEL: lambda: _bytes_output(LABEL, [labels[i].encode("utf-8") for i in np.argmax(probabilities, axis=1)]),
    }, order)


def encoder_metadata(model_name: str, embedding_dim: int) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model_name, versions=[MODEL_VERSION], platform=PLATFORM,
        inputs=[tensor(name=TEXT, datatype="BYTES", shape=[-1])],
        outputs=[tensor(name=EMBEDDINGS, datatype="FP32", shape=[-1, embedding_dim])],
    )


def classifier_metadata(model_name: str, n_labels: int) -> pb.ModelMetadataResponse:
    """IMAGE or PIXELS (send one); PIXELS of any height, width and 1 or 3 channels: the server resizes."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model_name, versions=[MODEL_VERSION], platform=PLATFORM,
        inputs=[tensor(name=IMAGE, datatype="BYTES", shape=[-1]),
                tensor(name=PIXELS, datatype="UINT8", shape=[-1, -1, -1, -1])],
        outputs=[tensor(name=PROBABILITIES, datatype="FP32", shape=[-1, n_labels]),
                 tensor(name=LABEL, datatype="BYTES", shape=[-1])],
    )


def repository_index(names: list[str], ready: dict[str, bool], only_ready: bool) -> pb.RepositoryIndexResponse:
    """Triton's repository index of the models served: each READY, or UNAVAILABLE with the reason."""
    response = pb.RepositoryIndexResponse()
    for name in names:
        if only_ready and not ready[name]:
            continue
        response.models.add(name=name, version=MODEL_VERSION, state="READY" if ready[name] else "UNAVAILABLE",
                            reason="" if ready[name] else "the server is draining or its engine broke")
    return response
