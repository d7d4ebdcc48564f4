"""The graph derived for onnxruntime < 1.32 (no GroupQueryAttention query_seqlens) computes what the serving graph does.

onnxruntime 1.32 runs both graphs (query_seqlens is optional), so the
derived one is checked here against the original on the calls
bench/gpu_verify.py makes: right-padded prompts from an empty cache, then
batched decode steps. (Checked by hand with onnxruntime 1.31.1's CPU EP too:
docs/benchmarks.md, "CUDA".)
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime
import pytest

from server import contract
from server.contract import ModelCard
from export.legacy_gqa import legacy_graph, write_legacy_model_dir
from export.verify import Row, step
from server import runner as runner_module
from server.runner import ModelRunner, RunnerError, onnxruntime_has_query_seqlens


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="onnxruntime-gpu (1.31.1, the newest) has no query_seqlens; the CPU build pinned here has")
def test_the_installed_onnxruntime_has_query_seqlens():
    assert onnxruntime_has_query_seqlens()


@pytest.mark.parametrize("which", ["float32", "float16"])
def test_legacy_graph_equals_the_serving_graph_on_uniform_calls(which, test_model_dir, test_fp16_model_dir, tmp_path):
    model_dir = test_model_dir if which == "float32" else test_fp16_model_dir
    legacy_dir = write_legacy_model_dir(model_dir, tmp_path / "legacy")
    graph = onnx.load(str(legacy_dir / contract.MODEL_FILE), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and all(len(n.input) <= contract.QUERY_SEQLENS_INDEX for n in gqa)
    assert [i.name for i in graph.input] == [i.name for i in onnx.load(
        str(model_dir / contract.MODEL_FILE), load_external_data=False).graph.input]

    card = ModelCard.load(model_dir)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, card.vocab_size, n).tolist() for n in (11, 4, 1, 7)]
    results = []
    for directory in (model_dir, legacy_dir):
        runner = ModelRunner(directory, card, kv_slots=4, capacity=40)
        rows = [Row(list(p)) for p in prompts]
        logits = [step(runner, rows, [len(p) for p in prompts])]
        for _ in range(5):
            for row, row_logits in zip(rows, logits[-1]):
                row.tokens.append(int(row_logits.argmax()))
            logits.append(step(runner, rows, [1] * len(rows)))
        results.append(np.stack(logits))
    np.testing.assert_allclose(results[1], results[0], atol=1e-5 if which == "float32" else 2e-3, rtol=0)


def test_legacy_graph_needs_a_gqa_node(tmp_path):
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "model.onnx"))
    with pytest.raises(ValueError, match="no GroupQueryAttention"):
        legacy_graph(tmp_path / "model.onnx")


def test_every_model_dir_holds_both_graphs_on_one_copy_of_the_weights(test_model_dir):
    card = ModelCard.load(test_model_dir)
    assert card.graphs == {"with_query_seqlens": contract.MODEL_FILE,
                           "without_query_seqlens": contract.MODEL_FILE_WITHOUT_QUERY_SEQLENS,
                           contract.INSPECTION_GRAPH: contract.INSPECTION_MODEL_FILE}
    data_files = sorted(p.name for p in test_model_dir.iterdir() if p.name.endswith(".data"))
    assert data_files == [contract.MODEL_FILE + ".data"]
    graph = onnx.load(str(test_model_dir / contract.MODEL_FILE_WITHOUT_QUERY_SEQLENS), load_external_data=False).graph
    locations = {entry.value for init in graph.initializer for entry in init.external_data if entry.key == "location"}
    assert locations == {contract.MODEL_FILE + ".data"}
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == card.n_layers and all(len(n.input) <= contract.QUERY_SEQLENS_INDEX for n in gqa)


def test_without_query_seqlens_the_runner_serves_the_second_graph_with_uniform_calls(test_model_dir, monkeypatch):
    monkeypatch.setattr(runner_module, "onnxruntime_has_query_seqlens", lambda: False)
    runner = ModelRunner(test_model_dir, ModelCard.load(test_model_dir), kv_slots=2, capacity=16)
    assert runner.graph_file == contract.MODEL_FILE_WITHOUT_QUERY_SEQLENS and runner.call_plan == "uniform"


def test_a_dir_without_the_second_graph_is_refused_in_one_line(test_model_dir, monkeypatch):
    """What a server on onnxruntime 1.31 says about a dir exported before both graphs were written."""
    card = dataclasses.replace(ModelCard.load(test_model_dir), graphs={"with_query_seqlens": contract.MODEL_FILE})
    monkeypatch.setattr(runner_module, "onnxruntime_has_query_seqlens", lambda: False)
    with pytest.raises(RunnerError, match="no query_seqlens input .1.32 added it.*re-export") as error:
        ModelRunner(test_model_dir, card, kv_slots=1, capacity=8)
    assert "\n" not in str(error.value)
