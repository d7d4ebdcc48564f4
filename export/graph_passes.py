"""Graph rewrites that make the exported serving graph cheaper to run, without changing what it computes.

At batch 1 a decode step of a small model is hundreds of tiny operator calls, and each call costs
onnxruntime a dispatch (a few microseconds, more when it wakes the thread pool) whatever its size.
Two patterns of the exported graph pay that cost for nothing:

    Reshape chains    q_proj ─► Reshape (B, T, H, hd) ─► Reshape (B, T, H·hd) ─► GroupQueryAttention
                      The model views heads apart, the attention op wants them packed again: eight
                      Reshapes a layer that return the shape they started from. fold_reshapes rewires
                      a Reshape of a Reshape to the first one's input, and drops a Reshape whose output
                      has its input's (symbolic) shape.

    Shared inputs     x ─► MatMulNBits(Wq), MatMulNBits(Wk), MatMulNBits(Wv)
                      becomes x ─► MatMulNBits([Wq; Wk; Wv]) ─► Split ─► q, k, v: one call reads the same
                      bytes as three (fuse_shared_input_matmuls; also gate and up of the MLP).

Both work on the in-memory ModelProto (weights loaded) and leave every graph output as it was.
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
# A fused MatMulNBits' doc_string: this prefix, then the JSON list of the nodes it replaced, in the order
# of its rows (and of its Split's outputs), so tools can tell the weights apart again (fused_members).
FUSED_DOC = "fused from: "


def _shape(value_info: dict, name: str):
    """The shape as a tuple of ints and symbol names, or None when any dim is unknown."""
    v = value_info.get(name)
    if v is None or not v.type.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in v.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            return None
    return tuple(dims)


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    def resolve(name):
        while name in renames:
            name = renames[name]
        return name

    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = resolve(name)


def fold_reshapes(model: onnx.ModelProto) -> int:
    """Collapse Reshape chains and drop identity Reshapes; returns how many Reshapes were removed."""
    graph = model.graph
    value_info = {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    constants = {i.name: i for i in graph.initializer}
    before = sum(node.op_type == "Reshape" for node in graph.node)
    # Reshape(Reshape(x, a), b) == Reshape(x, b): read x directly (the inner one may die below).
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        inner = producer.get(node.input[0])
        while inner is not None and inner.op_type == "Reshape" and not _copies_input_dims(node, constants):
            node.input[0] = inner.input[0]
            inner = producer.get(node.input[0])
    # A Reshape to the shape its input already has is the identity.
    renames = {}
    for node in graph.node:
        if node.op_type != "Reshape" or node.output[0] in outputs:
            continue
        shape_in, shape_out = _shape(value_info, node.input[0]), _shape(value_info, node.output[0])
        if shape_in is not None and shape_in == shape_out:
            renames[node.output[0]] = node.input[0]
    _rename_inputs(graph, renames)
    remove_dead_nodes(model)
    return before - sum(node.op_type == "Reshape" for node in graph.node)


def _copies_input_dims(node: onnx.NodeProto, constants: dict) -> bool:
    """True when a Reshape's constant shape holds a 0, which (allowzero unset) copies that dim from its
    input: then reading an earlier input could change the result. Shapes computed in the graph are
    Concats of the tensors' own dims, 0 only for empty tensors, which the serving graph never sees."""
    shape = constants.get(node.input[1])
    allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
    return shape is not None and not allowzero and bool((numpy_helper.to_array(shape) == 0).any())


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads, then unread initializers and value_info."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    for field in (graph.initializer, graph.value_info):
        live = [item for item in field if item.name in needed]
        del field[:]
        field.extend(live)


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fuse_shared_input_matmuls(model: onnx.ModelProto) -> int:
    """Merge MatMulNBits nodes that read the same input with the same K, bits, block size, accuracy level
    and zero-point layout into one node plus a Split; returns how many nodes were merged away."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    groups: dict[tuple, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN:
            continue
        attrs = _attributes(node)
        if set(attrs) - {"K", "N", "bits", "block_size", "accuracy_level"}:
            continue  # an attribute this pass does not know how to merge
        if not all(name in initializers for name in node.input[1:] if name):
            continue
        key = (node.input[0], attrs["K"], attrs["bits"], attrs["block_size"], attrs.get("accuracy_level", 0),
               len(node.input))
        groups[key].append(node)
    fused_away = 0
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for (x, K, bits, block_size, level, n_inputs), nodes in groups.items():
        if len(nodes) < 2:
            continue
        sizes = [_attributes(n)["N"] for n in nodes]
        name = nodes[0].name + ".fused"
        merged_inputs = [x]
        for position in range(1, n_inputs):
            arrays = [numpy_helper.to_array(initializers[n.input[position]]) for n in nodes]
            merged = numpy_helper.from_array(np.concatenate(arrays, axis=0), f"{name}.input{position}")
            graph.initializer.append(merged)
            merged_inputs.append(merged.name)
        product = f"{name}.output"
        fused = helper.make_node("MatMulNBits", merged_inputs, [product], name=name, domain=MS_DOMAIN,
                                 K=K, N=sum(sizes), bits=bits, block_size=block_size, accuracy_level=level,
                                 doc_string=FUSED_DOC + json.dumps([n.name for n in nodes]))
        split_sizes = numpy_helper.from_array(np.array(sizes, np.int64), f"{name}.split_sizes")
        graph.initializer.append(split_sizes)
        split = helper.make_node("Split", [product, split_sizes.name], [n.output[0] for n in nodes],
                                 name=f"{name}.split", axis=-1)
        # The fused node takes the place of the group's first member, so every input it reads is defined.
        replaced[id(nodes[0])] = [fused, split]
        for n in nodes[1:]:
            replaced[id(n)] = []
        fused_away += len(nodes) - 1
    if replaced:
        new_nodes = []
        for node in graph.node:
            new_nodes.extend(replaced.get(id(node), [node]))
        del graph.node[:]
        graph.node.extend(new_nodes)
        remove_dead_nodes(model)
    return fused_away


def fused_members(node: onnx.NodeProto) -> list[str]:
    """The names of the nodes a fused MatMulNBits replaced, in row order; [] for any other node."""
    if node.doc_string.startswith(FUSED_DOC):
        return json.loads(node.doc_string[len(FUSED_DOC):])
    return []
