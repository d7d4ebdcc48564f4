"""A GGUF file's own quantized blocks, as BlockWeights that MatMulNBits holds exactly.

llama.cpp's block formats (32 weights a block, along a row, i.e. along K):

    Q4_0  fp16 d, 16 bytes of nibbles     w = d * (q - 8)       -> 4 bits, zero point 8
    Q4_1  fp16 d, fp16 m, 16 bytes        w = d * q + m         -> 4 bits, zero point 0, block offsets m
    Q8_0  fp16 d, 32 int8                 w = d * q             -> 8 bits, zero point 128 (q + 128 as uint8)

A ggml block keeps element j in the low nibble of byte j and element j + 16 in its
high nibble; MatMulNBits packs elements 2i and 2i + 1 into byte i. Only the packing
changes (export/quantize.py packs): the codes and the fp16 scales are the file's own,
so BlockWeight.dequantize() equals gguf.quants.dequantize of the same tensor exactly.

Q and K projections get llama.cpp's row permutation undone (export/importers.py:
unpermute_rotary). It moves whole rows, and blocks lie along rows, so the blocks
move with them unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from export.errors import ExportError
from export.quantize import BLOCK, BlockWeight

# The formats held exactly, by name: bytes per block.
EXACT_FORMATS = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
FLOAT_FORMATS = ("F32", "F16", "BF16")


def block_weight(data: np.ndarray, format_name: str) -> BlockWeight:
    """A GGUF tensor's raw bytes (uint8 [N, K/32 * bytes per block]) -> its BlockWeight [N, K]."""
    if format_name not in EXACT_FORMATS:
        raise ValueError(f"{format_name} is not one of {', '.join(EXACT_FORMATS)}")
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, -1, EXACT_FORMATS[format_name])  # (N, nb, bytes)
    scales = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)  # (N, nb)
    if format_name == "Q8_0":
        codes = (blocks[:, :, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # (N, nb, 32)
        return BlockWeight(codes.reshape(rows, -1), scales, bits=8, zero_point=128)
    offsets = None
    if format_name == "Q4_1":
        offsets = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
        nibbles = blocks[:, :, 4:]
    else:
        nibbles = blocks[:, :, 2:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # (N, nb, 32): elements 0..15, then 16..31
    return BlockWeight(codes.reshape(rows, -1), scales, bits=4, zero_point=0 if offsets is not None else 8,
                       offsets=offsets)


def rotary_row_order(rows: int, n_heads: int) -> np.ndarray:
    """Indices that undo llama.cpp's Q/K row interleaving: out[r] = in[order[r]] (as unpermute_rotary)."""
    head_dim = rows // n_heads
    return np.arange(rows).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def gguf_block_weights(gguf_path: Path, config) -> dict[str, tuple[str, Optional[BlockWeight]]]:
    """Our parameter name -> (the GGUF tensor's format, its BlockWeight or None when not held exactly).

    A tied LM head gets the embedding's blocks under "lm_head.weight": llama.cpp multiplies by them.
    """
    from export.importers import GGUF_PER_LAYER, GGUF_TOP_LEVEL, open_gguf, rename_tensor

    reader = open_gguf(Path(gguf_path))
    out: dict[str, tuple[str, Optional[BlockWeight]]] = {}
    for tensor in reader.tensors:
        name = rename_tensor(tensor.name, GGUF_TOP_LEVEL, GGUF_PER_LAYER, "blk.")
        if name is None or len(tensor.data.shape) != 2:
            continue
        format_name = tensor.tensor_type.name
        weight = block_weight(np.asarray(tensor.data), format_name) if format_name in EXACT_FORMATS else None
        if weight is not None and weight.q.shape[1] % BLOCK:
            raise ExportError(f"{Path(gguf_path).name}: {tensor.name} has rows of {weight.q.shape[1]} weights, "
                              f"not a multiple of {BLOCK}")
        if weight is not None and name.endswith("attn.q_proj.weight"):
            weight = weight.take_rows(rotary_row_order(weight.q.shape[0], config.n_heads))
        elif weight is not None and name.endswith("attn.k_proj.weight"):
            weight = weight.take_rows(rotary_row_order(weight.q.shape[0], config.n_kv_heads))
        out[name] = (format_name, weight)
    if config.tie_embeddings and "tok_emb.weight" in out:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out
