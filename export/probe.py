"""The export half of the start-up probe (server/probe.py): PyTorch's logits for a short fixed probe.

A fixed text, tokenized by the dir's own tokenizer (PROMPT_TOKENS at most),
then DECODE_STEPS greedy tokens chosen by PyTorch. Its logits are stored in
full, one float32 row per call, in contract.PROBE_FILE: [1 + DECODE_STEPS, V],
about 1 MB for SmolLM2's 49,152-token vocabulary. Full rows, because a top-k
subset cannot tell a graph that is right on the likely tokens from one that is
right everywhere; and beside the card, not in it, because a megabyte of JSON
numbers would make the card unreadable.

Before the dir is moved into place the probe runs through the exported graph
on this machine, under the verification's bound for the dtype, so a dir that
fails its own probe is never written.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from tokenizers import Tokenizer

from export.errors import ExportError
from export.verify import derived_bound, exact_arithmetic
from model.transformer import Transformer
from server import contract, probe
from server.contract import ModelCard
from server.runner import ModelRunner

# Natural text rather than random ids: the probe should exercise the weights as a real prompt does.
PROBE_TEXT = "The capital of France is Paris. def add(a, b):\n    return a + b\n"
PROMPT_TOKENS = 12
DECODE_STEPS = 4


def prompt_ids(tokenizer_json: str, vocab_size: int) -> list[int]:
    ids = Tokenizer.from_str(tokenizer_json).encode(PROBE_TEXT, add_special_tokens=True).ids[:PROMPT_TOKENS]
    ids = [i for i in ids if 0 <= i < vocab_size]
    if not ids:
        raise ExportError("the tokenizer encodes the probe text to no token of the model's vocabulary")
    return ids


@torch.no_grad()
def reference(model: Transformer, prompt: list[int], steps: int = DECODE_STEPS) -> tuple[list[int], np.ndarray]:
    """(PyTorch's greedy decode tokens, its logits after the prompt and after each of them: [steps + 1, V])."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    # One causal pass: position len(prompt) - 1 + i predicts the i-th decode token.
    logits = model(torch.tensor([tokens]))[0, len(prompt) - 1 :].float().numpy()
    return tokens[len(prompt):], np.ascontiguousarray(logits, dtype=np.float32)


def probe_bound(card: ModelCard, figures: dict, logits: np.ndarray) -> float:
    """The verification's bound. Where that bound is derived from the logit scale (fp16; int8 activations),
    it is derived over the probe's logits too, and the larger is taken: larger logits round to larger errors."""
    bound = float(figures["bound"])
    if not exact_arithmetic(card):
        bound = max(bound, derived_bound(card, float(np.abs(logits).max())))
    return bound


def write_probe(model: Transformer, model_dir: Path, card: ModelCard, tokenizer_json: str, figures: dict,
                device: str = "cpu") -> dict:
    """Store the probe in model_dir, check the graph there against it, and return the card's `probe` field.

    model: the PyTorch module the verification compared with (the same weights the graph holds).
    """
    prompt = prompt_ids(tokenizer_json, card.vocab_size)
    decode, logits = reference(model, prompt)
    np.save(Path(model_dir) / contract.PROBE_FILE, logits, allow_pickle=False)
    field = {"file": contract.PROBE_FILE, "prompt_ids": prompt, "decode_ids": decode,
             "bound": probe_bound(card, figures, logits)}
    card = dataclasses.replace(card, probe=field)
    runner = ModelRunner(model_dir, card, kv_slots=1, capacity=probe.probe_tokens(card), device=device)
    result, seconds = probe.run_probe(runner, card, model_dir)
    if probe.out_of_bound(result, field["bound"]):
        raise ExportError(f"start-up probe failed on the exporting machine: {probe.describe(result, field['bound'])}")
    field["export"] = {"max_abs_diff": result.max_abs_diff, "argmax_agreement": result.argmax_agreement,
                       "rows": result.rows, "seconds": round(seconds, 4), "device": device,
                       "cpu_flags": probe.cpu_flags(), "onnxruntime": onnxruntime.__version__}
    return field
