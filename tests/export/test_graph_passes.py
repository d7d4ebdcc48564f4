"""export/graph_passes.py on small hand-built graphs: each rewrite removes what it should, and onnxruntime
computes the same outputs before and after on seeded inputs."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export import graph_passes

SEED = 20261201
RNG_SHAPE = (2, 3, 8)  # (B, T, D)
# Rewrites change only the order of a few fp32 operations (the fused norm and Split read the same sums).
BOUND = 1e-5


def build(nodes, inputs, outputs, initializers, value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers, value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def tensor(name, dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def const(name, values):
    return numpy_helper.from_array(np.asarray(values), name)


def assert_same_outputs(before, after, feeds):
    for x, y in zip(run(before, feeds), run(after, feeds)):
        assert x.shape == y.shape and np.abs(x - y).max() <= BOUND


def test_reshape_chains_fold_and_identity_reshapes_drop():
    rng = np.random.default_rng(SEED)
    nodes = [helper.make_node("Reshape", ["x", "split_heads"], ["heads"]),  # (B, T, 2, 4)
             helper.make_node("Reshape", ["heads", "packed"], ["back"]),  # (B, T, 8) again
             helper.make_node("Relu", ["back"], ["y"]),
             helper.make_node("Reshape", ["x", "split_heads"], ["z"])]  # a real change of shape stays
    model = build(nodes, [tensor("x", ["batch", "chunk", 8])],
                  [tensor("y", ["batch", "chunk", 8]), tensor("z", ["batch", "chunk", 2, 4])],
                  [const("split_heads", np.array([2, 3, 2, 4], np.int64)),
                   const("packed", np.array([2, 3, 8], np.int64))],
                  [tensor("heads", ["batch", "chunk", 2, 4]), tensor("back", ["batch", "chunk", 8])])
    before = onnx.ModelProto.FromString(model.SerializeToString())
    assert graph_passes.fold_reshapes(model) == 2
    assert ops(model) == {"Relu": 1, "Reshape": 1}
    assert_same_outputs(before, model, {"x": rng.standard_normal(RNG_SHAPE).astype(np.float32)})


def rms_norm_nodes(x: str, weight: str, out: str) -> list:
    """weight * (x / sqrt(mean(x^2, -1) + eps)), as the exporter writes model/transformer.py's RMSNorm."""
    return [helper.make_node("Pow", [x, "two"], [f"{out}.sq"]),
            helper.make_node("ReduceMean", [f"{out}.sq", "last_axis"], [f"{out}.mean"], keepdims=1),
            helper.make_node("Add", [f"{out}.mean", "eps"], [f"{out}.var"]),
            helper.make_node("Sqrt", [f"{out}.var"], [f"{out}.rms"]),
            helper.make_node("Div", [x, f"{out}.rms"], [f"{out}.unit"]),
            helper.make_node("Mul", [weight, f"{out}.unit"], [out])]


def test_a_residual_add_and_its_rms_norm_become_one_skip_norm_that_also_returns_the_sum():
    rng = np.random.default_rng(SEED)
    nodes = [helper.make_node("Add", ["h", "attn"], ["residual"]),
             *rms_norm_nodes("residual", "weight", "normed"),
             helper.make_node("Add", ["residual", "normed"], ["y"]),  # the sum has a second reader
             *rms_norm_nodes("h", "weight", "first")]  # no Add before it: left for onnxruntime's own fusion
    model = build(nodes, [tensor("h", list(RNG_SHAPE)), tensor("attn", list(RNG_SHAPE))],
                  [tensor("y", list(RNG_SHAPE)), tensor("first", list(RNG_SHAPE))],
                  [const("two", np.float32(2.0)), const("last_axis", np.array([-1], np.int64)),
                   const("eps", np.float32(1e-5)), const("weight", rng.standard_normal(8).astype(np.float32))])
    before = onnx.ModelProto.FromString(model.SerializeToString())
    assert graph_passes.fuse_residual_norms(model) == 1
    counts = ops(model)
    assert counts["SkipSimplifiedLayerNormalization"] == 1 and counts["Div"] == 1 and counts["Add"] == 2
    feeds = {"h": rng.standard_normal(RNG_SHAPE).astype(np.float32),
             "attn": rng.standard_normal(RNG_SHAPE).astype(np.float32)}
    assert_same_outputs(before, model, feeds)


def test_projections_of_one_input_fuse_into_one_matmul_and_a_split():
    rng = np.random.default_rng(SEED)
    sizes = (8, 4, 4)  # q, k, v of a grouped-query layer
    weights = [rng.standard_normal((8, n)).astype(np.float32) for n in sizes]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"p{i}"], name=f"proj{i}") for i in range(3)]
    nodes.append(helper.make_node("MatMul", ["other", "w0"], ["p3"], name="proj3"))  # another input: alone
    model = build(nodes, [tensor("x", list(RNG_SHAPE)), tensor("other", list(RNG_SHAPE))],
                  [tensor(f"p{i}", [2, 3, n]) for i, n in enumerate(sizes + (8,))],
                  [const(f"w{i}", w) for i, w in enumerate(weights)])
    before = onnx.ModelProto.FromString(model.SerializeToString())
    assert graph_passes.fuse_shared_input_matmuls(model, op="MatMul") == 2
    assert ops(model) == {"MatMul": 2, "Split": 1}
    fused = next(n for n in model.graph.node if graph_passes.fused_members(n))
    assert graph_passes.fused_members(fused) == [("proj0", 8), ("proj1", 4), ("proj2", 4)]
    feeds = {name: rng.standard_normal(RNG_SHAPE).astype(np.float32) for name in ("x", "other")}
    assert_same_outputs(before, model, feeds)
