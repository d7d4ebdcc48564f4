"""SmolLM2 exported in fp16 and run on onnxruntime's CPU EP (slow: a real 135M model, twice).

The CPU EP runs the fp16 graph (GroupQueryAttention natively in fp16, the
matrix products in float32 between Casts it inserts), so the fp16 export is
verified here, where there is no GPU; docs/benchmarks.md has the figures.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from server.contract import ModelCard
from export.verify import FP16_MIN_TOP1_AGREEMENT, GREEDY_TOKENS, VERIFY_SEED, Row, first_divergence, fp16_bound, step
from server.prompts import load_tokenizer
from server.runner import ModelRunner

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2_fp16_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-fp16") / "smollm2-135m-instruct-fp16"
    result = subprocess.run([sys.executable, "-m", "export", "--preset", "smollm2-135m-instruct", "--dtype", "fp16",
                             "--out", str(out)], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)
    return out


def greedy(model_dir, prompt_ids: list[int]) -> list[int]:
    card = ModelCard.load(model_dir)
    runner = ModelRunner(model_dir, card, kv_slots=1, capacity=len(prompt_ids) + GREEDY_TOKENS + 1)
    row = Row(list(prompt_ids))
    logits = step(runner, [row], [len(prompt_ids)])
    out = []
    for _ in range(GREEDY_TOKENS):
        out.append(int(logits[0].argmax()))
        row.tokens.append(out[-1])
        logits = step(runner, [row], [1])
    return out


def test_smollm2_fp16_export_verifies_and_answers(smollm2_fp16_model_dir, smollm2_model_dir):
    card = ModelCard.load(smollm2_fp16_model_dir)
    figures = card.verification
    print("SmolLM2 fp16 verification:", figures)
    assert card.dtype == "float16" and figures["seed"] == VERIFY_SEED
    assert figures["bound"] == fp16_bound(card, figures["logit_scale"])
    for name in ("prompt_max_abs_diff", "decode_max_abs_diff", "ragged_max_abs_diff", "teacher_forced_max_abs_diff"):
        assert figures[name] <= figures["bound"], name
    assert figures["teacher_forced_top1_agreement"] >= FP16_MIN_TOP1_AGREEMENT

    tokenizer = load_tokenizer(smollm2_fp16_model_dir)
    prompt = tokenizer.encode(PROMPT).ids
    fp16 = greedy(smollm2_fp16_model_dir, prompt)
    fp32 = greedy(smollm2_model_dir, prompt)
    print("fp16:", tokenizer.decode(fp16))
    print("fp32:", tokenizer.decode(fp32))
    print("first divergence from fp32:", first_divergence(fp16, fp32))
    assert "Paris" in tokenizer.decode(fp16)
