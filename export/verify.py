"""The verification pass that ends every export: onnxruntime against PyTorch.

It drives the exported graph through the server's own runner (the code that
serves it), on fresh random tokens, and compares with the PyTorch module run
with full recomputation and no cache:

    prompt   one call prefilling prompts of different lengths
    decode   single-token steps on top of the cache
    ragged   one call mixing a decode row, a prefill chunk on top of an existing
             cache, an idle row, and a fresh prompt
    greedy   64 greedy tokens through the cache == 64 greedy tokens by full recomputation

An fp16 graph is compared with the same fp32 PyTorch module, under its own,
wider bounds (export/model_dir.py: FP16_BOUNDS). Its greedy tokens need not
equal fp32's: wherever two candidates' fp32 logits lie closer than the fp16
error, the fp16 argmax may pick the other one, and from there the two texts
go their own ways. So for fp16 the greedy figures are measured rather than
required equal:

    greedy_first_divergence       first of the 64 tokens where fp16 greedy (through the
                                  cache) differs from fp32 greedy (null: none did)
    teacher_forced_top1_agreement fed the fp32 greedy tokens, the share of the 64 steps
                                  where the fp16 argmax is fp32's argmax
    teacher_forced_max_abs_diff   the logit error along that path (bounded like the others)

and the check is that the agreement does not fall below FP16_MIN_TOP1_AGREEMENT.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.contract import ModelCard
from export.errors import ExportError
from model.transformer import Transformer
from server.runner import ModelRunner, StepInputs

GREEDY_TOKENS = 64
# fp16 only: the share of teacher-forced steps whose argmax must equal fp32's. Measured
# (docs/benchmarks.md, "fp16 verification bounds"): 1.0 on most runs, lowest 0.984
# (SmolLM2, one near-tie in 64 steps on a random-token prompt).
FP16_MIN_TOP1_AGREEMENT = 0.9


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


def verify(model: Transformer, model_dir: Path, card: ModelCard, bound: float, seed: int | None = None,
           device: str = "cpu") -> dict:
    """Return the figures; raise ExportError naming the figure and the bound when one is off.

    model is the fp32 PyTorch module, whatever card.dtype the graph in model_dir has.
    """
    figures = measure(model, model_dir, card, bound, seed, device)
    failures = [f"{name} = {figures[name]:.3g} exceeds the bound {bound:g}"
                for name in DIFF_FIGURES if name in figures
                if not figures[name] <= bound]  # `not <=` also catches NaN
    if card.dtype == "float32" and not figures["greedy_cache_equals_recompute"]:
        failures.append("greedy generation through the cache differs from full recomputation at token "
                        f"{figures['greedy_first_divergence']}")
    if card.dtype != "float32" and not figures["teacher_forced_top1_agreement"] >= FP16_MIN_TOP1_AGREEMENT:
        failures.append(f"teacher_forced_top1_agreement = {figures['teacher_forced_top1_agreement']:.3f} "
                        f"is below {FP16_MIN_TOP1_AGREEMENT}")
    if failures:
        raise ExportError("verification failed: " + "; ".join(failures))
    return figures


DIFF_FIGURES = ("prompt_max_abs_diff", "decode_max_abs_diff", "ragged_max_abs_diff", "teacher_forced_max_abs_diff")


def measure(model: Transformer, model_dir: Path, card: ModelCard, bound: float, seed: int | None = None,
            device: str = "cpu", ragged: bool = True) -> dict:
    """The verification figures, checked by verify(); also what bounds are chosen from.

    ragged=False leaves out the ragged call, for graphs derived for onnxruntime < 1.32
    (export/legacy_gqa.py), whose GroupQueryAttention cannot mix rows with a past and a chunk.
    """
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    rng = np.random.default_rng(seed)
    vocab = card.vocab_size
    prompt_len = min(48, card.max_positions // 4)
    capacity = prompt_len + GREEDY_TOKENS + 32
    runner = ModelRunner(model_dir, card, kv_slots=4, capacity=capacity, device=device)

    def random_tokens(n):
        return rng.integers(0, vocab, n).tolist()

    rows = [Row(random_tokens(prompt_len + 24)) for _ in range(4)]
    prompt_lens = [prompt_len, prompt_len // 2, 3, 1]
    figures = {"seed": seed, "dtype": card.dtype, "bound": bound}
    figures["prompt_max_abs_diff"] = max_diff(model, rows, step(runner, rows, prompt_lens), prompt_lens)

    decode = 0.0
    for _ in range(4):
        logits = step(runner, rows, [1, 1, 1, 1])
        decode = max(decode, max_diff(model, rows, logits, [1, 1, 1, 1]))
    figures["decode_max_abs_diff"] = decode

    if ragged:
        # Row 0 decodes, row 1 prefills a chunk on top of its cache, row 2 is idle, row 3 starts a fresh prompt.
        rows[3] = Row(random_tokens(16))
        new = [1, 9, 0, 16]
        figures["ragged_max_abs_diff"] = max_diff(model, rows, step(runner, rows, new), new)

    prompt = random_tokens(prompt_len)
    cached = greedy_with_cache(runner, prompt)
    recomputed = greedy_recompute(model, prompt)
    figures["greedy_tokens"] = GREEDY_TOKENS
    figures["greedy_cache_equals_recompute"] = cached == recomputed
    figures["greedy_first_divergence"] = first_divergence(cached, recomputed)
    if card.dtype != "float32":
        agreement, diff = teacher_forced(model, runner, prompt, recomputed)
        figures["teacher_forced_top1_agreement"] = agreement
        figures["teacher_forced_max_abs_diff"] = diff
    return figures


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or None when the lists agree (as far as the shorter goes)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@torch.no_grad()
def teacher_forced(model: Transformer, runner: ModelRunner, prompt: list[int], reference: list[int]) -> tuple[float, float]:
    """Feed prompt + reference through the cache; (share of steps whose argmax is the reference's, max |logit diff|)."""
    row = Row(list(prompt) + list(reference))
    # One causal pass gives PyTorch's logits after every prefix: row j predicts token j + 1.
    expected_all = model(torch.tensor([row.tokens]))[0, len(prompt) - 1 :].float().numpy()
    logits = step(runner, [row], [len(prompt)])
    agree, diff = 0, 0.0
    for i, token in enumerate(reference):
        expected = expected_all[i]
        agree += int(logits[0].argmax()) == token
        diff = max(diff, float(np.abs(logits[0] - expected).max()))
        if i + 1 < len(reference):
            logits = step(runner, [row], [1])
    return agree / len(reference), diff


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
