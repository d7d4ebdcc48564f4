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

    Packed q, k, v    ... ─► Split ─► q, k, v ─► GroupQueryAttention becomes ... ─► GroupQueryAttention
                      (its packed-QKV form: the query input holds all three, key and value left empty).

    Residual + norm   Add(x, y) ─► RMSNorm written out (Pow, ReduceMean, Add, Sqrt, Div, Mul), the sum also
                      read by the next residual Add: onnxruntime fuses the norm but not the Add, whose sum
                      has two readers. fuse_residual_norms writes one com.microsoft
                      SkipSimplifiedLayerNormalization, which returns the sum as its fourth output.

All of them work on the in-memory ModelProto (weights loaded) and leave every graph output as it was.
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
# A fused projection's doc_string: this prefix, then the JSON list of [name, output columns] of the nodes it
# replaced, in the order of its columns, so tools can tell the weights apart again (fused_members).
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


def _fusable(node: onnx.NodeProto, initializers: dict):
    """(group key, output columns) of a projection this pass can merge with others, or None.

    MatMulNBits: weights, scales and zero points are initializers with a row per output column, and the
    attributes match. MatMul: a constant 2-D weight [K, N] (float graphs)."""
    if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
        attrs = _attributes(node)
        if set(attrs) - {"K", "N", "bits", "block_size", "accuracy_level"}:
            return None  # an attribute this pass does not know how to merge
        if not all(name in initializers for name in node.input[1:] if name):
            return None
        key = ("MatMulNBits", node.input[0], attrs["K"], attrs["bits"], attrs["block_size"],
               attrs.get("accuracy_level", 0), len(node.input))
        return key, attrs["N"]
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in initializers:
        dims = list(initializers[node.input[1]].dims)
        if len(dims) == 2:
            return ("MatMul", node.input[0], dims[0], initializers[node.input[1]].data_type), dims[1]
    return None


def fuse_shared_input_matmuls(model: onnx.ModelProto, op: str = "MatMulNBits") -> int:
    """Merge projections of one op (MatMulNBits, or MatMul by a constant) that read the same input and agree
    in everything else into one node plus a Split; returns how many nodes were merged away.

    Projections that hold GGUF Q4_1 blocks exactly (export/quantize.py) add a correction to their product,
    Add(product, MatMul(block sums, block minimums)); for a group whose members all do, the corrections are
    merged too and added before the Split, so attention can still read q, k, v packed."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer, readers = _producers(graph), _readers(graph)
    groups: dict[tuple, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        fusable = _fusable(node, initializers) if node.op_type == op else None
        if fusable is not None:
            groups[fusable[0]].append((node, fusable[1]))
    fused_away = 0
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for key, members in groups.items():
        if len(members) < 2:
            continue
        nodes, sizes = [n for n, _ in members], [size for _, size in members]
        fused, product = _merge(graph, initializers, key, nodes, sizes)
        name = fused.name
        outputs = [n.output[0] for n in nodes]
        corrections = _offset_corrections(nodes, producer, readers, initializers) if key[0] == "MatMulNBits" else None
        replaced[id(nodes[0])] = [fused]
        for n in nodes[1:]:
            replaced[id(n)] = []
        last = nodes[0]
        if corrections is not None:
            adds, matmuls = corrections
            correction, correction_out = _merge(graph, initializers, ("MatMul", matmuls[0].input[0]), matmuls, sizes)
            summed = f"{name}.corrected"
            replaced[id(nodes[0])] = [fused, correction,
                                      helper.make_node("Add", [product, correction_out], [summed], name=f"{name}.add")]
            for n in adds + matmuls:
                replaced[id(n)] = []
            product, outputs = summed, [a.output[0] for a in adds]
            fused_away += 2 * (len(nodes) - 1)
        split_sizes = numpy_helper.from_array(np.array(sizes, np.int64), f"{name}.split_sizes")
        graph.initializer.append(split_sizes)
        replaced[id(last)].append(helper.make_node("Split", [product, split_sizes.name], outputs,
                                                   name=f"{name}.split", axis=-1))
        fused_away += len(nodes) - 1
    _replace_nodes(model, replaced)
    return fused_away


def _merge(graph, initializers: dict, key: tuple, nodes: list, sizes: list) -> tuple[onnx.NodeProto, str]:
    """One projection for nodes, their constant operands concatenated; (the node, its output's name)."""
    op, x = key[0], key[1]
    name = nodes[0].name + ".fused"
    # MatMulNBits holds a row per output column, MatMul's weight a column per output column.
    axis = 0 if op == "MatMulNBits" else 1
    merged_inputs = [x]
    for position in range(1, len(nodes[0].input)):
        arrays = [numpy_helper.to_array(initializers[n.input[position]]) for n in nodes]
        merged = numpy_helper.from_array(np.concatenate(arrays, axis=axis), f"{name}.input{position}")
        graph.initializer.append(merged)
        initializers[merged.name] = merged
        merged_inputs.append(merged.name)
    product = f"{name}.output"
    doc = FUSED_DOC + json.dumps([[n.name, size] for n, size in zip(nodes, sizes)])
    if op == "MatMulNBits":
        K, bits, block_size, level = key[2:6]
        fused = helper.make_node("MatMulNBits", merged_inputs, [product], name=name, domain=MS_DOMAIN, K=K,
                                 N=sum(sizes), bits=bits, block_size=block_size, accuracy_level=level, doc_string=doc)
    else:
        fused = helper.make_node("MatMul", merged_inputs, [product], name=name, doc_string=doc)
    return fused, product


def _offset_corrections(nodes, producer: dict, readers: dict, initializers: dict):
    """(the Adds, the correction MatMuls) when every node's product is read only by
    Add(product, MatMul(S, constant)) with one S for all of them; else None."""
    adds, matmuls = [], []
    for node in nodes:
        reading = readers.get(node.output[0], [])
        if len(reading) != 1 or reading[0].op_type != "Add":
            return None
        add = reading[0]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        matmul = producer.get(other)
        if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in initializers \
                or len(readers.get(other, [])) != 1:
            return None
        adds.append(add)
        matmuls.append(matmul)
    if len({m.input[0] for m in matmuls}) != 1:
        return None
    return adds, matmuls


def _replace_nodes(model: onnx.ModelProto, replaced: dict[int, list[onnx.NodeProto]]) -> None:
    """Each node whose id() is a key gives way to its list (empty: removed), in place; then the dead go."""
    if not replaced:
        return
    new_nodes = []
    for node in model.graph.node:
        new_nodes.extend(replaced.get(id(node), [node]))
    del model.graph.node[:]
    model.graph.node.extend(_topological(new_nodes, model.graph))
    remove_dead_nodes(model)


def _topological(nodes: list, graph: onnx.GraphProto) -> list:
    """nodes in an order where each comes after what it reads, otherwise as given (a replacement may
    produce what a node placed before it reads: a fused Split after a reader of its first output)."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in defined for name in node.input):
                ordered.append(node)
                defined.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError(f"the rewritten graph has a cycle or an undefined input at {waiting[0].name}")
        pending = waiting
    return ordered


def fused_members(node: onnx.NodeProto) -> list[tuple[str, int]]:
    """(name, output columns) of each node a fused projection replaced, in column order; [] for any other."""
    if node.doc_string.startswith(FUSED_DOC):
        return [(name, int(size)) for name, size in json.loads(node.doc_string[len(FUSED_DOC):])]
    return []


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                readers[name].append(node)
    return readers


def pack_qkv_into_attention(model: onnx.ModelProto) -> int:
    """GroupQueryAttention nodes fed q, k, v by one Split of a fused projection read the projection's
    output whole instead (packed QKV); returns how many Splits were removed."""
    graph = model.graph
    producer, readers = _producers(graph), _readers(graph)
    outputs = {o.name for o in graph.output}
    packed = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != MS_DOMAIN or len(node.input) < 3:
            continue
        split = producer.get(node.input[0])
        if (split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3])
                or any(len(readers[name]) != 1 or name in outputs for name in split.output)):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        packed += 1
    if packed:
        remove_dead_nodes(model)
    return packed


def _constant(initializers: dict, name: str):
    return numpy_helper.to_array(initializers[name]) if name in initializers else None


def _rms_norm_at(mul: onnx.NodeProto, producer: dict, initializers: dict):
    """(x, weight, eps) when mul is the end of weight * (x / sqrt(mean(x^2, -1) + eps)), else None."""
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    weight, quotient = (mul.input[0], mul.input[1]) if mul.input[0] in initializers else (mul.input[1], mul.input[0])
    div = producer.get(quotient)
    if weight not in initializers or div is None or div.op_type != "Div":
        return None
    x, sqrt = div.input[0], producer.get(div.input[1])
    add = producer.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
    if add is None or add.op_type != "Add" or add.input[1] not in initializers:
        return None
    mean = producer.get(add.input[0])
    if mean is None or mean.op_type != "ReduceMean" or len(mean.input) < 2:
        return None
    axes, keepdims = _constant(initializers, mean.input[1]), _attributes(mean).get("keepdims", 1)
    power = producer.get(mean.input[0])
    if axes is None or axes.tolist() != [-1] or not keepdims or power is None or power.op_type != "Pow":
        return None
    exponent = _constant(initializers, power.input[1])
    if power.input[0] != x or exponent is None or float(exponent) != 2.0:
        return None
    return x, weight, float(_constant(initializers, add.input[1]))


def fuse_residual_norms(model: onnx.ModelProto) -> int:
    """Add + RMSNorm written out -> SkipSimplifiedLayerNormalization (module docstring); returns how many."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = _producers(graph)
    outputs = {o.name for o in graph.output}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for mul in graph.node:
        found = _rms_norm_at(mul, producer, initializers)
        if found is None:
            continue
        x, weight, eps = found
        residual = producer.get(x)
        if (residual is None or residual.op_type != "Add" or id(residual) in replaced
                or any(name in initializers for name in residual.input) or mul.output[0] in outputs):
            continue
        fused = helper.make_node(
            "SkipSimplifiedLayerNormalization", [residual.input[0], residual.input[1], weight],
            [mul.output[0], "", "", x], name=mul.name + ".skip_norm", domain=MS_DOMAIN, epsilon=eps)
        # In the residual Add's place: its inputs are defined there, and every reader of the sum comes after.
        replaced[id(residual)], replaced[id(mul)] = [fused], []
    _replace_nodes(model, replaced)
    if replaced and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(replaced) // 2


def optimize_float_graph(model: onnx.ModelProto, fuse_projections: bool) -> dict:
    """The passes for the exporter's float graph; projections are fused only when the graph stays float
    (quantization finds each weight by its own MatMul). Returns what each pass changed."""
    done = {"Reshape_folded": fold_reshapes(model), "residual_norms_fused": fuse_residual_norms(model)}
    if fuse_projections:
        done["MatMul_fused_away"] = fuse_shared_input_matmuls(model, op="MatMul")
        done["qkv_packed"] = pack_qkv_into_attention(model)
    return done


def fused_matmul_columns(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each member of a fused float MatMul -> its columns of the fused constant weight (for tools that read
    weights back, such as a Q4_1 projection's block minimums: `<projection>.offset_product`)."""
    initializers = {i.name: i for i in model.graph.initializer}
    columns = {}
    for node in model.graph.node:
        members = fused_members(node) if node.op_type == "MatMul" else []
        if not members:
            continue
        weight, start = numpy_helper.to_array(initializers[node.input[1]]), 0
        for name, size in members:
            columns[name] = weight[:, start:start + size]
            start += size
    return columns
