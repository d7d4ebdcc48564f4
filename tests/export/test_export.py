"""python -m export: the model dir contract, the verification figures, and clear errors on bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from server import contract
from server.contract import ModelCard
from export.model_dir import build_model_dir
from server.runner import ModelRunner

ROOT = Path(__file__).resolve().parents[2]


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_model_dir_has_gqa_and_figures_within_bounds(test_model_dir):
    card = ModelCard.load(test_model_dir)
    figures = card.verification
    print("verification figures:", json.dumps(figures))
    for name in ("prompt_max_abs_diff", "decode_max_abs_diff", "ragged_max_abs_diff"):
        assert 0 <= figures[name] <= 1e-4, name
    assert figures["bound"] == 1e-4 and figures["greedy_cache_equals_recompute"] is True
    for name in (contract.MODEL_FILE, contract.TOKENIZER_FILE, contract.CARD_FILE, contract.GENAI_CONFIG_FILE):
        assert (test_model_dir / name).is_file(), name


def test_graph_uses_gqa_in_place_and_never_concatenates_the_cache(test_model_dir):
    graph = onnx.load(str(test_model_dir / contract.MODEL_FILE), load_external_data=False).graph
    card = ModelCard.load(test_model_dir)
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    assert len(gqa) == card.n_layers
    past_names = {contract.past_key(i) for i in range(card.n_layers)} | {contract.past_value(i) for i in range(card.n_layers)}
    for node in graph.node:
        if node.op_type == "Concat":
            assert not past_names & set(node.input), f"{node.name} concatenates the cache"
    # Each layer's past buffers go straight into its GQA node, and its outputs are the presents.
    for i, node in enumerate(sorted(gqa, key=lambda n: n.input[3])):
        assert node.input[3] in past_names and node.input[4] in past_names
        assert node.input[contract.QUERY_SEQLENS_INDEX] == contract.QUERY_SEQLENS
    present = {o.name for o in graph.output} - {contract.LOGITS}
    assert present == {n.output[1] for n in gqa} | {n.output[2] for n in gqa}


def test_graph_names_agree_between_exporter_and_server(test_model_dir):
    card = ModelCard.load(test_model_dir)
    runner = ModelRunner(test_model_dir, card, kv_slots=2, capacity=64, device="cpu")
    assert [i.name for i in runner.session.get_inputs()] == contract.input_names(card.n_layers) == card.inputs
    assert [o.name for o in runner.session.get_outputs()] == contract.output_names(card.n_layers) == card.outputs


def test_llama_family_export_verifies(test_llama_checkpoint, tmp_path):
    card = build_model_dir(test_llama_checkpoint, tmp_path / "llama", log=lambda *_: None)
    assert card.architecture == "llama" and card.n_kv_heads < card.n_heads
    assert card.verification["greedy_cache_equals_recompute"] is True
    assert max(card.verification[k] for k in ("prompt_max_abs_diff", "decode_max_abs_diff", "ragged_max_abs_diff")) <= 1e-3


def test_cli_exports_a_trained_checkpoint(test_checkpoint, tmp_path):
    result = run_export("--checkpoint", str(test_checkpoint), "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert "verification" in result.stdout and "greedy 64 tokens" in result.stdout
    assert (tmp_path / "m" / contract.MODEL_FILE).is_file()


# ---- bad input: one line, non-zero exit, nothing left behind --------------------------------------


def test_missing_checkpoint(tmp_path):
    result = run_export("--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "m"))
    assert_one_line_error(result, "does not exist", "model.train")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["weights", "config", "missing-tokenizer"])
def test_corrupt_checkpoint(test_checkpoint, tmp_path, damage):
    broken = tmp_path / "ckpt"
    shutil.copytree(test_checkpoint, broken)
    if damage == "weights":
        (broken / "model.safetensors").write_bytes(b"\x00" * 64)
        words = ["model.safetensors", "corrupt"]
    elif damage == "config":
        (broken / "config.json").write_text("{not json")
        words = ["config.json", "corrupt"]
    else:
        (broken / "tokenizer.json").unlink()
        words = ["tokenizer.json"]
    result = run_export("--checkpoint", str(broken), "--out", str(tmp_path / "m"))
    assert_one_line_error(result, *words)
    assert not (tmp_path / "m").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind


def test_unknown_preset(tmp_path):
    assert_one_line_error(run_export("--preset", "gpt-17", "--out", str(tmp_path / "m")), "unknown preset", "gpt-17")
    assert_one_line_error(run_export("--preset", "small", "--out", str(tmp_path / "m")), "model.train")


def test_unsupported_gguf_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(run_export("--from-gguf", str(path), "--out", str(tmp_path / "m")), "mamba")
    assert not (tmp_path / "m").exists()


def test_tokenizer_that_disagrees_with_the_model(test_checkpoint, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    broken = tmp_path / "ckpt"
    shutil.copytree(test_checkpoint, broken)
    big = Tokenizer(models.BPE())
    big.pre_tokenizer = pre_tokenizers.ByteLevel()
    big.train_from_iterator([f"word{i} " * 3 for i in range(3000)],
                            trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (broken / "tokenizer.json").write_text(big.to_str())
    result = run_export("--checkpoint", str(broken), "--out", str(tmp_path / "m"))
    assert_one_line_error(result, "tokenizer has", "512")
    assert not (tmp_path / "m").exists()


def test_failed_verification_leaves_no_model_dir(test_checkpoint, tmp_path, monkeypatch):
    from export import model_dir

    monkeypatch.setitem(model_dir.BOUNDS, "transformer", 0.0)  # nothing passes a zero bound
    with pytest.raises(Exception, match="exceeds the bound"):
        build_model_dir(test_checkpoint, tmp_path / "m", log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []
