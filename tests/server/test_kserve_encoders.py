"""KServe v2 for the encoders and image classifiers, and their metrics, beside the decoder on one server.

Triton's own client (tests/server/kserve_tritonclient.py, in a process of its own, as tests/server/test_kserve.py
runs it) embeds texts and classifies PNG files and raw pixels; what it gets must equal the native Embed and
Classify RPCs' answers to the same inputs, bit for bit: both fronts run the same batch thread. The pure
translation (tensors in, tensors out) and the metrics' own bookkeeping are tested first, without a server.
"""
from __future__ import annotations

import base64
import io
import json
import re
import urllib.request
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from attnserve.v1 import generation_pb2 as gpb
from attnserve.v1 import generation_pb2_grpc as gpb_grpc
from inference import grpc_service_pb2 as pb
from server import kserve_convert as convert
from server.errors import InvalidRequestError, to_status
from server.metrics import Metrics
from tests.server.helpers import ROOT
from tests.server.test_kserve import status_of, triton
from server.batching import length_groups
from tests.server.test_metrics import documented_metrics

Tensor = pb.ModelInferRequest.InferInputTensor
ENCODER, CLASSIFIER = "test-encoder", "vit-digits"
MAX_INPUTS = 6  # --max-inputs-per-request of the server below: small, so the limit is cheap to reach
FLAGS = ("--kv-slots", "2", "--max-seq-len", "256", "--max-inputs-per-request", str(MAX_INPUTS),
         "--batch-window-ms", "5")
TEXTS = ["the cat sat on the mat", "", "a dog", "one two three four five six seven eight nine ten"]
DASHBOARD = ROOT / "deploy" / "grafana" / "attnserve.json"


# ---- the pure translation --------------------------------------------------------------------------


def request(model: str, *tensors: tuple, outputs=(), **parameters) -> pb.ModelInferRequest:
    """As tritonclient sends it: each tensor (name, datatype, shape, raw bytes) in raw_input_contents."""
    message = pb.ModelInferRequest(model_name=model, id="r1")
    for name, datatype, shape, raw in tensors:
        message.inputs.append(Tensor(name=name, datatype=datatype, shape=shape))
        message.raw_input_contents.append(raw)
    for name in outputs:
        message.outputs.add(name=name)
    for name, value in parameters.items():
        message.parameters[name].bool_param = value
    return message


def texts_tensor(texts, shape=None) -> tuple:
    return ("TEXT", "BYTES", shape or [len(texts)], convert.encode_bytes_elements([t.encode() for t in texts]))


def refused(parse, message) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as error:
        parse(message)
    assert to_status(error.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    return error.value


def test_an_encoders_request_gives_its_texts_and_truncate_flag():
    parsed = convert.embed_inputs(request(ENCODER, texts_tensor(["a b", "", "c"]), truncate=True), MAX_INPUTS)
    assert parsed == convert.EmbedInputs(["a b", "", "c"], True, ("EMBEDDINGS",))
    column = convert.embed_inputs(request(ENCODER, texts_tensor(["x", "y"], [2, 1])), MAX_INPUTS)  # [N, 1]
    assert column.texts == ["x", "y"] and column.truncate is False
    typed = pb.ModelInferRequest(model_name=ENCODER, inputs=[Tensor(
        name="TEXT", datatype="BYTES", shape=[2], contents=pb.InferTensorContents(bytes_contents=[b"p", b"q"]))])
    assert convert.embed_inputs(typed, MAX_INPUTS).texts == ["p", "q"]
    streamed = request(ENCODER, texts_tensor(["x"]))
    streamed.parameters[convert.EMPTY_FINAL_RESPONSE].bool_param = True  # the stream's own, not the model's
    assert convert.embed_inputs(streamed, MAX_INPUTS).texts == ["x"]


@pytest.mark.parametrize("message, field, words", [
    (request(ENCODER), "TEXT", "is missing"),
    (request(ENCODER, ("TEXT", "INT32", [1], b"\0" * 4)), "TEXT", "datatype is 'INT32'"),
    (request(ENCODER, texts_tensor(["a", "b", "c", "d"], [2, 2])), "TEXT", "is not [N] or [N, 1]"),
    (request(ENCODER, texts_tensor([])), "TEXT", "holds no texts"),
    (request(ENCODER, texts_tensor(["t"] * (MAX_INPUTS + 1))), "TEXT", f"at most {MAX_INPUTS} per request"),
    (request(ENCODER, texts_tensor(["a"], [2])), "TEXT", "holds 2 elements but the data has 1"),
    (request(ENCODER, ("TEXT", "BYTES", [1], convert.encode_bytes_elements([b"\xff"]))), "TEXT[0]", "UTF-8"),
    (request(ENCODER, texts_tensor(["a"]), texts_tensor(["b"])), "TEXT", "given twice"),
    (request(ENCODER, texts_tensor(["a"]), ("text_input", "BYTES", [1], b"")), "text_input", "its inputs are TEXT"),
    (request(ENCODER, texts_tensor(["a"]), outputs=["PROBABILITIES"]), "PROBABILITIES", "outputs are EMBEDDINGS"),
    (request(ENCODER, texts_tensor(["a"]), normalize=True), "normalize", "it takes truncate"),
])
def test_bad_encoder_tensors_are_refused_by_name(message, field, words):
    error = refused(lambda m: convert.embed_inputs(m, MAX_INPUTS), message)
    assert error.field == field and words in str(error), str(error)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_a_classifiers_request_gives_files_or_pixels():
    files = [png(np.zeros((8, 8), np.uint8)), png(np.full((4, 6, 3), 200, np.uint8))]
    parsed = convert.classify_inputs(request(CLASSIFIER, ("IMAGE", "BYTES", [2], convert.encode_bytes_elements(files)),
                                             outputs=["LABEL"]), MAX_INPUTS, 10_000)
    assert parsed.encoded and parsed.images == files and parsed.outputs == ("LABEL",)
    pixels = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)  # [N, H, W, C]
    raw = convert.classify_inputs(request(CLASSIFIER, ("PIXELS", "UINT8", [2, 3, 5, 3], pixels.tobytes())),
                                  MAX_INPUTS, 10_000)
    assert not raw.encoded and raw.outputs == ("PROBABILITIES", "LABEL")  # all of them, when none is asked for
    assert [image.shape for image in raw.images] == [(3, 5, 3)] * 2 and np.array_equal(np.stack(raw.images), pixels)
    typed = pb.ModelInferRequest(model_name=CLASSIFIER, inputs=[Tensor(
        name="PIXELS", datatype="UINT8", shape=[1, 1, 2, 1], contents=pb.InferTensorContents(uint_contents=[7, 255]))])
    assert convert.classify_inputs(typed, MAX_INPUTS, 10_000).images[0].reshape(-1).tolist() == [7, 255]


@pytest.mark.parametrize("message, field, words", [
    (request(CLASSIFIER), "IMAGE", "is missing"),
    (request(CLASSIFIER, ("IMAGE", "BYTES", [1], convert.encode_bytes_elements([b"x"])),
             ("PIXELS", "UINT8", [1, 1, 1, 1], b"\0")), "PIXELS", "is sent with IMAGE"),
    (request(CLASSIFIER, ("PIXELS", "UINT8", [1, 2, 2, 2], b"\0" * 8)), "PIXELS", "has 2 channels"),
    (request(CLASSIFIER, ("PIXELS", "UINT8", [1, 2, 2], b"\0" * 4)), "PIXELS", "is not [N, H, W, C]"),
    (request(CLASSIFIER, ("PIXELS", "UINT8", [1, 2, 2, 1], b"\0" * 3)), "PIXELS", "holds 4 elements but the data has 3"),
    (request(CLASSIFIER, ("PIXELS", "UINT8", [1, 200, 100, 1], b"\0" * 20_000)), "PIXELS", "at most 10000 are allowed"),
    (request(CLASSIFIER, ("PIXELS", "FP32", [1, 1, 1, 1], b"\0" * 4)), "PIXELS", "this input takes UINT8"),
    (request(CLASSIFIER, ("IMAGE", "BYTES", [MAX_INPUTS + 1], convert.encode_bytes_elements([b"x"] * (MAX_INPUTS + 1)))),
     "IMAGE", f"at most {MAX_INPUTS} per request"),
    (request(CLASSIFIER, ("PIXELS", "UINT8", [1, 1, 1, 1], b"\0"), outputs=["LABEL", "LABEL"]), "LABEL", "twice"),
    (request(CLASSIFIER, ("PIXELS", "UINT8", [1, 1, 1, 1], b"\0"), truncate=True), "truncate", "takes none"),
])
def test_bad_classifier_tensors_are_refused_by_name(message, field, words):
    error = refused(lambda m: convert.classify_inputs(m, MAX_INPUTS, 10_000), message)
    assert error.field == field and words in str(error), str(error)


def test_responses_carry_the_asked_outputs_in_the_asked_order_as_raw_little_endian_data():
    vectors = np.array([[0.5, -1.25, 3.0], [1e-8, 0.0, -0.0]], dtype=np.float32)  # [N, D]
    embedded = convert.embed_response(ENCODER, "r1", vectors, [4, 2], ("EMBEDDINGS",))
    assert [(o.name, o.datatype, list(o.shape)) for o in embedded.outputs] == [("EMBEDDINGS", "FP32", [2, 3])]
    assert np.array_equal(np.frombuffer(embedded.raw_output_contents[0], "<f4").reshape(2, 3), vectors)
    assert embedded.parameters["prompt_tokens"].int64_param == 6 and embedded.id == "r1"
    probabilities = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]], dtype=np.float32)  # [N, L]
    both = convert.classify_response(CLASSIFIER, "", probabilities, ["cat", "dog", "eel"], ("LABEL", "PROBABILITIES"))
    assert [(o.name, o.datatype, list(o.shape)) for o in both.outputs] == [
        ("LABEL", "BYTES", [2]), ("PROBABILITIES", "FP32", [2, 3])]
    assert convert.decode_bytes_elements(both.raw_output_contents[0], "LABEL") == [b"dog", b"cat"]
    assert np.array_equal(np.frombuffer(both.raw_output_contents[1], "<f4").reshape(2, 3), probabilities)


def test_a_batched_models_own_checks_get_this_protocols_names():
    renamed = convert.batched_error(InvalidRequestError("texts[3]", "is longer than 128 tokens"))
    assert renamed.field == "TEXT[3]" and str(renamed) == "TEXT[3]: is longer than 128 tokens"
    assert convert.batched_error(InvalidRequestError("images", "is empty")).field == "IMAGE"
    assert convert.batched_error(InvalidRequestError("model", "x")).field == "model"


def test_every_served_name_is_found_and_any_other_is_not():
    convert.check_model(ENCODER, "1", ["test", ENCODER])
    with pytest.raises(convert.ModelNotFoundError, match=f"serves `test`, `{ENCODER}`"):
        convert.check_model("tes", "", ["test", ENCODER])
    with pytest.raises(convert.ModelNotFoundError, match="no version `2`"):
        convert.check_model(ENCODER, "2", ["test", ENCODER])


# ---- the metrics' bookkeeping ---------------------------------------------------------------------


def fresh_metrics() -> Metrics:
    card = SimpleNamespace(name="decoder", architecture="llama", dtype="float32")
    return Metrics(card, "CPUExecutionProvider", "9.9.9", kv_slots=2, slot_capacity=64, max_queued_requests=8)


def test_a_batched_models_series_start_at_zero_for_every_protocol_and_outcome():
    m = fresh_metrics()
    assert m.registry.get_sample_value("attnserve_batch_requests_total", {
        "model": ENCODER, "protocol": "grpc", "kind": "embed", "outcome": "ok"}) is None  # none before a model
    queued = [3]
    m.add_batched_model(ENCODER, "encoder", "float32", "CPUExecutionProvider", lambda: queued[0])
    m.add_batched_model(CLASSIFIER, "image-classifier", "float32", "CPUExecutionProvider")
    m.add_protocol("kserve")  # a front added later gets its series at zero too
    for model, kind in ((ENCODER, "embed"), (CLASSIFIER, "classify")):
        for protocol in ("grpc", "http", "kserve"):
            labels = {"model": model, "protocol": protocol, "kind": kind}
            for outcome in ("ok", "error", "rejected"):
                assert m.registry.get_sample_value("attnserve_batch_requests_total", {**labels, "outcome": outcome}) == 0
            assert m.registry.get_sample_value("attnserve_batch_request_duration_seconds_count", labels) == 0
        assert m.registry.get_sample_value("attnserve_batch_run_inputs_count", {"model": model}) == 0
        assert m.registry.get_sample_value("attnserve_model_info", {
            "model": model, "kind": "encoder" if kind == "embed" else "image-classifier", "architecture": "transformer",
            "dtype": "float32", "execution_provider": "CPUExecutionProvider", "version": "9.9.9"}) == 1
    assert m.registry.get_sample_value("attnserve_batch_run_padded_tokens_count", {"model": ENCODER}) == 0
    assert m.registry.get_sample_value("attnserve_batch_run_padded_tokens_count", {"model": CLASSIFIER}) is None
    assert m.registry.get_sample_value("attnserve_batch_queue_inputs", {"model": ENCODER}) == 3
    queued[0] = 0  # read at each scrape
    assert m.registry.get_sample_value("attnserve_batch_queue_inputs", {"model": ENCODER}) == 0
    assert m.registry.get_sample_value("attnserve_model_info", {
        "model": "decoder", "kind": "decoder", "architecture": "llama", "dtype": "float32",
        "execution_provider": "CPUExecutionProvider", "version": "9.9.9"}) == 1


def test_runs_and_requests_fill_their_histograms_and_rejections_no_latency():
    m = fresh_metrics()
    m.add_batched_model(ENCODER, "encoder", "float32", "CPUExecutionProvider")
    m.on_batch(ENCODER, inputs=3, padded_tokens=3 * 17, seconds=0.004)
    m.on_batch(ENCODER, inputs=1, padded_tokens=5, seconds=0.0015)
    m.on_request(ENCODER, "grpc", "embed", inputs=3, seconds=0.3, outcome="ok")
    m.on_request(ENCODER, "kserve", "embed", inputs=1, seconds=0.02, outcome="error")
    m.on_request(ENCODER, "kserve", "embed", inputs=9, seconds=0.0, outcome="rejected")

    def value(name, **labels):
        return m.registry.get_sample_value(name, {"model": ENCODER, **labels})

    assert value("attnserve_batch_run_inputs_sum") == 4 and value("attnserve_batch_run_inputs_count") == 2
    assert value("attnserve_batch_run_inputs_bucket", le="2.0") == 1
    assert value("attnserve_batch_run_padded_tokens_sum") == 56
    assert value("attnserve_batch_run_duration_seconds_bucket", le="0.002") == 1
    assert value("attnserve_batch_run_duration_seconds_sum") == pytest.approx(0.0055)
    grpc_embed = dict(protocol="grpc", kind="embed")
    kserve_embed = dict(protocol="kserve", kind="embed")
    assert value("attnserve_batch_requests_total", outcome="ok", **grpc_embed) == 1
    assert value("attnserve_batch_requests_total", outcome="error", **kserve_embed) == 1
    assert value("attnserve_batch_requests_total", outcome="rejected", **kserve_embed) == 1
    assert value("attnserve_batch_request_duration_seconds_bucket", le="0.25", **grpc_embed) == 0
    assert value("attnserve_batch_request_duration_seconds_bucket", le="0.5", **grpc_embed) == 1
    assert value("attnserve_batch_request_duration_seconds_count", **kserve_embed) == 1  # the rejection is not in it
    assert value("attnserve_batch_request_inputs_sum", **kserve_embed) == 1
    with pytest.raises(RuntimeError, match="before add_batched_model"):
        fresh_metrics().on_batch(ENCODER, 1, 1, 0.1)


def documented_batch_metrics() -> dict[str, tuple[str, set[str]]]:
    """docs/metrics.md's table of the batched models' families: name -> (type, label names)."""
    return documented_metrics("## Encoders and image classifiers")


def test_docs_list_exactly_the_batched_families_and_the_dashboard_reads_only_those():
    m = fresh_metrics()
    before = {family.name for family in m.registry.collect()}
    m.add_batched_model(ENCODER, "encoder", "float32", "CPUExecutionProvider")
    m.on_batch(ENCODER, 1, 1, 0.1)
    m.on_request(ENCODER, "grpc", "embed", 1, 0.1, "ok")
    registered = {}
    for family in m.registry.collect():
        if family.name not in before:
            name = family.name + ("_total" if family.type == "counter" else "")
            registered[name] = (family.type, {label for s in family.samples for label in s.labels} - {"le"})
    assert documented_batch_metrics() == registered
    read = set(re.findall(r"(?<![:\w])attnserve_batch_\w+", DASHBOARD.read_text()))  # not the decoder's rules
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in read}
    assert families and families <= set(registered), families - set(registered)


# ---- a real server: the decoder, an encoder and an image classifier -----------------------------


@pytest.fixture(scope="module")
def server(test_model_dir, test_encoder_dir, test_classifier_dir, server_class):
    server = server_class(test_model_dir, "--model", str(test_encoder_dir), "--model", str(test_classifier_dir), *FLAGS)
    yield server
    server.stop()


def native_embed(server, texts, truncate=False) -> gpb.EmbedResponse:
    with grpc.insecure_channel(server.target) as channel:
        return gpb_grpc.GenerationStub(channel).Embed(gpb.EmbedRequest(model=ENCODER, texts=texts, truncate=truncate),
                                                     timeout=30)


def native_classify(server, images) -> gpb.ClassifyResponse:
    with grpc.insecure_channel(server.target) as channel:
        return gpb_grpc.GenerationStub(channel).Classify(gpb.ClassifyRequest(model=CLASSIFIER, images=images),
                                                        timeout=30)


def output(result: dict, name: str) -> dict:
    (tensor,) = [o for o in result["outputs"] if o["name"] == name]
    return tensor


def digit(seed: int, size: int = 8) -> np.ndarray:
    """A seeded grayscale image, uint8 [size, size]."""
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


@pytest.mark.slow
def test_metadata_and_readiness_describe_every_model_by_name(server, test_encoder_dir):
    decoder, encoder, classifier, ready, unknown, wrong_version = triton(
        server.target, {"op": "model_metadata"}, {"op": "model_metadata", "model": ENCODER},
        {"op": "model_metadata", "model": CLASSIFIER}, {"op": "model_ready", "model": CLASSIFIER},
        {"op": "model_metadata", "model": "nope"}, {"op": "model_ready", "model": ENCODER, "version": "3"})
    assert [t["name"] for t in decoder["value"]["outputs"]] == ["text_output"]
    embedding_dim = json.loads((test_encoder_dir / "attnserve.json").read_text())["embedding_dim"]
    encoder = encoder["value"]
    assert encoder["name"] == ENCODER and encoder["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in encoder["inputs"]] == [("TEXT", "BYTES", ["-1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in encoder["outputs"]] == [
        ("EMBEDDINGS", "FP32", ["-1", str(embedding_dim)])]
    classifier = classifier["value"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in classifier["inputs"]] == [
        ("IMAGE", "BYTES", ["-1"]), ("PIXELS", "UINT8", ["-1", "-1", "-1", "-1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in classifier["outputs"]] == [
        ("PROBABILITIES", "FP32", ["-1", "10"]), ("LABEL", "BYTES", ["-1"])]
    assert ready["value"] is True
    assert status_of(unknown) == "NOT_FOUND"
    assert all(name in unknown["error"]["message"] for name in ("nope", "test", ENCODER, CLASSIFIER))
    assert status_of(wrong_version) == "NOT_FOUND"


def test_the_repository_index_lists_every_model_served(server):
    (index,) = triton(server.target, {"op": "repository_index"})
    models = index["value"]["models"]
    assert [(m["name"], m["version"], m["state"]) for m in models] == [
        ("test", "1", "READY"), (ENCODER, "1", "READY"), (CLASSIFIER, "1", "READY")]


@pytest.mark.slow
def test_embeddings_equal_the_native_embed_rpcs(server):
    as_list, as_column, truncated = triton(
        server.target,
        {"op": "infer", "model": ENCODER, "id": "e1", "inputs": [
            {"name": "TEXT", "datatype": "BYTES", "shape": [len(TEXTS)], "value": TEXTS}]},
        {"op": "infer", "model": ENCODER, "outputs": ["EMBEDDINGS"], "inputs": [
            {"name": "TEXT", "datatype": "BYTES", "shape": [2, 1], "value": TEXTS[:2]}]},
        {"op": "infer", "model": ENCODER, "parameters": {"truncate": True}, "inputs": [
            {"name": "TEXT", "datatype": "BYTES", "shape": [1], "value": ["word " * 400]}]})
    native = native_embed(server, TEXTS)
    expected = np.array([e.values for e in native.embeddings], dtype=np.float32)  # [N, D]
    embeddings = output(as_list, "EMBEDDINGS")
    assert embeddings["datatype"] == "FP32" and embeddings["shape"] == list(expected.shape)
    assert np.array_equal(np.array(embeddings["value"], dtype=np.float32).reshape(expected.shape), expected)
    assert as_list["id"] == "e1" and as_list["model_name"] == ENCODER and as_list["model_version"] == "1"
    assert as_list["parameters"]["prompt_tokens"] == native.prompt_tokens == sum(e.tokens for e in native.embeddings)
    # Equal bits need the same batch (rows, padding): compare each KServe call with the native call of its texts.
    pair = np.array([e.values for e in native_embed(server, TEXTS[:2]).embeddings], dtype=np.float32)
    assert np.array_equal(np.array(output(as_column, "EMBEDDINGS")["value"], dtype=np.float32).reshape(2, -1), pair)
    native_truncated = native_embed(server, ["word " * 400], truncate=True)
    assert np.array_equal(np.array(output(truncated, "EMBEDDINGS")["value"], dtype=np.float32),
                          np.array(native_truncated.embeddings[0].values, dtype=np.float32))
    assert truncated["parameters"]["prompt_tokens"] == native_truncated.prompt_tokens


@pytest.mark.slow
def test_png_files_and_raw_pixels_classify_as_the_native_classify_rpc_does(server):
    grays = [digit(seed) for seed in range(3)]
    colour = np.random.default_rng(7).integers(0, 256, (24, 16, 3), dtype=np.uint8)  # resized by the server
    files = [png(g) for g in grays] + [png(colour)]
    pixels = np.stack([digit(seed, 12) for seed in (10, 11)])[..., None]  # [2, 12, 12, 1]
    from_files, from_pixels = triton(
        server.target,
        {"op": "infer", "model": CLASSIFIER, "outputs": ["LABEL", "PROBABILITIES"], "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [len(files)],
             "base64": [base64.b64encode(f).decode() for f in files]}]},
        {"op": "infer", "model": CLASSIFIER, "inputs": [
            {"name": "PIXELS", "datatype": "UINT8", "shape": list(pixels.shape), "value": pixels.reshape(-1).tolist()}]})
    labels = [str(i) for i in range(10)]

    def native_probabilities(images) -> np.ndarray:
        results = native_classify(server, images).results
        out = np.zeros((len(results), len(labels)), dtype=np.float32)  # [N, L]
        for row, result in enumerate(results):
            for entry in result.labels:
                out[row, entry.index] = entry.probability
        return out

    assert [o["name"] for o in from_files["outputs"]] == ["LABEL", "PROBABILITIES"]  # the order asked for
    expected = native_probabilities([gpb.Image(encoded=f) for f in files])
    probabilities = np.array(output(from_files, "PROBABILITIES")["value"], dtype=np.float32).reshape(expected.shape)
    assert np.array_equal(probabilities, expected)
    assert output(from_files, "LABEL")["value"] == [labels[i] for i in expected.argmax(axis=1)]
    assert output(from_files, "LABEL")["shape"] == [len(files)]
    raw = native_probabilities([gpb.Image(raw=gpb.RawImage(data=p.tobytes(), height=12, width=12, channels=1))
                                for p in pixels])
    assert [o["name"] for o in from_pixels["outputs"]] == ["PROBABILITIES", "LABEL"]  # all, in the model's order
    assert np.array_equal(np.array(output(from_pixels, "PROBABILITIES")["value"], dtype=np.float32).reshape(2, 10), raw)
    assert np.allclose(raw.sum(axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_bad_tensors_are_invalid_argument_naming_the_tensor_and_an_unknown_model_not_found(server):
    text = {"name": "TEXT", "datatype": "BYTES", "shape": [1], "value": ["hello"]}
    results = triton(
        server.target,
        {"op": "infer", "model": ENCODER, "inputs": [{**text, "datatype": "INT32", "value": [1]}]},
        {"op": "infer", "model": ENCODER, "inputs": [{**text, "shape": [MAX_INPUTS + 1],
                                                      "value": ["x"] * (MAX_INPUTS + 1)}]},
        {"op": "infer", "model": ENCODER, "inputs": [{**text, "shape": [2], "value": ["ok", "word " * 400]}]},
        {"op": "infer", "model": ENCODER, "inputs": [text], "outputs": ["LABEL"]},
        {"op": "infer", "model": CLASSIFIER, "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [2],
             "base64": [base64.b64encode(png(digit(0))).decode(), base64.b64encode(b"GIF89a not a png").decode()]}]},
        {"op": "infer", "model": CLASSIFIER, "inputs": [
            {"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2, 2], "value": [0] * 8}]},
        {"op": "infer", "model": CLASSIFIER, "inputs": [text]},
        {"op": "infer", "model": "no-such-model", "inputs": [text]},
    )
    named = ["TEXT", "TEXT", "TEXT[1]", "LABEL", "IMAGE[1]", "PIXELS", "TEXT"]
    for result, name in zip(results, named):
        assert status_of(result) == "INVALID_ARGUMENT", result
        assert result["error"]["message"].startswith(f"{name}: "), result
    assert f"at most {MAX_INPUTS}" in results[1]["error"]["message"]
    assert "truncate" in results[2]["error"]["message"]  # how to get past the limit
    assert status_of(results[-1]) == "NOT_FOUND"


@pytest.mark.slow
def test_a_stream_answers_an_embedding_request_with_one_final_response(server):
    (streamed,) = triton(server.target, {"op": "stream", "model": ENCODER, "requests": [
        {"id": "s1", "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "value": TEXTS[:2]}]},
        {"id": "s2", "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "value": TEXTS[2:3]}],
         "empty_final": True}]})
    by_id = {}
    for response in streamed["responses"]:
        by_id.setdefault(response["id"], []).append(response)
    assert [r["parameters"]["triton_final_response"] for r in by_id["s1"]] == [True]
    assert [r["parameters"]["triton_final_response"] for r in by_id["s2"]] == [False, True]  # as asked
    expected = np.array([e.values for e in native_embed(server, TEXTS[:2]).embeddings], dtype=np.float32)
    assert np.array_equal(np.array(output(by_id["s1"][0], "EMBEDDINGS")["value"], dtype=np.float32).reshape(2, -1),
                          expected)


def scrape(server) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples, name: str, **labels) -> float:
    wanted = set(labels.items())
    matching = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    assert matching, f"{name}{labels} not on /metrics"
    return sum(matching)


@pytest.mark.slow
def test_metrics_count_the_embed_and_classify_calls_each_front_made(server):
    """Deltas over known calls: what came before in this module does not matter."""
    before = scrape(server)
    for model, kind in ((ENCODER, "encoder"), (CLASSIFIER, "image-classifier")):
        assert total(before, "attnserve_model_info", model=model, kind=kind) == 1
    assert total(before, "attnserve_batch_requests_total", model=CLASSIFIER, protocol="http") == 0  # at zero
    native_calls = [TEXTS, TEXTS[:1], TEXTS[1:3]]
    native = [native_embed(server, texts) for texts in native_calls]
    classified = native_classify(server, [gpb.Image(encoded=png(digit(1)))])
    kserve = triton(server.target,
                    {"op": "infer", "model": ENCODER, "inputs": [
                        {"name": "TEXT", "datatype": "BYTES", "shape": [2], "value": TEXTS[:2]}]},
                    {"op": "infer", "model": ENCODER, "inputs": [  # refused by the batch thread: too long
                        {"name": "TEXT", "datatype": "BYTES", "shape": [1], "value": ["word " * 400]}]},
                    {"op": "infer", "model": CLASSIFIER, "inputs": [
                        {"name": "PIXELS", "datatype": "UINT8", "shape": [3, 8, 8, 1], "value": [9] * 192}]})
    assert "error" not in kserve[0] and status_of(kserve[1]) == "INVALID_ARGUMENT" and "error" not in kserve[2]
    assert len(classified.results) == 1
    embedded_texts = sum(len(t) for t in native_calls) + 2
    ran_inputs = embedded_texts + 1 + 3  # every text and image of the calls that succeeded
    # A call is counted before its answer leaves the server: the scrape after the last answer sees them all.
    after = scrape(server)

    def delta(name, **labels) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    ok = dict(model=ENCODER, kind="embed", outcome="ok")
    assert delta("attnserve_batch_requests_total", protocol="grpc", **ok) == len(native_calls)
    assert delta("attnserve_batch_requests_total", protocol="kserve", **ok) == 1
    assert delta("attnserve_batch_requests_total", model=ENCODER, protocol="kserve", outcome="error") == 1
    for protocol in ("grpc", "kserve"):
        assert delta("attnserve_batch_requests_total", model=CLASSIFIER, protocol=protocol, kind="classify",
                     outcome="ok") == 1
    assert delta("attnserve_batch_requests_total", outcome="rejected") == 0
    assert delta("attnserve_batch_request_inputs_sum", model=ENCODER, protocol="grpc") == embedded_texts - 2
    assert delta("attnserve_batch_request_duration_seconds_count", model=ENCODER) == len(native_calls) + 2
    assert delta("attnserve_batch_run_inputs_sum") == ran_inputs
    # The calls came one after another, each fitting one batch, which runs its texts in groups of similar
    # length (server/batching.py); the KServe call embedded the first two texts again; images: one run a call.
    text_runs = [len(length_groups([e.tokens for e in response.embeddings])) for response in native]
    text_runs.append(len(length_groups([e.tokens for e in native[0].embeddings[:2]])))
    assert delta("attnserve_batch_run_inputs_count") == sum(text_runs) + 2
    tokens = sum(e.tokens for response in native for e in response.embeddings) + kserve[0]["parameters"]["prompt_tokens"]
    assert delta("attnserve_batch_run_padded_tokens_sum", model=ENCODER) >= tokens  # padding only adds
    assert total(after, "attnserve_batch_queue_inputs") == 0  # nothing waits once every call is answered


def test_the_repository_index_marks_models_that_are_not_ready_and_can_leave_them_out():
    ready = {"llm": False, ENCODER: True}
    index = convert.repository_index(["llm", ENCODER], ready, only_ready=False)
    assert [(m.name, m.state) for m in index.models] == [("llm", "UNAVAILABLE"), (ENCODER, "READY")]
    assert index.models[0].reason and not index.models[1].reason
    assert [m.name for m in convert.repository_index(["llm", ENCODER], ready, only_ready=True).models] == [ENCODER]
