"""The inspection graph: the serving graph that also returns each layer's attention probabilities.

It is the graph without `query_seqlens` (export/legacy_gqa.py), so one file runs on
onnxruntime 1.31 and 1.32 alike, with one change per GroupQueryAttention node:

    GroupQueryAttention(..., qk_output=2) ──► output, present_key, present_value,
                                              output_qk ──(Cast to float32 in fp16 graphs)──► attention.{i}
                                                         float32 [B, H, S, total_sequence_length]

qk_output=2 asks the CPU kernel for the probabilities after softmax (1 would be the
scaled scores before it); the server runs the whole sequence as one prefill of an
empty cache, so total_sequence_length = S = T and each output is T x T per head.
The weights stay in model.onnx.data, shared with the serving graphs.

`reference_attention` is the independent check: PyTorch's explicit
softmax(QKᵀ/√d + causal mask) with the model's own projections and rotary
embedding, query head h reading KV head h // (H / Hkv).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from export.legacy_gqa import legacy_graph
from model.transformer import Transformer, apply_rotary
from server import contract
from server.contract import ModelCard

QK_AFTER_SOFTMAX = 2
_ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def inspection_graph(model_path: Path, n_heads: int, dtype: str = "float32") -> onnx.ModelProto:
    """model.onnx's legacy variant with every GroupQueryAttention's probabilities as graph outputs; weights not loaded."""
    model = legacy_graph(model_path)
    graph = model.graph
    extra_nodes = []
    layer = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        node.attribute.append(helper.make_attribute("qk_output", QK_AFTER_SOFTMAX))
        name = contract.attention_output(layer)
        probs = name if dtype == "float32" else f"inspection/{name}.{dtype}"
        while len(node.output) < 3:
            node.output.append("")
        node.output.append(probs)
        if probs != name:
            extra_nodes.append(helper.make_node("Cast", [probs], [name], name=f"inspection/cast.{layer}",
                                                to=TensorProto.FLOAT))
        graph.output.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, ["batch", n_heads, "chunk", "total_sequence_length"]))
        layer += 1
    if not layer:
        raise ValueError(f"{model_path} has no GroupQueryAttention node")
    graph.node.extend(extra_nodes)
    return model


def write_inspection_graph(model_dir: Path, card: ModelCard) -> Path:
    """Write model_inspection.onnx beside model.onnx (which must exist); returns its path."""
    model_dir = Path(model_dir)
    path = model_dir / contract.INSPECTION_MODEL_FILE
    onnx.save(inspection_graph(model_dir / contract.MODEL_FILE, card.n_heads, card.dtype), str(path))
    return path


def add_to_model_dir(model_dir: Path) -> Path:
    """Give an existing model dir its inspection graph and list it in the model card; returns the graph's path."""
    model_dir = Path(model_dir)
    card = ModelCard.load(model_dir)
    path = write_inspection_graph(model_dir, card)
    data = json.loads((model_dir / contract.CARD_FILE).read_text())
    data.setdefault("graphs", {})[contract.INSPECTION_GRAPH] = contract.INSPECTION_MODEL_FILE
    (model_dir / contract.CARD_FILE).write_text(json.dumps(data, indent=2) + "\n")
    return path


@torch.no_grad()
def reference_attention(model: Transformer, input_ids: list[int]) -> np.ndarray:
    """float32 [layers, H, T, T]: softmax(QKᵀ/√d + causal mask) of every layer and head, computed in PyTorch."""
    config = model.config
    ids = torch.tensor([input_ids])  # (1, T)
    positions = torch.arange(ids.size(1))[None]  # (1, T)
    T, n_rep = ids.size(1), config.n_heads // config.n_kv_heads
    mask = torch.full((T, T), float("-inf")).triu(1)  # 0 on and below the diagonal
    kv_head = torch.arange(config.n_heads) // n_rep  # query head h reads KV head h // (H / Hkv)
    probabilities = []

    def attend(layer, q, k, v, rope):  # q (1, T, H, hd), k and v (1, T, Hkv, hd)
        if rope is not None:
            q = apply_rotary(q, rope.cos, rope.sin, positions)
            k = apply_rotary(k, rope.cos, rope.sin, positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2)[:, kv_head], v.transpose(1, 2)[:, kv_head]  # (1, H, T, hd)
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + mask, dim=-1)  # (1, H, T, T)
        probabilities.append(p[0])
        return (p @ v).transpose(1, 2)  # (1, T, H, hd)

    model.eval().hidden_states(ids, positions, attend=attend)
    return torch.stack(probabilities).float().numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.inspection",
        description=f"Add the inspection graph ({contract.INSPECTION_MODEL_FILE}) to a model dir exported "
                    "before it was part of every export; the weights are shared, not copied.")
    parser.add_argument("model_dir", type=Path)
    args = parser.parse_args(argv)
    path = add_to_model_dir(args.model_dir)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) and listed it in {args.model_dir / contract.CARD_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
