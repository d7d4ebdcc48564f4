"""Encoders and image classifiers served beside the decoder: real servers on port 0, real onnxruntime sessions.

The test encoder has random weights and the test classifier trains for a few steps: what is tested is that the
server answers as the graphs do, alone or batched, and refuses what it must; export/ verifies the models.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from attnserve.v1 import generation_pb2 as pb
from server.client import build_request, raw_image
from server.contract import EncoderCard
from server.encoders import BatchObserver, ImageClassifierGraph, TextEncoderGraph
from tests.server.helpers import ROOT, InProcessServer, ServerProcess, wait_until

DECODER_SETTINGS = dict(kv_slots=2, max_seq_len=256, prefill_chunk_tokens=64)
# Embeddings have unit norm. A padded batch changes only the order of fp32 sums (each rounding at most 2^-24
# relative, a few hundred per output through the test encoder's layers): measured 1.0e-7 on these 16 texts (AVX-512
# CPU). 1e-5 leaves nearly 100x of margin, and is the bound export/ verifies padded batches against a reference with.
BATCHED_BOUND = 1e-5
# Probabilities in [0, 1] from logits the exporter checked to 1e-4; the server and this test run the same graph on
# the same pixel_values, so only rounding of the softmax separates them.
PROBABILITY_BOUND = 1e-6
SENTENCES = ["the cat sat on the mat", "a dog", "", "what time is it", "the quick brown fox jumps over the lazy dog",
             "ok", "serving transformers from onnx runtime over grpc with continuous batching and many other things",
             "hello world"]


@pytest.fixture(scope="module")
def server(test_model_dir, test_encoder_dir, test_classifier_dir):
    served = InProcessServer([test_model_dir, test_encoder_dir, test_classifier_dir], **DECODER_SETTINGS)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def batching_server(test_model_dir, test_encoder_dir):
    """A batch window of a second and runs of 16: concurrent calls gather into one run; 8 x 16 inputs may queue."""
    served = InProcessServer([test_model_dir, test_encoder_dir], batch_window_ms=1000, max_batch=16,
                          max_inputs_per_request=16, **DECODER_SETTINGS)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def encoder_graph(test_encoder_dir) -> TextEncoderGraph:
    """The encoder's graph in a session of the test's own, run here on batches of one: each text alone."""
    return TextEncoderGraph(test_encoder_dir, EncoderCard.load(test_encoder_dir), intra_op_threads=1)


@pytest.fixture(scope="module")
def digits():
    """Eight scikit-learn digits (0..16, 8 x 8) as uint8 images [8, 8] and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.round(data.images[:8] * 255 / 16).astype(np.uint8), data.target[:8]


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.asarray([list(e.values) for e in response.embeddings], dtype=np.float32)  # [N, D]


def alone(graph: TextEncoderGraph, text: str) -> tuple[np.ndarray, int]:
    (ids, tokens), = graph.prepare([text], truncate=False)
    return graph.run([ids])[0], tokens  # [D]


def refused(call, request, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details()


class BatchRecorder(BatchObserver):
    """Forwards to the server's observer (its metrics) and sets `batched` once a run holds more than one input."""

    def __init__(self, forward: BatchObserver):
        self.forward = forward
        self.runs: list[int] = []
        self.batched = threading.Event()

    def on_batch(self, model, inputs, padded_tokens, seconds):
        self.forward.on_batch(model, inputs, padded_tokens, seconds)
        self.runs.append(inputs)
        if inputs > 1:
            self.batched.set()

    def on_request(self, *args):
        self.forward.on_request(*args)


@contextlib.contextmanager
def recorded(model):
    recorder = BatchRecorder(model.observer)
    model.observer = recorder
    try:
        yield recorder
    finally:
        model.observer = recorder.forward


@contextlib.contextmanager
def held_runs(model):
    """Every run of the model's graph waits until the test lets go: (started, release) events."""
    started, release = threading.Event(), threading.Event()
    run = model.graph.run

    def held(inputs):
        started.set()
        assert release.wait(60), "the test never let the run go"
        return run(inputs)

    model.graph.run = held
    try:
        yield started, release
    finally:
        release.set()
        del model.graph.run  # the class's own method again


# ---- Embed ----

def test_the_embed_response_written_as_bytes_is_what_protobuf_would_write():
    from server.encoder_convert import embed_response
    from server.types import EmbedResult

    rows = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)  # [N, D]
    result = EmbedResult(vectors=rows, token_counts=[3, 200, 2, 128, 40000])
    want = pb.EmbedResponse(model="enc\u00f6der", prompt_tokens=sum(result.token_counts), embeddings=[
        pb.Embedding(values=row.tolist(), tokens=tokens) for row, tokens in zip(rows, result.token_counts)])
    assert embed_response("enc\u00f6der", result) == want.SerializeToString()


def test_one_text_is_embedded_as_the_graph_embeds_it(server, encoder_graph):
    response = server.stub().Embed(pb.EmbedRequest(texts=["the cat sat on the mat"]), timeout=30)
    want, tokens = alone(encoder_graph, "the cat sat on the mat")
    got = vectors(response)
    assert response.model == "test-encoder" and got.shape == (1, encoder_graph.card.embedding_dim)
    assert response.embeddings[0].tokens == tokens and response.prompt_tokens == tokens
    assert np.abs(got[0] - want).max() <= BATCHED_BOUND
    assert abs(np.linalg.norm(got[0]) - 1) < 1e-5  # the card says normalized


def test_many_texts_in_one_call_come_back_in_their_order(server, encoder_graph):
    response = server.stub().Embed(pb.EmbedRequest(model="test-encoder", texts=SENTENCES), timeout=30)
    want = [alone(encoder_graph, text) for text in SENTENCES]
    assert [e.tokens for e in response.embeddings] == [tokens for _, tokens in want]
    assert response.prompt_tokens == sum(tokens for _, tokens in want)
    assert np.abs(vectors(response) - np.stack([v for v, _ in want])).max() <= BATCHED_BOUND


def test_an_empty_text_is_embedded_as_its_special_tokens_alone(server):
    response = server.stub().Embed(pb.EmbedRequest(texts=[""]), timeout=30)
    assert response.embeddings[0].tokens == 2  # [CLS] [SEP]
    assert np.isfinite(vectors(response)).all()


def test_concurrent_calls_share_runs_and_each_equals_its_text_alone(batching_server, encoder_graph):
    """16 calls of mixed lengths at once: one run (a full batch of 16 runs at once, well inside the 1 s window)."""
    texts = [SENTENCES[i % len(SENTENCES)] + " and more" * (i % 5) for i in range(16)]
    stub = batching_server.stub()
    with recorded(batching_server.models.batched["test-encoder"]) as recorder, ThreadPoolExecutor(16) as pool:
        calls = [pool.submit(stub.Embed, pb.EmbedRequest(texts=[text]), timeout=30) for text in texts]
        responses = [call.result() for call in calls]
        assert recorder.batched.wait(30), recorder.runs
    assert max(recorder.runs) > 1
    worst = 0.0
    for text, response in zip(texts, responses):
        want, tokens = alone(encoder_graph, text)
        assert response.embeddings[0].tokens == tokens
        worst = max(worst, float(np.abs(vectors(response)[0] - want).max()))
    assert worst <= BATCHED_BOUND, worst


def test_a_text_longer_than_the_model_reads_is_refused_unless_truncated(server, encoder_graph):
    max_tokens = encoder_graph.card.max_tokens
    long_text = " ".join(["cat"] * (2 * max_tokens))
    stub = server.stub()
    details = refused(stub.Embed, pb.EmbedRequest(texts=["a dog", long_text]), grpc.StatusCode.INVALID_ARGUMENT)
    assert details.startswith("texts[1]: ") and f"{max_tokens} tokens" in details and "truncate" in details, details
    response = stub.Embed(pb.EmbedRequest(texts=[long_text], truncate=True), timeout=30)
    assert response.embeddings[0].tokens == max_tokens
    truncated = encoder_graph.tokenizer.encode(long_text)  # the graph's tokenizer truncates at max_tokens
    assert truncated.tokens[-1] == "[SEP]" and len(truncated.ids) == max_tokens
    assert np.abs(vectors(response)[0] - encoder_graph.run([truncated.ids])[0]).max() <= BATCHED_BOUND


def test_calls_over_the_per_call_limit_or_without_texts_are_refused(server):
    stub = server.stub()
    details = refused(stub.Embed, pb.EmbedRequest(texts=["a"] * 129), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "texts: has 129 entries; at most 128 per call are allowed"
    assert "texts: is empty" in refused(stub.Embed, pb.EmbedRequest(), grpc.StatusCode.INVALID_ARGUMENT)


# ---- Classify ----

def test_png_and_raw_images_are_classified_as_the_graph_classifies_them(server, test_classifier_dir, digits):
    pixels, _ = digits
    large = [np.kron(p, np.ones((4, 4), np.uint8)) for p in pixels]  # 32 x 32: BOX shrinks them back exactly
    images = [pb.Image(encoded=png(p)) for p in large[:4]] + [raw_image(p) for p in pixels[4:]]
    response = server.stub().Classify(pb.ClassifyRequest(images=images), timeout=30)
    graph = ImageClassifierGraph(test_classifier_dir, EncoderCard.load(test_classifier_dir), intra_op_threads=1)
    want = graph.run([x for x, _ in graph.prepare([p[:, :, None] for p in pixels])])  # [8, 10]
    assert response.model == "vit-digits" and len(response.results) == len(pixels)
    for result, probabilities in zip(response.results, want):
        indices = [label.index for label in result.labels]
        got = np.array([label.probability for label in result.labels])
        assert sorted(indices) == list(range(10)) and (np.diff(got) <= 0).all()  # every label, most probable first
        assert [label.label for label in result.labels] == [graph.card.labels[i] for i in indices]
        assert np.abs(got - probabilities[indices]).max() <= PROBABILITY_BOUND
        assert abs(got.sum() - 1) < 1e-5


def test_top_k_keeps_the_most_probable_labels(server, digits):
    pixels, _ = digits
    stub = server.stub()
    every = stub.Classify(pb.ClassifyRequest(images=[raw_image(pixels[0])]), timeout=30).results[0].labels
    top = stub.Classify(pb.ClassifyRequest(images=[raw_image(pixels[0])], top_k=3), timeout=30).results[0].labels
    assert [label.index for label in top] == [label.index for label in every[:3]]


def test_a_bad_image_is_refused_naming_it(server, digits):
    pixels, _ = digits
    gif = io.BytesIO()
    Image.fromarray(pixels[0]).save(gif, format="GIF")
    stub = server.stub()
    request = pb.ClassifyRequest(images=[pb.Image(encoded=png(pixels[0])), pb.Image(encoded=gif.getvalue())])
    details = refused(stub.Classify, request, grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "images[1].encoded: is not a PNG or JPEG image"
    truncated = pb.ClassifyRequest(images=[pb.Image(encoded=png(pixels[1])[:40])])
    assert "truncated or corrupt PNG" in refused(stub.Classify, truncated, grpc.StatusCode.INVALID_ARGUMENT)
    wrong_length = pb.ClassifyRequest(images=[pb.Image(raw=pb.RawImage(data=bytes(10), height=8, width=8,
                                                                       channels=1))])
    assert refused(stub.Classify, wrong_length, grpc.StatusCode.INVALID_ARGUMENT).startswith("images[0].raw.data: ")
    huge = pb.ClassifyRequest(images=[pb.Image(raw=pb.RawImage(height=5000, width=5000, channels=1))])
    assert "at most 16777216 are allowed" in refused(stub.Classify, huge, grpc.StatusCode.INVALID_ARGUMENT)
    assert "is empty" in refused(stub.Classify, pb.ClassifyRequest(images=[pb.Image()]),
                                 grpc.StatusCode.INVALID_ARGUMENT)


def test_too_many_images_are_refused_before_any_is_decoded(server):
    request = pb.ClassifyRequest(images=[pb.Image(encoded=b"not even an image")] * 129)
    details = refused(server.stub().Classify, request, grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "images: has 129 entries; at most 128 per call are allowed"


def test_classifying_texts_is_refused_until_a_text_classifier_is_served(server):
    details = refused(server.stub().Classify, pb.ClassifyRequest(texts=["a review"]), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "texts: model vit-digits classifies images; no text classifier is served"


# ---- names, kinds and model info ----

def test_model_info_names_every_model_and_describes_each(server, test_encoder_dir):
    stub = server.stub()
    served = ["test", "test-encoder", "vit-digits"]
    decoder = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert decoder.kind == "decoder" and decoder.name == "test" and list(decoder.served_models) == served
    encoder = stub.GetModelInfo(pb.GetModelInfoRequest(name="test-encoder"), timeout=30)
    card = EncoderCard.load(test_encoder_dir)
    assert (encoder.kind, encoder.embedding_dim, encoder.max_input_tokens, encoder.pooling, encoder.normalized) == \
        ("encoder", card.embedding_dim, card.max_tokens, card.pooling, card.normalized)
    assert (encoder.max_batch, encoder.max_batch_tokens, encoder.max_inputs_per_request) == (32, 8192, 128)
    assert encoder.batch_window_ms == pytest.approx(2.0) and list(encoder.served_models) == served
    classifier = stub.GetModelInfo(pb.GetModelInfoRequest(name="vit-digits"), timeout=30)
    assert classifier.kind == "image-classifier" and list(classifier.labels) == [str(d) for d in range(10)]
    assert (classifier.image_height, classifier.image_width, classifier.image_channels) == (8, 8, 1)
    assert (classifier.max_image_bytes, classifier.max_image_pixels) == (4 * 1024 * 1024, 4096 * 4096)


def test_an_unknown_model_is_not_found_and_the_answer_lists_the_served_models(server):
    stub = server.stub()
    listed = "this server serves test (decoder), test-encoder (encoder), vit-digits (image-classifier)"
    details = refused(stub.GetModelInfo, pb.GetModelInfoRequest(name="nope"), grpc.StatusCode.NOT_FOUND)
    assert details == f"model 'nope' is not served here; {listed}"
    assert listed in refused(stub.Embed, pb.EmbedRequest(model="nope", texts=["a"]), grpc.StatusCode.NOT_FOUND)


def test_a_model_of_another_kind_is_refused_naming_the_right_ones(server):
    stub = server.stub()
    details = refused(stub.Embed, pb.EmbedRequest(model="vit-digits", texts=["a"]), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "model: 'vit-digits' classifies images; this call needs a model that embeds text " \
                      "(served: test-encoder)"
    request = build_request(prompt="hello", max_new_tokens=2)
    request.model = "test-encoder"
    assert "needs a model that generates text (served: test)" in refused(stub.Generate, request,
                                                                        grpc.StatusCode.INVALID_ARGUMENT)
    request.model = "test"
    assert stub.Generate(request, timeout=30).usage.completion_tokens == 2


# ---- capacity and independence from the decoder ----

def test_a_full_queue_is_resource_exhausted(batching_server):
    model = batching_server.models.batched["test-encoder"]
    stub = batching_server.stub()
    limit = model.settings.max_queued_inputs  # 8 x 16
    with held_runs(model) as (started, release), ThreadPoolExecutor(limit // 16) as pool:
        calls = [pool.submit(stub.Embed, pb.EmbedRequest(texts=["a dog"] * 16), timeout=60)
                 for _ in range(limit // 16)]
        assert started.wait(30)
        wait_until(lambda: model.queued_inputs == limit, 30, lambda: f"{model.queued_inputs} inputs queued")
        details = refused(stub.Embed, pb.EmbedRequest(texts=["one more"]), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert f"at most {limit}" in details, details
        release.set()
        assert all(len(call.result().embeddings) == 16 for call in calls)
    assert len(stub.Embed(pb.EmbedRequest(texts=["room again"]), timeout=30).embeddings) == 1


def test_generation_goes_on_while_an_encoder_run_is_held(batching_server):
    """The decoder's engine thread never waits for an encoder's batch thread, even one stuck in a run."""
    model = batching_server.models.batched["test-encoder"]
    stub = batching_server.stub()
    request = build_request(prompt_token_ids=[1, 2, 3], max_new_tokens=16, ignore_eos=True)
    before = stub.Generate(request, timeout=30)
    with held_runs(model) as (started, release), ThreadPoolExecutor(1) as pool:
        embedding = pool.submit(stub.Embed, pb.EmbedRequest(texts=["held"]), timeout=60)
        assert started.wait(30)
        during = stub.Generate(request, timeout=30)
        assert not embedding.done()
        release.set()
        assert len(embedding.result().embeddings) == 1
    assert list(during.token_ids) == list(before.token_ids) and len(during.token_ids) == 16


# ---- startup ----

def start_fails(model_dirs) -> str:
    from server.app import StartupError, start_server
    from server.config import ServerConfig

    config = ServerConfig(model=tuple(model_dirs), host="127.0.0.1", port=0, metrics_port=-1, http_port=0)
    with pytest.raises(StartupError) as caught:
        asyncio.run(start_server(config))
    return str(caught.value)


def test_two_decoders_no_decoder_or_two_models_of_one_name_do_not_start(test_model_dir, test_encoder_dir, tmp_path):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(test_model_dir, twin)
    assert "run one server per decoder" in start_fails([test_model_dir, twin])
    assert "no decoder dir" in start_fails([test_encoder_dir])
    copy = tmp_path / "encoder-copy"
    shutil.copytree(test_encoder_dir, copy)
    assert "both named test-encoder" in start_fails([test_model_dir, test_encoder_dir, copy])


@pytest.mark.slow
def test_the_command_line_serves_every_model_and_the_client_embeds_and_classifies(
        test_model_dir, test_encoder_dir, test_classifier_dir, digits, tmp_path):
    served = ServerProcess(test_model_dir, "--model", str(test_encoder_dir), "--model", str(test_classifier_dir),
                           *("--kv-slots", "2", "--max-seq-len", "256"))
    try:
        ready = next(line for line in served.log if "attnserve ready" in line)
        assert "also test-encoder (encoder, 64 dims, 128 tokens" in ready and "vit-digits (image-classifier" in ready

        def client(*args):
            result = subprocess.run([sys.executable, "-m", "server.client", *args, "--target", served.target],
                                    cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr
            return result.stdout

        out = client("embed", "the cat sat", "a dog", "the cat sat")
        assert "test-encoder: 3 embeddings of 64 dims" in out and "cosine similarity:" in out, out
        assert out.splitlines()[-1].split()[-3:][0] == "1.0000", out  # row 2, column 0: the same text twice
        image = tmp_path / "digit.png"
        image.write_bytes(png(np.kron(digits[0][0], np.ones((4, 4), np.uint8))))
        out = client("classify", str(image), "--top-k", "2")
        line = next(line for line in out.splitlines() if line.startswith(f"{image}: "))
        assert out.startswith("vit-digits:") and len(line.split(": ", 1)[1].split(", ")) == 2, out
    finally:
        served.stop()
