"""A block-quantized model dir served over real gRPC: batching stays invisible.

MatMulNBits at accuracy_level 4 quantizes each row's activations on their own, so a row's logits
must not depend on the other rows of a call; this checks it token for token, on both serving graphs
(onnxruntime 1.32 with mixed calls, 1.31.1 with uniform calls).
"""
from __future__ import annotations

import pytest

from export.model_dir import build_model_dir
from server.contract import ModelCard
from tests.server.helpers import ONNXRUNTIME_1_31, ServerProcess
from tests.server.test_generation import GREEDY_SEED, check_greedy_batching

FLAGS = ("--kv-slots", "8", "--max-seq-len", "1024", "--prefill-chunk-tokens", "64", "--max-queued-requests", "256")


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory, test_llama_checkpoint):
    out = tmp_path_factory.mktemp("served-int4") / "test-llama-int4"
    build_model_dir(test_llama_checkpoint, out, log=lambda *_: None, weights="int4")
    assert ModelCard.load(out).weights["accuracy_level"] == 4
    return out


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime-1.32", "onnxruntime-1.31.1"])
def test_int4_dir_gives_each_request_the_same_greedy_tokens_batched_as_alone(int4_dir, runtime):
    env = None
    if runtime == "onnxruntime-1.31.1":
        if not (ONNXRUNTIME_1_31 / "onnxruntime").is_dir():
            pytest.fail(f"onnxruntime 1.31.1 is not installed in {ONNXRUNTIME_1_31}; run `make setup`")
        env = {"PYTHONPATH": str(ONNXRUNTIME_1_31)}
    server = ServerProcess(int4_dir, *FLAGS, env=env)
    try:
        assert ("call plan: uniform" in "".join(server.log)) == (env is not None)
        check_greedy_batching(server.stub(), GREEDY_SEED + 11, 24)
    finally:
        server.stop()
