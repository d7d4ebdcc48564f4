"""The SmolLM2 export answers like transformers' own load of the same GGUF (slow: a real 135M model)."""
from __future__ import annotations

import pytest

from server.contract import ModelCard
from export.verify import GREEDY_TOKENS, Row, step
from server.prompts import load_tokenizer
from server.runner import ModelRunner

# transformers loads the reference from the local GGUF only, never from the Hub (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("hf_offline")]
PROMPT = "The capital of France is"


def test_smollm2_greedy_continuation_equals_transformers_generate(smollm2_model_dir):
    transformers = pytest.importorskip("transformers")
    import torch

    from export.importers import find_smollm2_gguf

    card = ModelCard.load(smollm2_model_dir)
    figures = card.verification
    print("SmolLM2 export verification:", figures)
    assert figures["greedy_cache_equals_recompute"] and figures["bound"] == 1e-3
    assert max(figures[k] for k in ("prompt_max_abs_diff", "decode_max_abs_diff", "ragged_max_abs_diff")) <= 1e-3

    tokenizer = load_tokenizer(smollm2_model_dir)
    prompt = tokenizer.encode(PROMPT).ids
    runner = ModelRunner(smollm2_model_dir, card, kv_slots=1, capacity=len(prompt) + GREEDY_TOKENS + 1)
    row = Row(list(prompt))
    logits = step(runner, [row], [len(prompt)])
    ours = []
    for _ in range(GREEDY_TOKENS):
        ours.append(int(logits[0].argmax()))
        row.tokens.append(ours[-1])
        logits = step(runner, [row], [1])

    gguf = find_smollm2_gguf()
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert hf_tokenizer(PROMPT)["input_ids"] == prompt
    with torch.no_grad():
        generated = reference.generate(torch.tensor([prompt]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                       eos_token_id=None, pad_token_id=card.special_tokens.get("pad_token_id"))
    theirs = generated[0, len(prompt):].tolist()
    print("attnserve:", tokenizer.decode(ours))
    assert ours == theirs
    assert "Paris" in tokenizer.decode(ours)
