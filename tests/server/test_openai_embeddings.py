"""POST /v1/embeddings, the OpenAI-compatible embeddings route, driven by the official `openai` SDK.

Its vectors must equal the native Embed RPC's for the same texts, bit for bit, whether the SDK asks for
base64 (its default) or floats; its errors must raise the SDK's own exception types naming the field.
"""
from __future__ import annotations

import base64
import json

import grpc
import numpy as np
import openai
import pytest

from attnserve.v1 import generation_pb2 as gpb
from attnserve.v1 import generation_pb2_grpc as gpb_grpc
from server import openai_convert
from server.errors import InvalidRequestError
from server.types import EmbedResult
from tests.server.helpers import free_port
from tests.server.test_openai_http import post, sdk

ENCODER = "test-encoder"
MAX_INPUTS = 4
TEXTS = ["the cat sat on the mat", "", "one two three four five six"]
LONG = "word " * 400  # longer than the test encoder reads


# ---- the pure conversion -------------------------------------------------------------------------


def test_a_body_gives_the_texts_and_options_it_asks_for():
    assert openai_convert.embedding_request({"model": ENCODER, "input": "hi"}) == openai_convert.EmbeddingRequest(
        ENCODER, ["hi"], "float", False, None)
    wanted = openai_convert.embedding_request({"input": ["a", "b"], "encoding_format": "base64", "truncate": True,
                                               "dimensions": 8, "user": "someone"})
    assert wanted == openai_convert.EmbeddingRequest("", ["a", "b"], "base64", True, 8)


@pytest.mark.parametrize("body, field, words", [
    ({"model": 3, "input": "x"}, "model", "must be a string"),
    ({"model": ENCODER}, "input", "must be a string or a list of strings"),
    ({"model": ENCODER, "input": [1, 2, 3]}, "input", "token ids"),
    ({"model": ENCODER, "input": [[1, 2], [3]]}, "input", "token ids"),
    ({"model": ENCODER, "input": ["a", 2]}, "input", "must be a string or a list of strings"),
    ({"model": ENCODER, "input": "x", "encoding_format": "int8"}, "encoding_format", "float or base64"),
    ({"model": ENCODER, "input": "x", "dimensions": 0}, "dimensions", ">= 1"),
    ({"model": ENCODER, "input": "x", "truncate": "yes"}, "truncate", "true or false"),
])
def test_bad_bodies_are_refused_naming_the_field(body, field, words):
    with pytest.raises(InvalidRequestError) as error:
        openai_convert.embedding_request(body)
    assert error.value.field == field and words in str(error.value), str(error.value)


def test_responses_carry_floats_or_their_little_endian_bytes_and_the_tokens():
    vectors = np.array([[0.1, -2.5], [3e-9, 1.0]], dtype=np.float32)  # [N, D]
    result = EmbedResult(vectors=vectors, token_counts=[5, 2])
    floats = openai_convert.embedding_response(ENCODER, result, "float")
    assert floats["object"] == "list" and floats["model"] == ENCODER
    assert [d["index"] for d in floats["data"]] == [0, 1] and floats["data"][0]["object"] == "embedding"
    assert np.array_equal(np.array([d["embedding"] for d in floats["data"]], dtype=np.float32), vectors)
    assert floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    packed = openai_convert.embedding_response(ENCODER, result, "base64")
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in packed["data"]]
    assert np.array_equal(np.stack(decoded), vectors)
    renamed = openai_convert.embedding_error(InvalidRequestError("texts[2]", "is longer than 128 tokens"))
    assert renamed.field == "input[2]" and str(renamed) == "input[2]: is longer than 128 tokens"
    with pytest.raises(InvalidRequestError, match="dimensions: is 3; model m's embeddings have 2 dimensions"):
        openai_convert.check_dimensions(openai_convert.EmbeddingRequest("m", ["x"], "float", False, 3), 2)


# ---- a real server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(test_model_dir, test_encoder_dir, server_class):
    server = server_class(test_model_dir, "--model", str(test_encoder_dir), "--kv-slots", "2", "--max-seq-len", "256",
                          "--max-inputs-per-request", str(MAX_INPUTS), "--http-port", str(free_port()))
    yield server
    server.stop()


def native(server, texts, truncate=False) -> gpb.EmbedResponse:
    with grpc.insecure_channel(server.target) as channel:
        return gpb_grpc.GenerationStub(channel).Embed(gpb.EmbedRequest(model=ENCODER, texts=texts, truncate=truncate),
                                                     timeout=30)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)  # [N, D]


@pytest.mark.slow
def test_the_sdks_embeddings_equal_the_native_embed_rpcs(server):
    client = sdk(server)
    expected = native(server, TEXTS)
    as_base64 = client.embeddings.create(model=ENCODER, input=TEXTS)  # the SDK asks for base64 and decodes it
    as_floats = client.embeddings.create(model=ENCODER, input=TEXTS, encoding_format="float")
    wanted = np.array([e.values for e in expected.embeddings], dtype=np.float32)
    assert np.array_equal(vectors(as_base64), wanted) and np.array_equal(vectors(as_floats), wanted)
    assert [d.index for d in as_floats.data] == [0, 1, 2] and as_floats.model == ENCODER
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == expected.prompt_tokens
    one = client.embeddings.create(model="", input=TEXTS[0], encoding_format="float")  # the only encoder
    assert np.array_equal(vectors(one), np.array([native(server, TEXTS[:1]).embeddings[0].values], np.float32))
    cut = client.embeddings.create(model=ENCODER, input=[LONG], extra_body={"truncate": True})
    assert np.array_equal(vectors(cut)[0], np.array(native(server, [LONG], truncate=True).embeddings[0].values,
                                                    dtype=np.float32))
    dimensions = len(wanted[0])
    assert len(client.embeddings.create(model=ENCODER, input="x", dimensions=dimensions).data[0].embedding) == dimensions


@pytest.mark.slow
def test_errors_raise_the_sdks_types_naming_the_field(server):
    client = sdk(server)
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert missing.value.code == "model_not_found" and ENCODER in missing.value.message
    cases = [
        (dict(model="test", input="x"), "model", "generates text"),  # the decoder
        (dict(model=ENCODER, input=[LONG]), "input[0]", "truncate"),
        (dict(model=ENCODER, input=["x"] * (MAX_INPUTS + 1)), "input", f"at most {MAX_INPUTS}"),
        (dict(model=ENCODER, input=[]), "input", "empty"),
        (dict(model=ENCODER, input="x", dimensions=3), "dimensions", "the only size it makes"),
    ]
    for arguments, param, words in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.embeddings.create(**arguments)
        assert bad.value.param == param and words in bad.value.message, (arguments, bad.value.message)
    status, _, body = post(server, "/v1/embeddings", json.dumps({"model": ENCODER, "input": [17, 4]}).encode())
    assert status == 400 and body["error"]["param"] == "input" and "token ids" in body["error"]["message"]


@pytest.mark.slow
def test_embeddings_are_counted_under_the_http_protocol_and_route(server):
    def counted() -> tuple[float, float]:
        return (server.metric("attnserve_batch_requests_total", 'outcome="ok",protocol="http"'),
                server.metric("attnserve_http_requests_total", 'code="200",model="test",route="/v1/embeddings"'))

    requests_before, route_before = counted()
    for texts in (TEXTS, TEXTS[:1]):
        sdk(server).embeddings.create(model=ENCODER, input=texts)
    assert counted() == (requests_before + 2, route_before + 2)  # counted before each answer left
