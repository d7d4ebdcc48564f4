"""Every bad input gets INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for size) naming the field and the limit,
and none of them disturbs a request already running."""
from __future__ import annotations

import math

import grpc
import pytest

from attnserve.v1 import generation_pb2 as pb
from server.client import build_request

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def ok_request(**overrides):
    fields = dict(prompt_token_ids=[11, 12, 13], max_new_tokens=4)
    fields.update(overrides)
    return build_request(**fields)


# (case name, request, expected code, words the message must contain)
CASES = [
    ("empty prompt", build_request(prompt="", max_new_tokens=4), INVALID, ["prompt", "empty"]),
    ("no prompt at all", pb.GenerateRequest(max_new_tokens=4), INVALID, ["prompt", "missing"]),
    ("empty token ids", build_request(prompt_token_ids=[], max_new_tokens=4), INVALID, ["prompt_token_ids", "empty"]),
    ("prompt + max_new_tokens beyond context", ok_request(prompt_token_ids=[5] * 1000, max_new_tokens=100), INVALID,
     ["max_new_tokens", "1024"]),
    ("prompt alone beyond context", ok_request(prompt_token_ids=[5] * 1100), INVALID, ["prompt_token_ids", "1024"]),
    ("max_new_tokens above limit", ok_request(max_new_tokens=5000), INVALID, ["max_new_tokens", "2048"]),
    ("temperature < 0", ok_request(temperature=-0.5), INVALID, ["sampling.temperature", ">= 0"]),
    ("temperature NaN", ok_request(temperature=math.nan), INVALID, ["sampling.temperature", "finite"]),
    ("top_p 0", ok_request(top_p=0.0), INVALID, ["sampling.top_p", "(0, 1]"]),
    ("top_p > 1", ok_request(top_p=1.5), INVALID, ["sampling.top_p", "(0, 1]"]),
    ("top_p NaN", ok_request(top_p=math.nan), INVALID, ["sampling.top_p", "finite"]),
    ("top_k < 0", ok_request(top_k=-1), INVALID, ["sampling.top_k", ">= 0"]),
    ("repetition_penalty 0", ok_request(repetition_penalty=0.0), INVALID, ["sampling.repetition_penalty", "> 0"]),
    ("repetition_penalty < 0", ok_request(repetition_penalty=-1.0), INVALID, ["sampling.repetition_penalty", "> 0"]),
    ("repetition_penalty inf", ok_request(repetition_penalty=math.inf), INVALID, ["sampling.repetition_penalty", "finite"]),
    ("too many stop strings", ok_request(stop=["a"] * 9), INVALID, ["stop", "at most 8"]),
    ("stop string too long", ok_request(stop=["x" * 129]), INVALID, ["stop[0]", "at most 128"]),
    ("empty stop string", ok_request(stop=[""]), INVALID, ["stop[0]", "empty"]),
    ("logprobs above limit", ok_request(logprobs=21), INVALID, ["logprobs", "20"]),
    ("token id outside vocabulary", ok_request(prompt_token_ids=[1, 99999]), INVALID, ["prompt_token_ids", "99999", "vocabulary"]),
    ("negative token id", ok_request(prompt_token_ids=[1, -3]), INVALID, ["prompt_token_ids", "-3"]),
    ("chat without a template", build_request(messages=[("user", "hi")], max_new_tokens=4), INVALID,
     ["messages", "chat template"]),
    ("request over the size limit", build_request(prompt="x" * (5 * 1024 * 1024), max_new_tokens=4),
     grpc.StatusCode.RESOURCE_EXHAUSTED, ["larger than max"]),
]


@pytest.mark.parametrize("name, request_message, code, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_clear_message(test_server, name, request_message, code, words):
    stub = test_server.stub()
    running = stub.GenerateStream.__call__(ok_request(max_new_tokens=30), timeout=60)  # a request already running
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request_message, timeout=30)
    assert info.value.code() == code, info.value.details()
    for word in words:
        assert word in info.value.details(), f"{name}: {info.value.details()!r} lacks {word!r}"
    tokens = [t for message in running for t in message.token_ids]
    assert len(tokens) == 30  # undisturbed


def test_undecodable_bytes_are_invalid_argument(test_server):
    channel = grpc.insecure_channel(test_server.target)
    raw = channel.unary_unary("/attnserve.v1.Generation/Generate", request_serializer=None, response_deserializer=None)
    # Field 1 (prompt, a string) holding bytes that are not UTF-8.
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\x0a\x02\xff\xfe", timeout=10)
    assert info.value.code() == INVALID
    assert "GenerateRequest" in info.value.details()
