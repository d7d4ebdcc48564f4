"""Block-quantized model dirs: RTN and GGUF blocks, the graph rewrite, the verification, and bad input.

The weights are read back from the written ONNX graph with a decoder of the tests' own (unpack_matmul_nbits),
so a packing mistake in export/quantize.py cannot hide behind its own inverse.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
import torch
from gguf.quants import dequantize, quantize
from onnx import numpy_helper

from export import graph_passes
from export import quantize as q
from export.gguf_blocks import block_weight, gguf_block_weights, rotary_row_order
from export.importers import (GGUF_PER_LAYER, GGUF_TOP_LEVEL, find_smollm2_gguf, open_gguf, rename_tensor,
                              unpermute_rotary)
from export.model_dir import build_model_dir
from server import contract
from server.contract import ModelCard
from server.runner import ModelRunner, RunnerError
from tests.export.test_export import assert_one_line_error, run_export
from tests.export.test_importers import add_tiny_metadata, llama_cpp_tensors, tiny_llama, train_tiny_tokenizer

SEED = 20261201
GGML = gguf.GGMLQuantizationType


# --------------------------------------------------------------------------- reading the graph back

def graph_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """Parameter name -> float32 [N, K] weights as the dir's MatMulNBits / GatherBlockQuantized nodes hold them."""
    model = onnx.load(str(model_dir / contract.MODEL_FILE))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    # Q4_1 block minimums of fused projections sit in one fused correction MatMul: `<name>.offset_product`.
    for member, columns in graph_passes.fused_matmul_columns(model).items():
        if member.endswith(".offset_product"):
            inits[member.removesuffix(".offset_product") + ".offsets"] = columns
    out = {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        name = node.name.removeprefix("quantized/")
        if node.op_type == "MatMulNBits" and graph_passes.fused_members(node):
            # One node for several projections (q, k, v; gate, up): its rows are theirs, in order.
            values, start = unpack_matmul_nbits(node, attrs, inits), 0
            for member, size in graph_passes.fused_members(node):
                member = member.removeprefix("quantized/")
                rows = values[start:start + size]
                offsets = inits.get(f"quantized/{member}.offsets")
                out[member] = rows if offsets is None else rows + np.repeat(offsets.T, 32, axis=1)
                start += size
        elif node.op_type == "MatMulNBits":
            out[name] = unpack_matmul_nbits(node, attrs, inits)
        elif node.op_type == "GatherBlockQuantized":
            codes, scales = inits[node.input[0]].astype(np.float32), inits[node.input[2]]
            rows, cols = codes.shape
            out[name] = (scales[:, :, None] * (codes.reshape(rows, -1, 32) - np.float32(128))).reshape(rows, cols)
    return out


def unpack_matmul_nbits(node, attrs, inits) -> np.ndarray:
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    packed, scales = inits[node.input[1]], inits[node.input[2]].reshape(n, k // block)
    if bits == 4:  # element 2i in the low nibble of byte i
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k // block, block)
    else:
        codes = packed.reshape(n, k // block, block)
    zero = np.full((n, k // block), 2 ** (bits - 1), np.float32)
    if len(node.input) > 3 and node.input[3]:
        zp = inits[node.input[3]].reshape(n, -1)
        zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1) if bits == 4 else zp
        zero = zp[:, : k // block].astype(np.float32)
    values = scales[:, :, None] * (codes.astype(np.float32) - zero[:, :, None])
    offsets = inits.get(f"quantized/{node.name.removeprefix('quantized/')}.offsets")
    if offsets is not None:  # (K/32, N): the block minimums the offset product adds
        values = values + offsets.T[:, :, None]
    return values.reshape(n, k)


def gguf_reference(gguf_path: Path, n_heads: int, n_kv_heads: int) -> dict[str, tuple[str, np.ndarray]]:
    """gguf's own dequantization of every 2-D tensor, Q/K rows un-permuted: our name -> (format, float32 [N, K])."""
    out = {}
    for tensor in open_gguf(gguf_path).tensors:
        name = rename_tensor(tensor.name, GGUF_TOP_LEVEL, GGUF_PER_LAYER, "blk.")
        if len(tensor.data.shape) != 2:
            continue
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32)
        if name.endswith("q_proj.weight"):
            values = unpermute_rotary(torch.from_numpy(values), n_heads).numpy()
        elif name.endswith("k_proj.weight"):
            values = unpermute_rotary(torch.from_numpy(values), n_kv_heads).numpy()
        out[name] = (tensor.tensor_type.name, values)
    return out


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 bit patterns (so -0.0 != 0.0): exactly the same weights."""
    return a.shape == b.shape and np.array_equal(np.asarray(a, np.float32).view(np.uint32),
                                                  np.asarray(b, np.float32).view(np.uint32))


# --------------------------------------------------------------------------- pure pieces

def test_rtn_is_within_half_a_step_and_maps_each_peak_to_code_0():
    rng = np.random.default_rng(SEED)
    weight = rng.standard_normal((48, 96)).astype(np.float32)
    for bits in (4, 8):
        blocks = q.rtn(weight, bits)
        error = np.abs(blocks.dequantize() - weight).reshape(48, 3, 32)
        step = np.abs(blocks.scales)[:, :, None]
        # Half a step, but for values beyond the top code on the side opposite the peak (clipped: up to one step).
        top = blocks.q.reshape(48, 3, 32) == 2 ** bits - 1
        assert (error <= np.where(top, step, step / 2) * (1 + 1e-6)).all()
        # Each block's peak lands on code 0: no code is wasted on a level the block cannot reach.
        assert (blocks.q.reshape(48, 3, 32).min(-1) == 0).all() and blocks.q.max() <= 2 ** bits - 1
        assert blocks.symmetric
        # The block's largest |w| is held exactly (it defines the scale).
        peak = np.abs(weight.reshape(48, 3, 32)).max(-1)
        assert np.allclose(np.abs(blocks.dequantize().reshape(48, 3, 32)).max(-1), peak, rtol=1e-6)


def test_4_bit_packing_puts_even_elements_in_low_nibbles():
    codes = np.arange(32, dtype=np.uint8).reshape(1, 1, 32) % 16
    packed = q.pack_codes(codes, 4)
    assert packed.shape == (1, 1, 16) and packed[0, 0, 0] == 0x10 and packed[0, 0, 7] == (15 << 4) | 14


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_dequantize_exactly_as_gguf(fmt):
    rng = np.random.default_rng(SEED)
    weight = (rng.standard_normal((24, 128)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    weight[3, :32] = 0.0  # an all-zero block: scale 0
    raw = quantize(weight, GGML[fmt])
    blocks = block_weight(raw, fmt)
    assert bits_equal(blocks.dequantize(), dequantize(raw, GGML[fmt]))
    assert blocks.bits == (8 if fmt == "Q8_0" else 4) and (blocks.offsets is not None) == (fmt == "Q4_1")


def test_rotary_row_order_is_unpermute_rotary():
    weight = torch.arange(48 * 4, dtype=torch.float32).reshape(48, 4)
    order = rotary_row_order(48, 3)
    assert torch.equal(unpermute_rotary(weight, 3), weight[order])


# --------------------------------------------------------------------------- checkpoints trained here: RTN

@pytest.fixture(scope="module", params=[0, 4], ids=["accuracy-level-0", "accuracy-level-4"])
def int4_llama_dir(request, tmp_path_factory, test_llama_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("int4") / f"test-llama-int4-{request.param}"
    build_model_dir(test_llama_checkpoint, out, log=lambda *_: None, weights="int4", accuracy_level=request.param)
    return out


def test_int4_dir_holds_every_projection_as_matmul_nbits(int4_llama_dir):
    card = ModelCard.load(int4_llama_dir)
    graph = onnx.load(str(int4_llama_dir / contract.MODEL_FILE), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    # 7 projections a layer and the head were rewritten; q, k, v (one input) and gate, up (another) are
    # then fused, so a layer runs 4 MatMulNBits: attention reads q, k, v packed, gate and up are split.
    # No float MatMul is left with a weight operand, the heads' Reshapes back and forth are folded
    # away, and each residual Add is one kernel with the RMSNorm after it.
    assert card.weights["graph_nodes"]["MatMulNBits"] == 7 * card.n_layers + 1
    assert card.weights["graph_nodes"]["MatMulNBits_fused_away"] == 3 * card.n_layers
    assert card.weights["graph_nodes"]["qkv_packed"] == card.n_layers
    assert ops.count("MatMulNBits") == 4 * card.n_layers + 1 and ops.count("GatherBlockQuantized") == 1
    assert ops.count("Split") == card.n_layers and ops.count("Reshape") == 0
    # Every norm but the first (of the embeddings) and the final one (of the gathered last tokens).
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * card.n_layers - 1
    inits = {i.name for i in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    weights = card.weights
    assert (weights["scheme"], weights["block_size"], weights["source"]) == ("int4", 32, "rtn-from-fp32")
    assert weights["kinds"]["lm_head"]["bits"] == {"4": 1} and weights["kinds"]["embedding"]["bits"] == {"8": 1}
    assert all(k["symmetric"] for k in weights["kinds"].values())
    measured = weights["accuracy_level_measured"]
    assert measured["level_0_max_rel_error"] < 1e-5 and 0 < measured["level_4_max_rel_error"] < 0.05
    assert weights["dir_bytes"] == sum(p.stat().st_size for p in int4_llama_dir.rglob("*")
                                       if p.is_file() and p.name != contract.CARD_FILE)
    # Both serving graphs read the one data file.
    for graph_file in (contract.MODEL_FILE, contract.MODEL_FILE_WITHOUT_QUERY_SEQLENS):
        g = onnx.load(str(int4_llama_dir / graph_file), load_external_data=False).graph
        locations = {e.value for i in g.initializer for e in i.external_data if e.key == "location"}
        assert locations == {contract.MODEL_FILE + ".data"}, graph_file
    assert [p.name for p in int4_llama_dir.glob("*.data")] == [contract.MODEL_FILE + ".data"]


def test_int4_verification_figures_are_within_their_bounds(int4_llama_dir):
    card = ModelCard.load(int4_llama_dir)
    figures = card.verification
    print("int4 verification:", json.dumps(figures))
    for name in ("prompt_max_abs_diff", "decode_max_abs_diff", "ragged_max_abs_diff"):
        assert 0 <= figures[name] <= figures["bound"], name
    if card.weights["accuracy_level"] == 0:
        # fp32 arithmetic on the same dequantized weights: fp32's bound and PyTorch's greedy tokens.
        assert figures["bound"] == 1e-3 and figures["greedy_cache_equals_recompute"] is True
    else:
        assert figures["teacher_forced_top1_agreement"] >= 0.9 and figures["bound"] > 1e-3


def test_verification_compares_with_the_graphs_own_weights(int4_llama_dir, test_llama_checkpoint):
    """The PyTorch reference holds the graph's weights: RTN of the checkpoint's, read back from the ONNX file."""
    from model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(test_llama_checkpoint)
    state = model.state_dict()
    held = graph_weights(int4_llama_dir)
    assert set(held) >= {"tok_emb.weight", "lm_head.weight", "blocks.0.attn.q_proj.weight"}
    for name, values in held.items():
        source = state["tok_emb.weight" if name == "lm_head.weight" else name].numpy()
        bits = 8 if name == "tok_emb.weight" else 4
        assert bits_equal(values, q.rtn(source, bits).dequantize()), name


# --------------------------------------------------------------------------- GGUF blocks

def write_quantized_gguf(path: Path, model, tokenizer, formats: dict[str, str]) -> None:
    """The tiny Llama as llama.cpp writes it, each tensor in formats[its GGUF name prefix] (default F32)."""
    writer = gguf.GGUFWriter(path, "llama")
    add_tiny_metadata(writer, model, tokenizer)
    for kind, gguf_name, values in llama_cpp_tensors(model):
        fmt = formats.get(kind, "F32") if values.ndim == 2 else "F32"
        values = np.ascontiguousarray(values, np.float32)
        if fmt == "F32":
            writer.add_tensor(gguf_name, values)
        elif fmt == "Q8_1":  # a block type the gguf package cannot decode
            block, size = gguf.GGML_QUANT_SIZES[GGML.Q8_1]
            raw = np.zeros((values.shape[0], values.shape[1] // block * size), np.uint8)
            writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=GGML.Q8_1)
        else:
            raw = quantize(values, GGML[fmt])
            writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=GGML[fmt])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# As SmolLM2's file: Q4_1 projections, a Q8_0 embedding; plus Q4_0 and a float tensor, to cover every path.
# Rows beyond the 300-token vocabulary: the GGUF tokenizer's conversion adds a token of its own.
TINY_VOCAB = 320
TINY_FORMATS = {"token_embd": "Q8_0", "attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_0", "attn_output": "Q4_1",
                "ffn_gate": "Q4_1", "ffn_up": "Q8_0", "ffn_down": "F32"}


@pytest.fixture(scope="module")
def tiny_quantized_gguf(tmp_path_factory) -> Path:
    tokenizer = train_tiny_tokenizer()
    model = tiny_llama(TINY_VOCAB, tie=True)  # tied, as SmolLM2: the head gets its own blocks
    path = tmp_path_factory.mktemp("gguf-q") / "tiny-llama-q.gguf"
    write_quantized_gguf(path, model, tokenizer, TINY_FORMATS)
    return path


@pytest.fixture(scope="module")
def tiny_gguf_int4_dir(tmp_path_factory, tiny_quantized_gguf) -> Path:
    """At accuracy_level 0: fp32 arithmetic, so the verification holds it to fp32's bound and greedy equality.
    (This random model's weights are far larger than a trained one's, and int8 activations, level 4, lose
    more on it than on any trained model measured: docs/quantization.md.)"""
    out = tmp_path_factory.mktemp("gguf-int4") / "tiny-int4"
    result = run_export("--from-gguf", str(tiny_quantized_gguf), "--weights", "int4", "--accuracy-level", "0",
                        "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_gguf_int4_dir_holds_the_files_own_blocks_exactly(tiny_gguf_int4_dir, tiny_quantized_gguf):
    card = ModelCard.load(tiny_gguf_int4_dir)
    reference = gguf_reference(tiny_quantized_gguf, card.n_heads, card.n_kv_heads)
    held = graph_weights(tiny_gguf_int4_dir)
    for name, (fmt, values) in reference.items():
        if fmt in ("Q4_0", "Q4_1", "Q8_0"):
            assert bits_equal(held[name], values), f"{name} ({fmt})"
    # The tied head multiplies by the embedding's own Q8_0 blocks.
    assert bits_equal(held["lm_head.weight"], reference["tok_emb.weight"][1])
    kinds = card.weights["kinds"]
    assert kinds["attention"]["sources"] == {"gguf-Q4_1": 6, "gguf-Q4_0": 2}
    assert kinds["mlp"]["sources"] == {"gguf-Q4_1": 2, "gguf-Q8_0": 2, "rtn-from-gguf-F32": 2}
    assert kinds["lm_head"]["sources"] == {"gguf-Q8_0": 1} and kinds["attention"]["block_offsets"] is True
    # The block offsets' product (Q4_1 without float zero points) is exact arithmetic, not an approximation.
    figures = card.verification
    print("GGUF int4, accuracy_level 0:", json.dumps(figures))
    assert figures["bound"] == 1e-3 and figures["greedy_cache_equals_recompute"] is True
    assert max(figures[f"{k}_max_abs_diff"] for k in ("prompt", "decode", "ragged")) <= 1e-3


@pytest.mark.slow
def test_smollm2_blocks_are_the_ggufs_own():
    """SmolLM2's Q4_1 projections and Q8_0 embedding, packed for MatMulNBits and read back, equal gguf's
    dequantization bit for bit (exporting the whole model would take minutes; the tiny GGUF test covers the graph)."""
    from model.config import PRESETS

    config = PRESETS["smollm2-135m-instruct"]
    path = find_smollm2_gguf()
    blocks = gguf_block_weights(path, config)
    reference = gguf_reference(path, config.n_heads, config.n_kv_heads)
    checked = 0
    for name, (fmt, values) in reference.items():
        weight = blocks[name][1]
        packed, scales, zero_points = q.matmul_nbits_inputs(weight)
        node = onnx.helper.make_node("MatMulNBits", ["x", "b", "s"] + (["z"] if zero_points is not None else []),
                                     ["y"], name=f"quantized/{name}")
        inits = {"b": packed, "s": scales, "z": zero_points}
        if weight.offsets is not None:
            inits[f"quantized/{name}.offsets"] = weight.offsets.T
        attrs = {"N": weight.q.shape[0], "K": weight.q.shape[1], "bits": weight.bits, "block_size": q.BLOCK}
        assert bits_equal(unpack_matmul_nbits(node, attrs, inits), values), f"{name} ({fmt})"
        checked += 1
    assert checked == 30 * 7 + 1
    assert blocks["lm_head.weight"][1] is blocks["tok_emb.weight"][1]


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags, words", [
    (("--weights", "int3"), ("--weights", "int3", "int4")),
    (("--weights", "int4", "--accuracy-level", "2"), ("--accuracy-level", "0, 4")),
    (("--weights", "int4", "--dtype", "fp16"), ("--weights int4", "--dtype fp32")),
    (("--weights", "int4", "--gguf-q4-1", "float"), ("--gguf-q4-1", "float")),
], ids=["unknown-weights", "unknown-accuracy-level", "int4-with-fp16", "unknown-q4-1"])
def test_bad_quantization_flags_are_one_error_line_and_write_nothing(tmp_path, test_llama_checkpoint, flags, words):
    out = tmp_path / "never"
    result = run_export("--checkpoint", str(test_llama_checkpoint), *flags, "--out", str(out))
    assert_one_line_error(result, *words)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_gguf_block_type_that_cannot_be_imported_is_one_error_line(tmp_path):
    tokenizer = train_tiny_tokenizer()
    model = tiny_llama(TINY_VOCAB, tie=True)
    path = tmp_path / "q8_1.gguf"
    write_quantized_gguf(path, model, tokenizer, {**TINY_FORMATS, "ffn_down": "Q8_1"})
    out = tmp_path / "out" / "never"
    result = run_export("--from-gguf", str(path), "--weights", "int4", "--out", str(out))
    assert_one_line_error(result, "Q8_1", "ffn_down")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_quantized_dir_on_an_onnxruntime_without_matmul_nbits_is_refused(monkeypatch, int4_llama_dir, tmp_path):
    """Simulates a runtime without the contrib ops (no such onnxruntime installs here) at the one place that asks."""
    import export.model_dir
    import server.runner

    monkeypatch.setattr(server.runner, "missing_quantized_ops", lambda: ["MatMulNBits"])
    card = ModelCard.load(int4_llama_dir)
    with pytest.raises(RunnerError, match="MatMulNBits"):
        ModelRunner(int4_llama_dir, card, kv_slots=1, capacity=16)
    monkeypatch.setattr(export.model_dir, "missing_quantized_ops", lambda: ["MatMulNBits"])
    from export.errors import ExportError

    with pytest.raises(ExportError, match="MatMulNBits"):
        build_model_dir(int4_llama_dir, tmp_path / "never", weights="int4")
    assert not (tmp_path / "never").exists()
