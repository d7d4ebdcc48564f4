"""onnxruntime-genai runs the model dir's genai files and generates what our own runner generates.

A random checkpoint of each test preset (Llama-style with RoPE inside GroupQueryAttention; seed-style
with positions added to the embeddings, where the wrapper's position_ids matter) is exported by
build_model_dir, which writes genai_config.json and the wrapper graph. Greedy tokens through genai's
Generator (one prompt, and a right-padded batch) and its Engine (requests of
different lengths, in two static batches) must equal greedy tokens through server.runner.ModelRunner,
token for token.
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

og = pytest.importorskip("onnxruntime_genai")

from server import contract  # noqa: E402
from export.genai import GENAI_MODEL_FILE, TOKENIZER_CONFIG_FILE  # noqa: E402
from export.model_dir import build_model_dir  # noqa: E402
from export.verify import Row, step  # noqa: E402
from model import Transformer, preset, save_checkpoint  # noqa: E402
from server.runner import ModelRunner  # noqa: E402

NEW_TOKENS = 40
EOS = 0  # <|endoftext|>, the tokenizer's only special token
PROMPT_LENGTHS = (11, 3, 7, 1, 5)  # five requests: the Engine runs them as static batches of 4 and 1


def random_checkpoint(name: str, out_dir: Path) -> Path:
    """A checkpoint of preset `name` with random weights and a small byte-level BPE tokenizer.

    Weights are drawn wider than the default init so that greedy decoding wanders over the
    vocabulary instead of repeating one token: a stricter comparison.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello world the quick brown fox"] * 100, trainer)
    torch.manual_seed(0)
    model = Transformer(preset(name))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.3)
    special = {"bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": None}
    return save_checkpoint(out_dir, model, tokenizer.to_str(), special)


@pytest.fixture(scope="module", params=["test-llama", "test"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"genai-{request.param}")
    checkpoint = random_checkpoint(request.param, root / "checkpoint")
    card = build_model_dir(checkpoint, root / "model", log=lambda *_: None)
    model = og.Model(str(root / "model"))
    yield root / "model", card, model
    del model
    gc.collect()  # genai reports objects still alive at exit; free them while the interpreter is whole


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(1, 400, n).tolist() for n in PROMPT_LENGTHS]  # no EOS inside a prompt


def ours(model_dir: Path, card, prompt: list[int]) -> list[int]:
    """Greedy tokens through our runner until NEW_TOKENS or EOS (not included)."""
    runner = ModelRunner(model_dir, card, kv_slots=1, capacity=len(prompt) + NEW_TOKENS + 1)
    row = Row(list(prompt))
    logits = step(runner, [row], [len(prompt)])
    out: list[int] = []
    while len(out) < NEW_TOKENS:
        token = int(logits[0].argmax())
        if token == EOS:
            break
        out.append(token)
        row.tokens.append(token)
        logits = step(runner, [row], [1])
    return out


def without_eos(tokens) -> list[int]:
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


def test_model_dir_holds_genai_files(exported):
    model_dir, card, _ = exported
    config = json.loads((model_dir / contract.GENAI_CONFIG_FILE).read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == GENAI_MODEL_FILE
    assert config["search"]["past_present_share_buffer"] is True
    assert config["search"]["do_sample"] is False
    assert config["model"]["context_length"] == card.max_positions
    assert config["model"]["eos_token_id"] == EOS
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (
        card.n_layers, card.n_kv_heads, card.head_dim)

    # The wrapper shares model.onnx's weights: every initializer it keeps outside lives in model.onnx.data.
    graph = onnx.load(str(model_dir / GENAI_MODEL_FILE), load_external_data=False).graph
    locations = {entry.value for t in graph.initializer for entry in t.external_data if entry.key == "location"}
    assert locations == {"model.onnx.data"}
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"] + [
        name for name in contract.input_names(card.n_layers) if name.startswith("past_key_values.")]
    assert [o.name for o in graph.output] == contract.output_names(card.n_layers)
    # The serving graph is untouched.
    serving = onnx.load(str(model_dir / contract.MODEL_FILE), load_external_data=False).graph
    assert [i.name for i in serving.input] == contract.input_names(card.n_layers)


def test_genai_tokenizer_matches_ours(exported):
    model_dir, _, model = exported
    reference = Tokenizer.from_file(str(model_dir / contract.TOKENIZER_FILE))
    assert (model_dir / TOKENIZER_CONFIG_FILE).exists()
    tokenizer = og.Tokenizer(model)
    text = "hello world, the quick brown fox!"
    assert [int(t) for t in tokenizer.encode(text)] == reference.encode(text).ids
    assert tokenizer.decode(np.array(reference.encode(text).ids, dtype=np.int32)) == text


def test_generator_matches_our_runner(exported, prompts):
    model_dir, card, model = exported
    prompt = prompts[0]
    expected = ours(model_dir, card, prompt)
    assert len(expected) >= 32, "the reference stopped early; pick another prompt"

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    # The prompt's logits: the same numbers as our runner's, not just the same argmax.
    runner = ModelRunner(model_dir, card, kv_slots=1, capacity=len(prompt))
    np.testing.assert_allclose(generator.get_logits().reshape(-1),
                               step(runner, [Row(list(prompt))], [len(prompt)])[0], atol=1e-4)
    while not generator.is_done():
        generator.generate_next_token()
    generated = list(generator.get_sequence(0))[len(prompt):]
    del generator
    assert without_eos(generated) == expected


def test_generator_batch_matches_our_runner(exported, prompts):
    """genai's Generator takes a batch right-padded with pad_token_id and masks the padding."""
    model_dir, card, model = exported
    batch = prompts[:3]
    width = max(map(len, batch))
    config = json.loads((model_dir / contract.GENAI_CONFIG_FILE).read_text())
    pad = config["model"]["pad_token_id"]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + NEW_TOKENS, do_sample=False, batch_size=len(batch))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([p + [pad] * (width - len(p)) for p in batch], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    generated = [without_eos(list(generator.get_sequence(b))[width:]) for b in range(len(batch))]
    del generator
    assert generated == [ours(model_dir, card, p) for p in batch]


def test_engine_matches_our_runner(exported, prompts):
    """genai's Engine (which batches requests itself): five requests of different lengths, all at once."""
    model_dir, card, model = exported
    engine = og.Engine(model)
    requests, tokens = [], {}
    for prompt in prompts:
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(NEW_TOKENS)
        options.set_do_sample(False)
        request.begin_turn(np.array(prompt, dtype=np.int32), options)
        requests.append(request)
        tokens[id(request)] = []
    events = engine.create_event_buffer(16)
    while engine.has_pending_requests():
        for event in engine.run(events):
            assert not event.flags & og.EngineEventFlags.FAILED, f"genai failed: {event.error_code}"
            if event.flags & og.EngineEventFlags.TOKEN:
                tokens[id(event.request)].append(int(event.token))
    generated = [without_eos(tokens[id(r)]) for r in requests]
    for request in requests:
        request.close()
    del requests, events, engine
    assert generated == [ours(model_dir, card, p) for p in prompts]
