"""InspectAttention: probabilities from the served graph against PyTorch's explicit softmax, limits, queue,
old model dirs, reflection, and the client's pictures (PNG opened, HTML rendered in headless chromium)."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from attnserve.v1 import generation_pb2 as pb
from export.inspection import add_to_model_dir, reference_attention
from server import attention_render, contract
from server.attention_render import HeadPicture
from server.client import AttnserveClient, attention_pictures
from server.contract import ModelCard
from server.inspection import entropy
from tests.server.helpers import ROOT, InProcessServer

# Seeded token ids of the `test` preset's vocabulary (512): the same inputs on every machine.
PROMPT_IDS = [int(i) for i in np.random.default_rng(13).integers(3, 500, 12)]
# Probabilities are in [0, 1] and rows are softmaxes of O(1) scores: fp32 rounding stays near 1e-7 on the seed-style
# model (2 layers); 1e-5 leaves a hundredfold margin. SmolLM2 (30 layers, larger activations) gets the fp32 import
# bound the exporter holds its logits to.
SEED_BOUND = 1e-5
IMPORT_BOUND = 1e-3


def probabilities(response) -> dict[tuple[int, int], np.ndarray]:
    T = len(response.token_ids)
    return {(h.layer, h.head): np.frombuffer(h.probabilities, dtype="<f4").reshape(T, T) for h in response.attention}


@pytest.fixture(scope="module")
def server(test_model_dir):
    server = InProcessServer(test_model_dir, kv_slots=2, max_seq_len=256, inspection_max_tokens=64,
                             inspection_max_generated_tokens=8, inspection_max_floats=16384)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with AttnserveClient(server.target, timeout=60) as client:
        yield client


def check_against_reference(response, reference: np.ndarray, card: ModelCard, bound: float,
                            row_sum_tolerance: float = 1e-5) -> float:
    """Asserts every head's probabilities equal the reference's within bound; returns the largest difference."""
    T = len(response.token_ids)
    worst = 0.0
    assert len(response.attention) == card.n_layers * card.n_heads
    for head in response.attention:
        p = np.frombuffer(head.probabilities, dtype="<f4").reshape(T, T)
        assert head.kv_head == head.head // (card.n_heads // card.n_kv_heads)
        assert np.all(p[np.triu_indices(T, 1)] == 0.0), "attention above the diagonal (the future)"
        np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=row_sum_tolerance)
        np.testing.assert_allclose(np.asarray(head.entropy), entropy(p), atol=1e-5)
        worst = max(worst, float(np.abs(p - reference[head.layer, head.head]).max()))
    assert worst <= bound, f"max |p - PyTorch| = {worst:.2e} > {bound:g}"
    return worst


def test_probabilities_equal_pytorch_explicit_softmax(client, test_checkpoint, test_model_dir):
    from model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(test_checkpoint)
    response = client.inspect_attention(prompt_token_ids=PROMPT_IDS)
    assert list(response.token_ids) == PROMPT_IDS and response.prompt_tokens == len(PROMPT_IDS)
    worst = check_against_reference(response, reference_attention(model, PROMPT_IDS), ModelCard.load(test_model_dir),
                                    SEED_BOUND)
    print(f"seed-style `test` model, {len(PROMPT_IDS)} tokens: max |p - PyTorch| = {worst:.2e}")


def test_the_inspection_graph_shares_the_weights_file(test_model_dir):
    import onnx

    card = ModelCard.load(test_model_dir)
    assert card.graphs[contract.INSPECTION_GRAPH] == contract.INSPECTION_MODEL_FILE
    model = onnx.load(str(test_model_dir / contract.INSPECTION_MODEL_FILE), load_external_data=False)
    locations = {e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"}
    assert locations == {contract.MODEL_FILE + ".data"}
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert [n.output[3] for n in gqa] == [contract.attention_output(i) for i in range(card.n_layers)]
    assert all(a.i == 2 for n in gqa for a in n.attribute if a.name == "qk_output")  # after softmax
    assert (test_model_dir / contract.INSPECTION_MODEL_FILE).stat().st_size < 1024 * 1024  # no weights inside


@pytest.mark.slow
def test_grouped_query_heads_read_their_kv_head(test_llama_checkpoint, tmp_path_factory):
    """test-llama: rotary positions and 2 query heads per KV head, against the same explicit softmax."""
    from export.model_dir import build_model_dir
    from model.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("inspect-llama") / "test-llama"
    card = build_model_dir(test_llama_checkpoint, out, log=lambda *_: None)
    assert card.n_heads // card.n_kv_heads == 2
    model, _ = load_checkpoint(test_llama_checkpoint)
    server = InProcessServer(out, kv_slots=1, max_seq_len=128)
    try:
        with AttnserveClient(server.target, timeout=60) as client:
            response = client.inspect_attention(prompt_token_ids=PROMPT_IDS)
    finally:
        server.stop()
    worst = check_against_reference(response, reference_attention(model, PROMPT_IDS), card, SEED_BOUND)
    print(f"test-llama, {len(PROMPT_IDS)} tokens: max |p - PyTorch| = {worst:.2e}")


def test_fp16_dirs_answer_float32_probabilities(test_fp16_model_dir, test_checkpoint):
    """fp16 weights and attention, probabilities cast to float32 in the graph; fp16 rounds to about 1e-3."""
    from model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(test_checkpoint)
    server = InProcessServer(test_fp16_model_dir, kv_slots=1, max_seq_len=128)
    try:
        with AttnserveClient(server.target, timeout=60) as client:
            response = client.inspect_attention(prompt_token_ids=PROMPT_IDS)
    finally:
        server.stop()
    worst = check_against_reference(response, reference_attention(model, PROMPT_IDS),
                                    ModelCard.load(test_fp16_model_dir), 1e-2, row_sum_tolerance=4e-3)
    print(f"fp16 `test` model: max |p - PyTorch fp32| = {worst:.2e}")


def test_prompt_plus_generated_tokens_equals_inspecting_the_full_text(client):
    response = client.inspect_attention(prompt_token_ids=PROMPT_IDS, generated_tokens=5, layers=[1], heads=[0, 3])
    assert response.prompt_tokens == len(PROMPT_IDS) and response.generated_tokens == 5
    assert [(h.layer, h.head) for h in response.attention] == [(1, 0), (1, 3)]
    generated = list(response.token_ids[len(PROMPT_IDS):])
    greedy = client.generate(prompt_token_ids=PROMPT_IDS, max_new_tokens=5, ignore_eos=True)
    assert generated == list(greedy.token_ids), "inspection's greedy tokens differ from Generate's"
    full = client.inspect_attention(prompt_token_ids=list(response.token_ids), layers=[1], heads=[0, 3])
    assert full.generated_tokens == 0 and list(full.token_ids) == list(response.token_ids)
    for key, p in probabilities(response).items():
        np.testing.assert_array_equal(p, probabilities(full)[key])


def test_text_prompts_and_token_labels(client):
    response = client.inspect_attention("def main():", layers=[0], heads=[1])
    tokens = client.stub.Tokenize(pb.TokenizeRequest(prompt="def main():"))
    assert list(response.token_ids) == list(tokens.token_ids) and list(response.tokens) == list(tokens.tokens)
    assert "".join(response.token_texts) == "def main():"


def test_model_info_states_the_limits(client):
    info = client.model_info()
    assert info.inspection_available
    assert (info.inspection_max_tokens, info.inspection_max_generated_tokens, info.inspection_max_floats,
            info.inspection_max_queued) == (64, 8, 16384, 2)


@pytest.mark.parametrize("kwargs, field", [
    (dict(layers=[2]), "layers[0]"),
    (dict(layers=[0, 0]), "layers"),
    (dict(heads=[1, 4]), "heads[1]"),
    (dict(generated_tokens=9), "generated_tokens"),
    (dict(prompt_token_ids=list(range(3, 3 + 60)), generated_tokens=5), "prompt_token_ids"),  # 65 > 64 tokens
    (dict(prompt_token_ids=list(range(3, 3 + 46))), "layers"),  # 2 x 4 x 46^2 = 16,928 > 16,384 floats
    (dict(prompt_token_ids=[]), "prompt_token_ids"),
    (dict(prompt_token_ids=[512]), "prompt_token_ids"),
])
def test_limits_are_invalid_argument_naming_the_field(client, kwargs, field):
    kwargs.setdefault("prompt_token_ids", PROMPT_IDS)
    with pytest.raises(grpc.RpcError) as error:
        client.inspect_attention(**kwargs)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field + ":"), error.value.details()


def test_a_full_inspection_queue_is_resource_exhausted(test_model_dir):
    """One inspection at most: while the worker is held, the next is refused at once; generation goes on."""
    server = InProcessServer(test_model_dir, kv_slots=1, max_seq_len=128, inspection_max_queued=1)
    release = threading.Event()
    try:
        with AttnserveClient(server.target, timeout=60) as client:
            held = server.server.inspection.inspector.submit(lambda: release.wait(60))
            with pytest.raises(grpc.RpcError) as error:
                client.inspect_attention(prompt_token_ids=PROMPT_IDS)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--inspection-max-queued 1" in error.value.details()
            assert client.generate(prompt_token_ids=PROMPT_IDS, max_new_tokens=4, ignore_eos=True).usage.completion_tokens == 4
            release.set()
            assert held.result(30) is True
            assert len(client.inspect_attention(prompt_token_ids=PROMPT_IDS, layers=[0]).attention) == 4
    finally:
        release.set()
        server.stop()


def test_a_dir_without_the_inspection_graph_is_failed_precondition(test_model_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(test_model_dir, old)
    (old / contract.INSPECTION_MODEL_FILE).unlink()
    card = json.loads((old / contract.CARD_FILE).read_text())
    del card["graphs"][contract.INSPECTION_GRAPH]
    (old / contract.CARD_FILE).write_text(json.dumps(card))
    server = InProcessServer(old, kv_slots=1, max_seq_len=128)
    try:
        with AttnserveClient(server.target, timeout=60) as client:
            assert not client.model_info().inspection_available
            with pytest.raises(grpc.RpcError) as error:
                client.inspect_attention(prompt_token_ids=PROMPT_IDS)
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "re-export it with `python -m export`" in error.value.details()
            assert f"python -m export.inspection {old}" in error.value.details()
            assert client.generate(prompt_token_ids=PROMPT_IDS, max_new_tokens=2).usage.completion_tokens == 2
    finally:
        server.stop()
    add_to_model_dir(old)  # what the message says to do
    server = InProcessServer(old, kv_slots=1, max_seq_len=128)
    try:
        with AttnserveClient(server.target, timeout=60) as client:
            assert len(client.inspect_attention(prompt_token_ids=PROMPT_IDS, heads=[2]).attention) == 2
    finally:
        server.stop()


def test_reflection_alone_describes_and_calls_it_with_json(server):
    """What grpcurl does (`describe`, then `-d '{...}'`), from the server's reflection service only."""
    channel = grpc.insecure_channel(server.target)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("attnserve.v1.Generation").FindMethodByName("InspectAttention")
    assert [f.name for f in method.input_type.fields][:6] == ["prompt", "messages", "prompt_token_ids", "layers",
                                                              "heads", "generated_tokens"]
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(json.dumps({"promptTokenIds": {"ids": PROMPT_IDS[:4]}, "layers": [0], "heads": [0]}),
                                request_class())
    call = channel.unary_unary("/attnserve.v1.Generation/InspectAttention", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response_class.FromString)
    answer = json_format.MessageToDict(call(request, timeout=60))
    channel.close()
    assert [int(i) for i in answer["tokenIds"]] == PROMPT_IDS[:4]
    (head,) = answer["attention"]
    assert head.get("layer", 0) == 0 and len(head["entropy"]) == 4
    p = np.frombuffer(base64.b64decode(head["probabilities"]), dtype="<f4").reshape(4, 4)
    assert p[0, 0] == pytest.approx(1.0) and p[0, 1:].sum() == 0


# ---- the client's pictures ----

def run_cli(server, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "server.client", "inspect", *args, "--target", server.target],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_png_grid_and_single_head(server, tmp_path):
    from PIL import Image

    out = run_cli(server, "def main(): return 42", "--png", str(tmp_path / "grid.png"))
    assert "wrote" in out and "2 layers x 4 heads" in out
    assert out.count("\n    0    ") + out.count("\n    1    ") == 8, out  # a summary row per head
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.info[attention_render.PNG_GRID_KEY] == "2x4"
        assert grid.width > grid.height > 100
        assert np.unique(np.asarray(grid.convert("L"))).size > 10  # drawn, not blank
    run_cli(server, "def main(): return 42", "--layer", "1", "--head", "2", "--png", str(tmp_path / "one.png"))
    with Image.open(tmp_path / "one.png") as one:
        assert one.info[attention_render.PNG_GRID_KEY] == "1x1" and one.width >= 400


def test_head_kinds_in_the_summary():
    T = 6
    first = np.zeros((T, T), np.float32)
    first[:, 0] = 1
    previous = np.eye(T, k=-1, dtype=np.float32)
    previous[0, 0] = 1
    uniform = np.tril(np.ones((T, T), np.float32))
    uniform /= uniform.sum(-1, keepdims=True)
    heads = [HeadPicture(0, i, p, entropy(p)) for i, p in enumerate([first, previous, np.eye(T, dtype=np.float32),
                                                                      uniform])]
    kinds = [attention_render.summarize(h).kind for h in heads]
    assert kinds == ["first-token head", "previous-token head", "self head", "mixed"]
    assert "1 first-token head, 1 mixed, 1 previous-token head, 1 self head" in attention_render.summary_text(heads)


CHROMIUM = shutil.which("chromium")
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def chromium(*args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed; run `make deploy-tools` (part of `make test`)")
    return subprocess.run([CHROMIUM, *HEADLESS, *args], capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    """Console output (errors, uncaught exceptions) that chromium logs with --enable-logging=stderr; the pages
    themselves log nothing, so any message is a failure."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_the_console_check_sees_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><p>x</p><script>missingFunction();</script>")
    messages = console_messages(chromium("--dump-dom", page.as_uri()).stderr)
    assert any("missingFunction is not defined" in m for m in messages), messages


@pytest.mark.slow
def test_html_page_renders_in_headless_chromium(server, tmp_path):
    from PIL import Image

    page = tmp_path / "attention.html"
    run_cli(server, "def main(): return 42", "--html", str(page), "--layer", "0")
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text  # nothing fetched at view time
    with AttnserveClient(server.target, timeout=60) as client:
        labels, _ = attention_pictures(client.inspect_attention("def main(): return 42", layers=[0]))
    dom = chromium("--dump-dom", page.as_uri() + "#q=2")
    assert dom.returncode == 0 and not console_messages(dom.stderr), console_messages(dom.stderr)
    assert 'data-rendered="yes"' in dom.stdout
    for position, token in enumerate(labels):
        assert f'data-position="{position}">{token}</span>' in dom.stdout
    assert dom.stdout.count('title="L0 H') == 4 * len(labels)  # query token 2's attention, on every head's row
    assert f'query: token 2 {json.dumps(labels[2], ensure_ascii=False)}' in dom.stdout.replace("&quot;", '"')
    shot = tmp_path / "attention.png"
    result = chromium("--window-size=1000,700", f"--screenshot={shot}", page.as_uri())
    assert result.returncode == 0 and not console_messages(result.stderr)
    with Image.open(shot) as image:
        assert image.size == (1000, 700)
        assert np.unique(np.asarray(image.convert("L"))).size > 10  # text and coloured cells, not a blank page


# ---- SmolLM2 (slow: a real 135M model) ----

@pytest.mark.slow
def test_smollm2_probabilities_equal_pytorch(smollm2_model_dir):
    from export.importers import build_model, find_smollm2_gguf, gguf_state_dict, open_gguf
    from model.config import ModelConfig
    from server.prompts import load_tokenizer

    card = ModelCard.load(smollm2_model_dir)
    gguf = find_smollm2_gguf()
    tensors = {t.name: t for t in open_gguf(gguf).tensors}
    config = ModelConfig.from_dict(card.model)
    model = build_model(config, gguf_state_dict(tensors, config, gguf.name), gguf.name)
    ids = load_tokenizer(smollm2_model_dir).encode("The capital of France is Paris, and the capital of Italy is").ids
    server = InProcessServer(smollm2_model_dir, kv_slots=1, max_seq_len=128)
    try:
        with AttnserveClient(server.target, timeout=300,
                             options=[("grpc.max_receive_message_length", 64 * 2 ** 20)]) as client:
            response = client.inspect_attention(prompt_token_ids=ids)
    finally:
        server.stop()
    assert card.n_heads // card.n_kv_heads == 3
    worst = check_against_reference(response, reference_attention(model, ids), card, IMPORT_BOUND)
    print(f"SmolLM2, {len(ids)} tokens, {card.n_layers} layers x {card.n_heads} heads: max |p - PyTorch| = {worst:.2e}")
