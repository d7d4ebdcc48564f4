"""python -m export --dtype fp16: fp16 weights and cache, float32 logits, verified against fp32 PyTorch on the CPU EP."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import verify
from server import contract
from server.contract import ModelCard
from export.errors import ExportError
from export.model_dir import build_model_dir
from export.serving import Float32StatsRMSNorm, half_precision
from model.checkpoint import load_checkpoint
from model.config import preset
from model.transformer import RMSNorm, Transformer

ROOT = Path(__file__).resolve().parents[2]
FP16_FIGURES = ("prompt_max_abs_diff", "decode_max_abs_diff", "ragged_max_abs_diff", "teacher_forced_max_abs_diff")


def check_fp16_figures(card: ModelCard) -> dict:
    figures = card.verification
    print(f"{card.name} fp16 verification figures:", json.dumps(figures))
    assert card.dtype == "float16" and figures["dtype"] == "float16" and figures["seed"] == verify.VERIFY_SEED
    assert figures["bound"] == verify.fp16_bound(card, figures["logit_scale"])
    for name in FP16_FIGURES:
        assert 0 < figures[name] <= figures["bound"], name  # 0 would mean fp16 never ran
    assert figures["teacher_forced_top1_agreement"] >= verify.FP16_MIN_TOP1_AGREEMENT
    return figures


def test_fp16_model_dir_card_and_figures(test_fp16_model_dir):
    check_fp16_figures(ModelCard.load(test_fp16_model_dir))


def test_fp16_verification_is_seeded(test_checkpoint, test_fp16_model_dir):
    """The same tokens, so the same figures, on every run: the export's figures come back exactly."""
    model, _ = load_checkpoint(test_checkpoint)
    card = ModelCard.load(test_fp16_model_dir)
    assert verify.measure(model, test_fp16_model_dir, card, bound=None) == card.verification


def test_fp16_bound_scales_with_the_logits_and_the_square_root_of_depth(test_fp16_model_dir):
    card = ModelCard.load(test_fp16_model_dir)
    deeper = dataclasses.replace(card, n_layers=4 * (card.n_layers + 1) - 1)
    assert verify.fp16_bound(card, 8.0) == pytest.approx(2 * verify.fp16_bound(card, 4.0))
    assert verify.fp16_bound(deeper, 4.0) == pytest.approx(2 * verify.fp16_bound(card, 4.0))
    units = verify.FP16_BOUND_UNITS[card.architecture]
    assert verify.fp16_bound(card, 1.0) == pytest.approx(units * 2 ** -10 * (card.n_layers + 1) ** 0.5)


def test_fp16_graph_has_fp16_weights_and_cache_and_float32_logits(test_fp16_model_dir):
    model = onnx.load(str(test_fp16_model_dir / contract.MODEL_FILE))
    graph = model.graph
    types = {i.name: i.type.tensor_type.elem_type for i in list(graph.input) + list(graph.output)}
    card = ModelCard.load(test_fp16_model_dir)
    for layer in range(card.n_layers):
        for name in (contract.past_key(layer), contract.past_value(layer),
                     contract.present_key(layer), contract.present_value(layer)):
            assert types[name] == onnx.TensorProto.FLOAT16, name
    assert types[contract.LOGITS] == onnx.TensorProto.FLOAT
    # Every weight matrix and table is fp16; only scalar constants (eps, scales) may be float32.
    fp32_tensors = [t.name for t in graph.initializer
                    if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) > 1]
    assert fp32_tensors == []
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == card.n_layers


def test_cpu_ep_runs_group_query_attention_natively_in_fp16(test_fp16_model_dir, tmp_path):
    """What onnxruntime's CPU EP does with the fp16 graph (printed): GQA itself runs in fp16.

    Ops without an fp16 CPU kernel (MatMul, Add, Mul, Gelu, ... on x86) run in
    float32 between Cast nodes that onnxruntime inserts at session start; the
    graph still runs, with fp16 rounding at each op boundary. GroupQueryAttention
    has an fp16 CPU kernel: its cache inputs reach it with no Cast in between.
    """
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(test_fp16_model_dir / contract.MODEL_FILE), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    producers = {out: node for node in optimized.node for out in node.output}
    card = ModelCard.load(test_fp16_model_dir)
    gqa = [n for n in optimized.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == card.n_layers
    past = {contract.past_key(i) for i in range(card.n_layers)} | {contract.past_value(i) for i in range(card.n_layers)}
    for node in gqa:
        assert {node.input[3], node.input[4]} <= past, "a Cast was inserted in front of GroupQueryAttention's cache"
    behind_casts = sorted({n.op_type for n in optimized.node
                           if any(producers.get(i) is not None and producers[i].op_type == "Cast" for i in n.input)})
    print("CPU EP: ops fed by inserted or exported Casts in the fp16 graph:", behind_casts)


def test_llama_family_fp16_export_verifies(test_llama_checkpoint, tmp_path):
    card = build_model_dir(test_llama_checkpoint, tmp_path / "llama16", log=lambda *_: None, dtype="float16")
    assert card.architecture == "llama"
    check_fp16_figures(card)


def test_cli_exports_fp16(test_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(test_checkpoint),
                             "--out", str(tmp_path / "m"), "--dtype", "fp16"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime float16 vs PyTorch fp32" in result.stdout and "top-1 agreement with fp32" in result.stdout
    assert ModelCard.load(tmp_path / "m").dtype == "float16"


def test_unknown_dtype_is_refused(test_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="dtype"):
        build_model_dir(test_checkpoint, tmp_path / "m", dtype="bfloat16")
    result = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(test_checkpoint),
                             "--out", str(tmp_path / "m"), "--dtype", "bf16"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--dtype" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_fp16_rmsnorm_keeps_its_statistics_in_fp32():
    """Values above 256 square past fp16's maximum (65504); the fp32 statistics do not overflow."""
    norm = RMSNorm(8, 1e-5)
    x = torch.full((1, 8), 300.0)
    naive = norm.half()(x.half())
    assert not torch.isfinite(naive.float()).all() or naive.float().abs().max() < 0.5  # inf or collapsed to 0
    wrapped = Float32StatsRMSNorm(norm.half())(x.half())
    torch.testing.assert_close(wrapped.float(), torch.ones(1, 8), rtol=1e-3, atol=1e-3)


def test_half_precision_copies_the_model_and_leaves_it_fp32():
    torch.manual_seed(0)
    model = Transformer(preset("test-llama"))
    half = half_precision(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert half.rope.cos.dtype == torch.float16  # GroupQueryAttention's cos/sin caches share the cache's type
    assert all(isinstance(b.attn_norm, Float32StatsRMSNorm) for b in half.blocks)


@pytest.mark.parametrize("changed, message", [
    ({"teacher_forced_top1_agreement": 0.5}, "teacher_forced_top1_agreement = 0.500 is below"),
    ({"teacher_forced_max_abs_diff": 1.0}, "teacher_forced_max_abs_diff = 1 exceeds"),
    ({"decode_max_abs_diff": float("nan")}, "decode_max_abs_diff = nan exceeds"),
])
def test_fp16_verification_failures(monkeypatch, test_fp16_model_dir, changed, message):
    card = ModelCard.load(test_fp16_model_dir)
    figures = {**card.verification, **changed}
    monkeypatch.setattr(verify, "measure", lambda *args, **kwargs: figures)
    with pytest.raises(ExportError, match=message):
        verify.verify(None, test_fp16_model_dir, card, bound=figures["bound"])
