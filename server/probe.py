"""The start-up probe: the served graph must reproduce the logits PyTorch gave at export.

A model dir is often exported on one machine and served on another, whose CPU
makes onnxruntime pick other kernels (AVX2 against AVX-512, int8 activations
with VNNI or without), and weights can be damaged on the way. So the exporter
runs a short fixed probe through PyTorch and stores its logits in the dir
(contract.PROBE_FILE, described by the card's `probe` field), and the server
feeds the same tokens through the graph it is about to serve, before it
reports SERVING:

    card.probe.prompt_ids  ──► one prefill call         ──► logits row 0
    card.probe.decode_ids  ──► one decode call per token ──► logits rows 1..n
                                                              │
    probe_logits.npy  float32 [n + 1, V]  (PyTorch, export) ──┴─► max |diff| <= card.probe.bound ?

The decode tokens are PyTorch's greedy ones, fed whatever the graph's own
argmax is: each row then compares like with like even where a quantized
graph would pick another token near a tie.

compare() and out_of_bound() are pure; run_probe() does the onnxruntime calls.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from server import contract
from server.contract import ModelCard
from server.runner import ModelRunner, StepInputs

# The CPU features that decide which onnxruntime kernels run: recorded with every probe figure.
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


class ProbeError(Exception):
    """The probe cannot be run (its reference file is missing or does not fit the card)."""


@dataclass(frozen=True)
class ProbeResult:
    max_abs_diff: float  # over every logit of every probe row
    worst_row: int  # the row where it was measured: 0 = after the prompt, i = after decode token i
    argmax_agreement: int  # rows whose graph argmax equals PyTorch's
    rows: int


def parse_cpu_flags(cpuinfo: str) -> list[str]:
    """The kernel-relevant flags of /proc/cpuinfo's text, in KERNEL_FLAGS order."""
    present: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            present.update(line.partition(":")[2].split())
    return [flag for flag in KERNEL_FLAGS if flag in present]


def cpu_flags() -> list[str]:
    """This machine's kernel-relevant CPU flags; empty where /proc/cpuinfo cannot be read."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return []


def format_flags(flags: Optional[list[str]]) -> str:
    return " ".join(flags) if flags else "unknown"


def compare(logits: np.ndarray, reference: np.ndarray) -> ProbeResult:
    """Graph logits [rows, V] against PyTorch's; NaN anywhere counts as an infinite difference."""
    if logits.shape != reference.shape:
        raise ProbeError(f"the probe gave logits of shape {list(logits.shape)}, its reference is "
                         f"{list(reference.shape)}")
    diffs = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    per_row = np.where(np.isnan(diffs).any(axis=1), np.inf, np.nanmax(diffs, axis=1))
    worst = int(np.argmax(per_row))
    agree = int((logits.argmax(axis=1) == reference.argmax(axis=1)).sum())
    return ProbeResult(float(per_row[worst]), worst, agree, int(logits.shape[0]))


def out_of_bound(result: ProbeResult, bound: float) -> bool:
    return not result.max_abs_diff <= bound  # `not <=`: NaN and inf are out of bound too


def describe(result: ProbeResult, bound: float) -> str:
    return (f"max |logit diff| {result.max_abs_diff:.3g} against PyTorch's export-time logits "
            f"(row {result.worst_row} of {result.rows}; bound {bound:g}), "
            f"argmax equal on {result.argmax_agreement}/{result.rows} rows")


def probe_tokens(card: ModelCard) -> int:
    """Cache positions the probe needs."""
    return len(card.probe["prompt_ids"]) + len(card.probe["decode_ids"])


def load_reference(model_dir: Path, card: ModelCard) -> np.ndarray:
    path = Path(model_dir) / card.probe.get("file", contract.PROBE_FILE)
    try:
        reference = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ProbeError(f"cannot read the probe's reference logits {path} ({e}); re-export the model dir") from None
    rows = len(card.probe["decode_ids"]) + 1
    if reference.shape != (rows, card.vocab_size):
        raise ProbeError(f"{path} holds logits of shape {list(reference.shape)}, the card's probe needs "
                         f"[{rows}, {card.vocab_size}]; re-export the model dir")
    return reference


def run_graph(runner: ModelRunner, prompt_ids: list[int], decode_ids: list[int]) -> np.ndarray:
    """The probe through the runner, in KV slot 0: one prefill call, then one call per decode token."""
    rows = [runner.step(StepInputs(
        input_ids=np.array([prompt_ids], np.int64), position_ids=np.arange(len(prompt_ids), dtype=np.int64)[None],
        seqlens_k=np.array([len(prompt_ids) - 1], np.int32), query_seqlens=np.array([len(prompt_ids)], np.int32),
    ))[0].copy()]
    for i, token in enumerate(decode_ids):
        position = len(prompt_ids) + i
        rows.append(runner.step(StepInputs(
            input_ids=np.array([[token]], np.int64), position_ids=np.array([[position]], np.int64),
            seqlens_k=np.array([position], np.int32), query_seqlens=np.ones(1, np.int32),
        ))[0].copy())
    return np.stack(rows)


def run_probe(runner: ModelRunner, card: ModelCard, model_dir: Path) -> tuple[ProbeResult, float]:
    """(result, seconds). Writes KV slot 0 only: a request reads only the cache positions it wrote itself."""
    reference = load_reference(model_dir, card)
    started = time.perf_counter()
    logits = run_graph(runner, list(card.probe["prompt_ids"]), list(card.probe["decode_ids"]))
    return compare(logits, reference), time.perf_counter() - started


def check_at_startup(runner: ModelRunner, card: ModelCard, model_dir: Path, capacity: int, log) -> None:
    """Run the probe before the server reports SERVING: log one info line, or raise ProbeError (one line)."""
    if card.probe is None:
        log.warning("model dir %s has no start-up probe (exported before attnserve stored one): serving it unchecked; "
                    "re-export it with `python -m export` so the server can check its logits at start", model_dir)
        return
    if probe_tokens(card) > capacity:
        log.warning("start-up probe skipped: it needs %d cache positions and --max-seq-len gives %d",
                    probe_tokens(card), capacity)
        return
    bound = float(card.probe["bound"])
    reference = load_reference(model_dir, card)
    started = time.perf_counter()
    try:
        logits = run_graph(runner, list(card.probe["prompt_ids"]), list(card.probe["decode_ids"]))
    except Exception as e:  # onnxruntime raises its own types
        raise ProbeError(f"start-up probe could not run the graph: {' '.join(str(e).split())[:300]}") from None
    seconds = time.perf_counter() - started
    result = compare(logits, reference)
    exported = card.probe.get("export") or {}
    machines = (f"CPU flags here: {format_flags(cpu_flags())}; at export: {format_flags(exported.get('cpu_flags'))}, "
                f"max |logit diff| {exported.get('max_abs_diff', float('nan')):.3g}")
    if out_of_bound(result, bound):
        raise ProbeError(
            f"start-up probe failed: {describe(result, bound)} ({machines}); this onnxruntime "
            f"({runner.provider}) computes other logits than the exporting machine verified, or the weights in "
            f"{model_dir} were altered: re-export the model dir with `python -m export`"
        )
    log.info("start-up probe passed in %.0f ms: %s (%s)", seconds * 1000, describe(result, bound), machines)
