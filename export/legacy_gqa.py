"""The serving graph for onnxruntime builds whose GroupQueryAttention lacks `query_seqlens` (before 1.32).

onnxruntime 1.31 (the newest onnxruntime-gpu on PyPI when this was written)
defines GroupQueryAttention with 16 inputs; the serving graph passes a 17th,
`query_seqlens`, so 1.31 refuses to load it. Without that input the op
assumes every row of a call brings S new tokens (S = the padded chunk
length) ending at seqlens_k, and reads total_sequence_length as the longest
row's total rather than as the cache capacity. This module derives a graph
with the same inputs and outputs that computes what the legacy op expects:

    input_ids [B, S] ── width S ──┐
    seqlens_k, query_seqlens ─────┴─ seqlens_k + S - query_seqlens = legacy_seqlens_k ─┬──► every GQA node's seqlens_k
                                                                                       └─ ReduceMax + 1 ──► total_sequence_length

Each row keeps its past length P = seqlens_k + 1 - query_seqlens, and its
padding tokens would become real ones to the op: their keys and values would
land at [P + Q, P + S), past the row's end. The server therefore gives this
graph only uniform calls (server/scheduler.py uniform_calls), in which every
row brings exactly S tokens (Q = S) and no row is idle, so the op writes
exactly the positions the scheduler asked for and computes what the mixed
graph computes. Every model dir holds this graph beside model.onnx
(contract.MODEL_FILE_WITHOUT_QUERY_SEQLENS), sharing its model.onnx.data.
write_legacy_model_dir makes a dir whose model.onnx *is* this graph, for
tools that load model.onnx by name; it holds a copy of model.onnx.data:
onnxruntime refuses external data that a symbolic link places outside the
model's folder, and onnx refuses a data file with two hard links.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server import contract

_PREFIX = "legacy_gqa/"
_SEQLENS_K = contract.GQA_INPUTS.index("seqlens_k")
_TOTAL = contract.GQA_INPUTS.index("total_sequence_length")
_COPIED = (contract.TOKENIZER_FILE, contract.CARD_FILE, contract.MODEL_FILE_WITHOUT_QUERY_SEQLENS,
           contract.INSPECTION_MODEL_FILE)


def legacy_graph(model_path: Path) -> onnx.ModelProto:
    """model.onnx with GroupQueryAttention's query_seqlens folded into seqlens_k; weights not loaded."""
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    legacy_seqlens_k, total = _PREFIX + "seqlens_k", _PREFIX + "total_sequence_length"
    i32 = TensorProto.INT32
    graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), _PREFIX + "one_64"),
                              numpy_helper.from_array(np.array(1, np.int32), _PREFIX + "one")])

    def node(op, inputs, output, **attrs):
        return helper.make_node(op, inputs, [_PREFIX + output], name=_PREFIX + output, **attrs)

    nodes = [
        node("Shape", [contract.INPUT_IDS], "ids_shape"),
        node("Gather", [_PREFIX + "ids_shape", _PREFIX + "one_64"], "width_64", axis=0),
        node("Cast", [_PREFIX + "width_64"], "width", to=i32),
        node("Sub", [_PREFIX + "width", contract.QUERY_SEQLENS], "padding"),
        node("Add", [contract.SEQLENS_K, _PREFIX + "padding"], "seqlens_k"),
        node("ReduceMax", [legacy_seqlens_k], "longest_minus_1", keepdims=0),
        node("Add", [_PREFIX + "longest_minus_1", _PREFIX + "one"], "total_sequence_length"),
    ]
    gqa = 0
    for n in graph.node:
        if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft":
            inputs = list(n.input[:contract.QUERY_SEQLENS_INDEX])
            inputs[_SEQLENS_K], inputs[_TOTAL] = legacy_seqlens_k, total
            while inputs and not inputs[-1]:
                inputs.pop()
            n.ClearField("input")
            n.input.extend(inputs)
            gqa += 1
    if not gqa:
        raise ValueError(f"{model_path} has no GroupQueryAttention node")
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    return model


def write_legacy_model_dir(model_dir: Path, out_dir: Path) -> Path:
    """A model dir for onnxruntime < 1.32: the derived graph, the weights, tokenizer and card copied."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    onnx.save(legacy_graph(model_dir / contract.MODEL_FILE), str(out_dir / contract.MODEL_FILE))
    for path in model_dir.iterdir():
        if path.name.startswith(contract.MODEL_FILE + ".") or path.name in _COPIED:  # model.onnx.data and friends
            shutil.copy2(path, out_dir / path.name)
    return out_dir
