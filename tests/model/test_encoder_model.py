"""The encoder and Vision Transformer shapes of the one model definition, and the decoder presets left as they were."""
from __future__ import annotations

import json

import pytest
import torch

from model.config import PRESETS, ModelConfig, preset
from model.transformer import Block, PatchEmbedding, Transformer, pool

# fp32 on unit-scale activations of a 2-layer model: rows computed in different batch shapes differ by
# rounding only, measured up to 3e-7; 1e-5 leaves a margin of 30x.
ATOL = 1e-5
# The fields every config had before encoders and vision: a decoder's saved config has exactly these.
DECODER_FIELDS = [
    "name", "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_positions", "n_kv_heads", "positional",
    "rope_theta", "norm", "norm_eps", "mlp", "bias", "tie_embeddings", "train_seq_len",
]
DECODER_PRESETS = ["test", "test-llama", "small", "smollm2-135m-instruct"]


def seeded(name: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset(name)).eval()


def random_ids(config: ModelConfig, shape, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_bidirectional_attention_sees_the_future_and_causal_does_not():
    for name, sees_future in (("test-encoder", True), ("test", False)):
        model = seeded(name)
        ids = random_ids(model.config, (1, 6))
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % model.config.vocab_size  # only the last token differs
        positions = torch.arange(6)[None]
        before, after = model.hidden_states(ids, positions), model.hidden_states(changed, positions)  # (1, 6, D)
        first_tokens_moved = (before[0, :-1] - after[0, :-1]).abs().max().item()
        assert (first_tokens_moved > 1e-3) == sees_future, (name, first_tokens_moved)


@torch.no_grad()
def test_padding_changes_nothing_for_valid_tokens():
    model = seeded("test-encoder")
    ids = random_ids(model.config, (1, 5))
    padded = torch.cat([ids, random_ids(model.config, (1, 4), seed=2)], dim=1)  # whatever sits in the padding
    mask = torch.tensor([[1] * 5 + [0] * 4])
    positions = torch.arange(9)[None]
    alone = model.hidden_states(ids, positions[:, :5])  # (1, 5, D)
    with_padding = model.hidden_states(padded, positions, key_padding=mask.bool())[:, :5]
    torch.testing.assert_close(with_padding, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(model.encode(padded, mask), model.encode(ids), atol=ATOL, rtol=0)


@torch.no_grad()
def test_batch_equals_single_and_an_empty_row_pools_to_zeros():
    model = seeded("test-encoder")
    rows = [random_ids(model.config, (1, n), seed=n) for n in (7, 3, 5)]
    ids = torch.zeros(4, 7, dtype=torch.long)
    mask = torch.zeros(4, 7, dtype=torch.long)  # row 3 stays all padding: an empty input
    types = torch.zeros(4, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :row.size(1)], mask[i, :row.size(1)] = row[0], 1
        types[i, 2:row.size(1)] = 1  # a second segment
    batched = model.encode(ids, mask, types)  # (4, D)
    for i, row in enumerate(rows):
        single = model.encode(row, None, types[i:i + 1, :row.size(1)])
        torch.testing.assert_close(batched[i:i + 1], single, atol=ATOL, rtol=0)
    assert torch.isfinite(batched).all()
    assert batched[3].abs().max() == 0
    torch.testing.assert_close(batched[:3].norm(dim=-1), torch.ones(3), atol=1e-6, rtol=0)


def test_token_types_matter():
    model = seeded("test-encoder")
    ids = random_ids(model.config, (1, 6))
    with torch.no_grad():
        assert (model.encode(ids, None, torch.ones_like(ids)) - model.encode(ids)).abs().max() > 1e-3


@torch.no_grad()
def test_post_norm_and_pre_norm_blocks_wire_their_norms_as_named():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    positions = torch.arange(5).expand(2, 5)
    post = Block(preset("test-encoder"), 0).eval()
    inner = post.attn_norm(x + post.attn(x, positions, None))
    assert torch.equal(post(x, positions, None), post.mlp_norm(inner + post.mlp(inner)))
    pre = Block(preset("test"), 0).eval()
    inner = x + pre.attn(pre.attn_norm(x), positions, None)
    assert torch.equal(pre(x, positions, None), inner + pre.mlp(pre.mlp_norm(inner)))


def test_post_norm_models_have_no_final_norm():
    names = {name.split(".")[0] for name in seeded("test-encoder").state_dict()}
    assert names == {"tok_emb", "type_emb", "pos_emb", "emb_norm", "blocks"}
    vit_names = {name.split(".")[0] for name in seeded("vit-digits").state_dict()}
    assert vit_names == {"patch_emb", "pos_emb", "blocks", "final_norm", "classifier"}


def test_pooling_math():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2): the last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0]]))
    assert torch.equal(pool(hidden, torch.zeros_like(mask), "mean"), torch.zeros(1, 2))


@torch.no_grad()
def test_patch_front_takes_patches_row_by_row_after_a_cls_token():
    config = preset("vit-digits")
    torch.manual_seed(0)
    front = PatchEmbedding(config)
    images = torch.randn(3, 1, 8, 8)
    tokens = front(images)  # (B, 1 + N, D)
    assert tokens.shape == (3, 1 + 16, config.d_model)
    assert torch.equal(tokens[:, 0], front.cls[0].expand(3, -1))
    p = config.patch_size
    weight = front.proj.weight.flatten(1)  # (D, C * p * p)
    for row, col in ((0, 0), (0, 3), (2, 1), (3, 3)):
        pixels = images[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p].flatten(1)  # (B, C * p * p)
        projected = pixels @ weight.t() + front.proj.bias  # (B, D)
        torch.testing.assert_close(tokens[:, 1 + row * 4 + col], projected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_classifier_logits_batch_equals_single():
    model = seeded("vit-digits")
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    logits = model.classify(images)
    assert logits.shape == (4, 10)
    for i in range(4):
        torch.testing.assert_close(logits[i:i + 1], model.classify(images[i:i + 1]), atol=ATOL, rtol=0)


def test_each_head_has_its_own_entry_point():
    with pytest.raises(ValueError, match="embedding head"):
        seeded("test").encode(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="use encode"):
        seeded("test-encoder")(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="classifier head"):
        seeded("test-encoder").classify(torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("name", DECODER_PRESETS)
def test_decoder_presets_save_the_config_they_always_did(name):
    saved = PRESETS[name].to_dict()
    assert list(saved) == DECODER_FIELDS
    assert ModelConfig.from_dict(json.loads(json.dumps(saved))) == PRESETS[name]


def test_decoder_modules_are_the_ones_they_always_were():
    names = {name.split(".")[0] for name in seeded("test").state_dict()}
    assert names == {"tok_emb", "blocks", "final_norm"}  # tied head, sinusoidal table not saved
    assert {name.split(".")[0] for name in seeded("test-llama").state_dict()} == {"tok_emb", "blocks", "final_norm"}


def test_the_minilm_preset_has_the_published_sizes():
    c = preset("all-minilm-l6-v2")
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.d_ff, c.max_positions, c.type_vocab_size, c.norm_eps) == (
        30522, 384, 6, 12, 1536, 512, 2, 1e-12)
    assert (c.causal, c.norm_position, c.embedding_norm, c.pooling, c.normalize_embeddings) == (
        False, "post", True, "mean", True)
    with torch.no_grad():
        # BertModel's 22,713,216 parameters less its unused pooler (384 x 384 + 384).
        assert Transformer(c).num_parameters() == 22_713_216 - 384 * 384 - 384


@pytest.mark.parametrize("changes, message", [
    (dict(causal=False), "needs causal attention"),
    (dict(pooling="mean"), "does not fit head"),
    (dict(head="embedding", causal=False), "does not fit head"),
    (dict(head="classifier"), "n_labels 0"),
    (dict(norm_position="middle"), "norm_position must be"),
    (dict(image_size=8), "need patch_size"),
])
def test_invalid_text_configs_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        preset("test").replace(**changes)


@pytest.mark.parametrize("changes, message", [
    (dict(max_positions=16), "max_positions must be 17"),
    (dict(patch_size=3), "multiple of patch_size"),
    (dict(vocab_size=10), "no token vocabulary"),
    (dict(positional="sinusoidal"), "learned positions"),
    (dict(channels=0), "channels must be positive"),
])
def test_invalid_vision_configs_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        preset("vit-digits").replace(**changes)


def test_the_trainer_routes_image_presets_and_refuses_text_options(tmp_path, capsys):
    import model.train

    out = tmp_path / "vit"
    assert model.train.main(["--preset", "vit-digits", "--out", str(out), "--steps", "3", "--seed", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "training_curves.json", "training_curves.png"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["training"]["steps"] == 3 and meta["split"]["seed"] == 1 and meta["image"]["ink"] == "light-on-dark"
    capsys.readouterr()
    for args, message in ((["--preset", "vit-digits", "--corpus", "x"], "--corpus applies to text presets"),
                          (["--preset", "test", "--epochs", "2"], "--epochs applies to image presets"),
                          (["--preset", "test-encoder"], "not a language model")):
        assert model.train.main(args + ["--out", str(tmp_path / "other")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "other").exists()
