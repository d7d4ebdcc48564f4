"""Hostile input: hypothesis-generated requests against a live server.

Every answer is OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a message;
never UNKNOWN, INTERNAL or a dead server; and a well-formed request afterwards
gets the same answer as before the fuzzing.
"""
from __future__ import annotations

import math
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnserve.v1 import generation_pb2 as pb
from attnserve.v1 import generation_pb2_grpc as pb_grpc
from server.client import build_request
from tests.reliability.helpers import FIGURES, FUZZ_EXAMPLES, wait_for_no_work
from tests.server.helpers import ServerProcess

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
REFERENCE = build_request(prompt_token_ids=[17, 42, 99, 7], max_new_tokens=24, ignore_eos=True)

# ---- strategies ------------------------------------------------------------------------------

SMALLEST_FLOAT32 = 1.401298464324817e-45  # the smallest positive subnormal
LARGEST_FLOAT32 = 3.4028234663852886e38

# float32 on the wire: every finite value, the infinities, NaN, signed zeros, subnormals and the extremes.
float32s = st.one_of(
    st.floats(width=32),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.4028234e38, -3.4028234e38, math.inf, -math.inf, math.nan,
                     0.5, 1.0, 1.0000001, 2.0]),
)
uint32s = st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1),
                    st.sampled_from([1020, 1023, 1024, 1025, 2048, 2049, 2**31, 2**32 - 1]))
int32s = st.one_of(st.integers(-5, 600), st.integers(-(2**31), 2**31 - 1))
odd_unicode = st.sampled_from([
    "", " ", "\x00", "\x00" * 100, "\ufeff", "\u202e", "\u200b" * 50, "\U0010ffff", "\ufffd", "e\u0301" * 100,
    "\U0001f469\u200d\U0001f4bb", "ﷺ" * 100, "<|endoftext|>", "{{ messages }}", "{% for x in y %}", "\r\n" * 100,
    "\u0000\u0001\u0002\u007f", "a" * 129,
])
# Any code point UTF-8 can carry (surrogates cannot be encoded at all).
texts = st.one_of(st.text(max_size=40), st.text(st.characters(codec="utf-8"), max_size=40), odd_unicode)
# Huge strings by repetition, from tens of kilobytes to beyond the 4 MiB request limit.
huge_texts = st.builds(lambda piece, count: piece * count, st.text(min_size=1, max_size=3), st.integers(10_000, 1_600_000))
any_text = st.one_of(texts, texts, texts, huge_texts)
token_ids = st.one_of(
    st.lists(st.one_of(st.integers(0, 511), st.integers(-(2**63), 2**63 - 1)), max_size=40),
    st.builds(lambda token, count: [token] * count, st.integers(0, 511), st.integers(900, 1100)),
)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", ""]), texts)


positive_float32s = st.one_of(st.floats(min_value=SMALLEST_FLOAT32, max_value=LARGEST_FLOAT32, width=32),
                              st.sampled_from([SMALLEST_FLOAT32, 1e-38, 1e-7, 1.0, 1e7, LARGEST_FLOAT32]))
# (within the limits, hostile) per field. Within the limits still means odd: subnormal temperatures,
# float32's largest penalty, any seed, any Unicode.
FIELDS = {
    "prompt": (st.text(min_size=1, max_size=40), any_text),
    "prompt_token_ids": (st.lists(st.integers(0, 511), min_size=1, max_size=40), token_ids),
    "max_new_tokens": (st.integers(0, 16), uint32s),
    "temperature": (st.one_of(st.just(0.0), positive_float32s), float32s),
    "top_k": (st.one_of(st.integers(0, 600), st.just(2**31 - 1)), int32s),
    "top_p": (st.floats(min_value=SMALLEST_FLOAT32, max_value=1.0, width=32), float32s),
    "repetition_penalty": (positive_float32s, float32s),
    "stop": (st.lists(st.text(min_size=1, max_size=20), max_size=3),
             st.lists(st.one_of(texts, st.just("x" * 200)), max_size=10)),
    "logprobs": (st.integers(0, 20), uint32s),
    "request_id": (st.text(max_size=40), st.one_of(texts, st.just("r" * 300))),
}


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    # Half the requests are within every limit and reach the engine; the rest break one to three fields.
    hostile = draw(st.one_of(st.just(set()), st.sets(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3)))

    def value(field):
        return draw(FIELDS[field][field in hostile])

    request = pb.GenerateRequest()
    kind = draw(st.sampled_from(["prompt", "prompt", "messages", "prompt_token_ids", "prompt_token_ids", "none"]))
    if kind == "prompt":
        request.prompt = value("prompt")
    elif kind == "messages":  # the test model has no chat template: always refused, after decoding them
        count = draw(st.one_of(st.integers(0, 4), st.just(5000)))
        content = draw(any_text) if count < 10 else ""
        request.messages.messages.extend(pb.ChatMessage(role=draw(roles), content=content) for _ in range(count))
    elif kind == "prompt_token_ids":
        request.prompt_token_ids.ids.extend(value("prompt_token_ids"))
    request.max_new_tokens = value("max_new_tokens")
    if draw(st.booleans()):
        sampling = request.sampling
        sampling.temperature = value("temperature")
        sampling.top_k = value("top_k")
        for name in ("top_p", "repetition_penalty"):
            if draw(st.booleans()):
                setattr(sampling, name, value(name))
        if draw(st.booleans()):
            sampling.seed = draw(st.integers(0, 2**64 - 1))
    request.stop.extend(value("stop"))
    request.logprobs = value("logprobs")
    request.request_id = value("request_id")
    request.ignore_eos = draw(st.booleans())
    return request


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings, bytes, sub-messages)."""
    length, varint = len(payload), b""
    while True:
        byte, length = length & 0x7F, length >> 7
        varint += bytes([byte | (0x80 if length else 0)])
        if not length:
            return bytes([number << 3 | 2]) + varint + payload


invalid_utf8 = st.sampled_from([b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82",
                                b"abc\x80def", b"\xf8\x88\x80\x80\x80"])


@st.composite
def raw_requests(draw) -> bytes:
    """Bytes on the wire: invalid UTF-8 in each string field, random mutations of valid requests, noise."""
    kind = draw(st.sampled_from(["bad utf-8", "mutated", "noise"]))
    if kind == "bad utf-8":
        bad = draw(invalid_utf8)
        where = draw(st.sampled_from(["prompt", "request_id", "stop", "role", "content"]))
        body = {"prompt": _field(1, bad), "request_id": _field(1, b"hi") + _field(8, bad),
                "stop": _field(1, b"hi") + _field(6, bad),
                "role": _field(2, _field(1, _field(1, bad) + _field(2, b"hi"))),
                "content": _field(2, _field(1, _field(1, b"user") + _field(2, bad)))}[where]
        return body + draw(st.sampled_from([b"", b"\x20\x04"]))  # optionally max_new_tokens = 4
    if kind == "mutated":
        valid = bytearray(draw(generate_requests().filter(lambda r: r.ByteSize() < 10_000)).SerializeToString())
        for position, value in draw(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8)):
            if valid:
                valid[position % len(valid)] = value
        cut = draw(st.integers(0, len(valid)))
        return bytes(valid[:cut]) if draw(st.booleans()) else bytes(valid)
    return draw(st.binary(max_size=300))


# ---- the tests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(test_model_dir):
    # A small default answer keeps valid examples quick; 4 slots keep the test model's cache small.
    server = ServerProcess(test_model_dir, "--kv-slots", "4", "--max-seq-len", "1024", "--default-max-new-tokens", "8")
    channel = grpc.insecure_channel(server.target)
    reference = pb_grpc.GenerationStub(channel).Generate(REFERENCE, timeout=60)
    yield server, channel, reference
    channel.close()
    server.stop()


def _check_error(error: grpc.RpcError, what: str) -> grpc.StatusCode:
    assert error.code() in ALLOWED, f"{what}: {error.code().name}: {error.details()}"
    assert error.details(), f"{what}: {error.code().name} without a message"
    assert "Traceback" not in error.details()
    return error.code()


def _record(codes: dict, code: grpc.StatusCode, key: str) -> None:
    codes[code.name] = codes.get(code.name, 0) + 1
    FIGURES[key] = ", ".join(f"{n} {c}" for c, n in sorted(codes.items()))


def _check_still_right(server, channel, reference) -> None:
    assert server.process.poll() is None, "the server died"
    again = pb_grpc.GenerationStub(channel).Generate(REFERENCE, timeout=60)
    assert list(again.token_ids) == list(reference.token_ids) and again.text == reference.text
    wait_for_no_work(server)
    assert not [line for line in server.log if " ERROR " in line], "".join(server.log[-20:])


def test_fuzzed_requests_get_ok_or_a_clear_refusal(fuzz_server):
    server, channel, reference = fuzz_server
    stub = pb_grpc.GenerationStub(channel)
    codes: dict[str, int] = {}

    @FUZZ_SETTINGS
    @given(request=generate_requests(), method=st.sampled_from(["Generate", "GenerateStream", "Tokenize"]))
    def one(request, method):
        try:
            if method == "Generate":
                response = stub.Generate(request, timeout=60)
                assert response.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            elif method == "GenerateStream":
                messages = list(stub.GenerateStream(request, timeout=60))
                assert messages[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            else:
                tokenize = pb.TokenizeRequest()
                if request.WhichOneof("input") == "prompt":
                    tokenize.prompt = request.prompt
                elif request.WhichOneof("input") == "messages":
                    tokenize.messages.CopyFrom(request.messages)
                stub.Tokenize(tokenize, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = _check_error(e, f"{method}({_summary(request)})")
        _record(codes, code, "fuzz: typed requests")

    one()
    FIGURES["fuzz: examples tried"] = FIGURES.get("fuzz: examples tried", 0) + sum(codes.values())
    _check_still_right(server, channel, reference)


def test_fuzzed_bytes_on_the_wire_get_ok_or_a_clear_refusal(fuzz_server):
    server, channel, reference = fuzz_server
    # No serializer: the bytes reach the server exactly as drawn, invalid UTF-8 included.
    raw = {method: channel.unary_unary(f"/attnserve.v1.Generation/{method}", request_serializer=None,
                                       response_deserializer=None) for method in ("Generate", "Tokenize")}
    raw_stream = channel.unary_stream("/attnserve.v1.Generation/GenerateStream", request_serializer=None,
                                      response_deserializer=None)
    codes: dict[str, int] = {}

    @FUZZ_SETTINGS
    @given(body=raw_requests(), method=st.sampled_from(["Generate", "GenerateStream", "Tokenize"]))
    def one(body, method):
        try:
            if method == "GenerateStream":
                list(raw_stream(body, timeout=60))
            else:
                raw[method](body, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = _check_error(e, f"{method}({body[:80]!r}, {len(body)} bytes)")
        _record(codes, code, "fuzz: raw bytes")

    one()
    FIGURES["fuzz: examples tried"] = FIGURES.get("fuzz: examples tried", 0) + sum(codes.values())
    _check_still_right(server, channel, reference)


def test_invalid_utf8_in_every_string_field_is_invalid_argument(fuzz_server):
    """The deterministic core of the raw-bytes fuzzing, so that it never depends on what hypothesis draws."""
    server, channel, _ = fuzz_server
    generate = channel.unary_unary("/attnserve.v1.Generation/Generate", request_serializer=None,
                                   response_deserializer=None)
    bodies = {
        "prompt": _field(1, b"\xff\xfe"),
        "stop": _field(1, b"hi") + _field(6, b"\xed\xa0\x80"),
        "request_id": _field(1, b"hi") + _field(8, b"abc\x80"),
        "messages.role": _field(2, _field(1, _field(1, b"\xc0\x80") + _field(2, b"hi"))),
        "messages.content": _field(2, _field(1, _field(1, b"user") + _field(2, b"\xf4\x90\x80\x80"))),
    }
    for name, body in bodies.items():
        with pytest.raises(grpc.RpcError) as info:
            generate(body, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "GenerateRequest" in info.value.details(), name
    assert server.process.poll() is None


def test_huge_prompt_is_refused_before_it_is_tokenized(fuzz_server):
    """Tokenizing megabytes holds the GIL for seconds and would stall every stream; it is refused at once."""
    _, channel, _ = fuzz_server
    stub = pb_grpc.GenerationStub(channel)
    for prompt in ("hello world " * 340_000, "\U0001f600" * 1_000_000):
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(build_request(prompt=prompt, max_new_tokens=4), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt" in info.value.details() and "characters" in info.value.details()
        assert time.perf_counter() - started < 2.0


def _summary(request: pb.GenerateRequest) -> str:
    text = str(request)
    return text if len(text) < 300 else f"{text[:300]}... ({request.ByteSize()} bytes)"
