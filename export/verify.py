"""The verification pass that ends every export: onnxruntime against PyTorch.

It drives the exported graph through the server's own runner (the code that
serves it), on fresh random tokens, and compares with the PyTorch module run
with full recomputation and no cache:

    prompt   one call prefilling prompts of different lengths
    decode   single-token steps on top of the cache
    ragged   one call mixing a decode row, a prefill chunk on top of an existing
             cache, an idle row, and a fresh prompt
    greedy   64 greedy tokens through the cache == 64 greedy tokens by full recomputation
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.contract import ModelCard
from export.errors import ExportError
from model.transformer import Transformer
from server.runner import ModelRunner, StepInputs

GREEDY_TOKENS = 64


@dataclass
class Row:
    """A request's tokens in one slot of the verification runner."""

    tokens: list[int]
    cached: int = 0  # tokens already in the slot's cache


def step(runner: ModelRunner, rows: list[Row], new: list[int]) -> np.ndarray:
    """Feed rows[b].tokens[cached : cached + new[b]] for every row in one call; logits [rows, V]."""
    width = max(max(new), 1)
    shape = (len(rows), width)
    input_ids, position_ids = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    seqlens_k, query_seqlens = np.zeros(len(rows), np.int32), np.array(new, np.int32)
    for b, (row, n) in enumerate(zip(rows, new)):
        input_ids[b, :n] = row.tokens[row.cached : row.cached + n]
        position_ids[b, :n] = np.arange(row.cached, row.cached + n)
        # onnxruntime rejects -1 for an idle empty row; 0 is safe since nothing is written.
        seqlens_k[b] = max(row.cached + n - 1, 0)
        row.cached += n
    return runner.step(StepInputs(input_ids, position_ids, seqlens_k, query_seqlens))


@torch.no_grad()
def reference_logits(model: Transformer, tokens: list[int]) -> np.ndarray:
    """PyTorch logits of the last token, recomputing the whole sequence."""
    return model(torch.tensor([tokens]))[0, -1].float().numpy()


def max_diff(model: Transformer, rows: list[Row], logits: np.ndarray, new: list[int]) -> float:
    diffs = [np.abs(logits[b] - reference_logits(model, row.tokens[: row.cached])).max()
             for b, (row, n) in enumerate(zip(rows, new)) if n > 0]
    return float(max(diffs))


def verify(model: Transformer, model_dir: Path, card: ModelCard, bound: float, seed: int | None = None) -> dict:
    """Return the figures; raise ExportError naming the figure and the bound when one is off."""
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    rng = np.random.default_rng(seed)
    vocab = card.vocab_size
    prompt_len = min(48, card.max_positions // 4)
    capacity = prompt_len + GREEDY_TOKENS + 32
    runner = ModelRunner(model_dir, card, kv_slots=4, capacity=capacity)

    def random_tokens(n):
        return rng.integers(0, vocab, n).tolist()

    rows = [Row(random_tokens(prompt_len + 24)) for _ in range(4)]
    prompt_lens = [prompt_len, prompt_len // 2, 3, 1]
    figures = {"seed": seed, "bound": bound}
    figures["prompt_max_abs_diff"] = max_diff(model, rows, step(runner, rows, prompt_lens), prompt_lens)

    decode = 0.0
    for _ in range(4):
        logits = step(runner, rows, [1, 1, 1, 1])
        decode = max(decode, max_diff(model, rows, logits, [1, 1, 1, 1]))
    figures["decode_max_abs_diff"] = decode

    # Row 0 decodes, row 1 prefills a chunk on top of its cache, row 2 is idle, row 3 starts a fresh prompt.
    rows[3] = Row(random_tokens(16))
    ragged = [1, 9, 0, 16]
    figures["ragged_max_abs_diff"] = max_diff(model, rows, step(runner, rows, ragged), ragged)

    prompt = random_tokens(prompt_len)
    cached = greedy_with_cache(runner, prompt)
    recomputed = greedy_recompute(model, prompt)
    figures["greedy_tokens"] = GREEDY_TOKENS
    figures["greedy_cache_equals_recompute"] = cached == recomputed

    failures = [f"{name} = {figures[name]:.3g} exceeds the bound {bound:g}"
                for name in ("prompt_max_abs_diff", "decode_max_abs_diff", "ragged_max_abs_diff")
                if not figures[name] <= bound]  # `not <=` also catches NaN
    if cached != recomputed:
        first = next(i for i, (a, b) in enumerate(zip(cached, recomputed)) if a != b)
        failures.append(f"greedy generation through the cache differs from full recomputation at token {first}")
    if failures:
        raise ExportError("verification failed: " + "; ".join(failures))
    return figures


def greedy_with_cache(runner: ModelRunner, prompt: list[int]) -> list[int]:
    row = Row(list(prompt))
    logits = step(runner, [row], [len(prompt)])
    out = []
    for _ in range(GREEDY_TOKENS):
        out.append(int(logits[0].argmax()))
        row.tokens.append(out[-1])
        logits = step(runner, [row], [1])
    return out


@torch.no_grad()
def greedy_recompute(model: Transformer, prompt: list[int]) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(GREEDY_TOKENS):
        out.append(int(reference_logits(model, tokens).argmax()))
        tokens.append(out[-1])
    return out
