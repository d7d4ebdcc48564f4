"""python -m bench.quality --model FP32_DIR --model INT8_DIR --model INT4_DIR: what quantization costs in quality.

The first --model is the reference (fp32); every dir, the reference included, is measured the
same way, through the server's own runner (server/runner.py) on this machine:

    logits     max |logit diff| against PyTorch holding the same weights the dir holds (a
               quantized dir's blocks, dequantized), on export/verify.py's seeded prompt,
               decode and ragged calls
    greedy     the first GREEDY_TOKENS greedy tokens of each fixed prompt (chat prompts through
               the card's chat template; end of sequence ignored) against the reference dir's:
               the share of prompts whose tokens are all identical, the mean matching prefix
    perplexity nats/token, teacher-forced through the KV cache, on held-out text already on
               the machine: the standard-library files the `small` preset validates on
               (model/corpus.py's split) and English prose from /usr/share/common-licenses

Writes bench/results/quality-<name>.json and .md (the command, the commit, the CPU flags).
The pure parts (matching_prefix, agreement, token_nll, perplexity) are unit-tested.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GREEDY_TOKENS = 64
PROSE_DIR = Path("/usr/share/common-licenses")
PROSE_FILES = ("Apache-2.0", "GFDL-1.3", "GPL-3", "MPL-2.0")  # distinct texts (the others are older versions)

CHAT_PROMPTS = (
    "What is the capital of France?", "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn leaves.", "How do I reverse a list in Python?",
    "Give me three tips for better sleep.", "What is the difference between weather and climate?",
    "Summarize the plot of Romeo and Juliet.", "Why is the sky blue?",
    "Translate 'good morning' into Spanish and French.", "What does HTTP stand for?",
    "Write a short email declining a meeting invitation.", "List the planets of the solar system in order.",
    "How does a bicycle stay upright?", "What is a prime number? Give examples.",
    "Suggest a name for a coffee shop.", "Explain recursion to a ten-year-old.",
    "What are the health benefits of walking?", "How do vaccines work?",
    "Write a Python function that checks if a string is a palindrome.", "What causes the seasons on Earth?",
)
PLAIN_PROMPTS = (
    "The history of the printing press begins", "Once upon a time, in a small village by the sea,",
    "The three most important rules of cooking are", "In mathematics, a group is",
    "The weather forecast for tomorrow says", "def fibonacci(n):\n", "import os\nimport sys\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n", "for i in range(10):\n", "# Read a CSV file and print each row\n",
    "The mitochondria is", "My favourite book is", "Water boils at", "The quick brown fox",
    "Dear Sir or Madam,\n\nI am writing to", "Step 1: Preheat the oven to",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(", "SELECT name, age FROM users WHERE",
    "The stock market fell today after", "Photosynthesis converts",
)


# ---- pure parts ----

def matching_prefix(reference: Sequence[int], other: Sequence[int]) -> int:
    """Tokens equal from the start, up to the first difference."""
    n = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        n += 1
    return n


def agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict:
    """Greedy agreement of `other` with `reference`, prompt by prompt (same order, same lengths)."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"agreement needs the same non-zero number of prompts, got {len(reference)} and {len(other)}")
    prefixes = [matching_prefix(a, b) for a, b in zip(reference, other)]
    identical = sum(p == len(a) == len(b) for p, a, b in zip(prefixes, reference, other))
    return {"prompts": len(reference), "identical": identical, "identical_share": identical / len(reference),
            "mean_matching_prefix": float(np.mean(prefixes)), "tokens": max(len(a) for a in reference)}


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (nats) of each row's target under the softmax of its logits [rows, V], in float64."""
    rows = np.asarray(logits, np.float64)
    peak = rows.max(axis=1, keepdims=True)
    log_z = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
    return log_z - rows[np.arange(len(rows)), np.asarray(targets)]


def perplexity(nll: Sequence[float]) -> dict:
    nats = float(np.mean(nll))
    return {"tokens": len(nll), "nats_per_token": nats, "perplexity": float(np.exp(nats))}


def relative_change(value: float, reference: float) -> float:
    return (value - reference) / reference


def windows(documents: Sequence[Sequence[int]], length: int, count: int) -> list[list[int]]:
    """Up to `count` windows of `length` tokens: each document's first window, then each one's second, ..."""
    out: list[list[int]] = []
    for k in range(max((len(d) // length for d in documents), default=0)):
        for doc in documents:
            if len(out) == count:
                return out
            if (k + 1) * length <= len(doc):
                out.append(list(doc[k * length : (k + 1) * length]))
    return out


# ---- reading model dirs ----

def weights_scheme(card) -> str:
    weights = getattr(card, "weights", None)
    if isinstance(weights, dict) and weights.get("scheme"):
        return weights["scheme"]
    return {"float32": "fp32", "float16": "fp16"}.get(card.dtype, card.dtype)


def dir_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.is_file())


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits' packing undone: uint8 [N, blocks, blob] -> codes uint8 [N, K]."""
    rows = packed.shape[0]
    flat = packed.reshape(rows, -1)
    if bits == 8:
        return flat[:, :k]
    codes = np.empty((rows, flat.shape[1] * 2), np.uint8)
    codes[:, 0::2], codes[:, 1::2] = flat & 0x0F, flat >> 4
    return codes[:, :k]


def dequantized_weights(model_dir: Path) -> dict:
    """Our parameter name -> float32 [N, K] for every block-quantized weight of a dir's graph (empty: none)."""
    import onnx
    from onnx import helper, numpy_helper

    from export.graph_passes import fused_matmul_columns, fused_members
    from export.quantize import _PREFIX, EMBEDDING, BlockWeight

    model = onnx.load(str(Path(model_dir) / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}

    # Q4_1 block minimums of fused projections sit in one fused correction MatMul: `<name>.offset_product`.
    fused_offsets = {member.removesuffix(".offset_product") + ".offsets": columns
                     for member, columns in fused_matmul_columns(model).items() if member.endswith(".offset_product")}

    def array(name):
        if name in fused_offsets:
            return fused_offsets[name]
        return numpy_helper.to_array(inits[name]) if name in inits else None

    out = {}
    for node in model.graph.node:
        if node.domain != "com.microsoft" or not node.name.startswith(_PREFIX):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits = attrs["bits"]
        if node.op_type == "MatMulNBits":
            n, k = attrs["N"], attrs["K"]
            codes = unpack_codes(array(node.input[1]), bits, k)
            scales = array(node.input[2]).reshape(n, -1)
            zero = 2 ** (bits - 1)
            if len(node.input) > 3 and node.input[3]:
                zero = int(unpack_codes(array(node.input[3]).reshape(n, -1), bits, 1)[0, 0])
            # A fused node (q, k, v or gate, up; export/graph_passes.py) holds its members' rows in order.
            start = 0
            for member, size in fused_members(node) or [(node.name, n)]:
                name = member[len(_PREFIX):]
                offsets = array(f"{_PREFIX}{name}.offsets")
                weight = BlockWeight(codes[start:start + size], scales[start:start + size], bits, zero,
                                     None if offsets is None else offsets.T.copy())
                out[name] = weight.dequantize()
                start += size
        elif node.op_type == "GatherBlockQuantized" and node.name == _PREFIX + EMBEDDING:
            codes = array(node.input[0])
            weight = BlockWeight(codes, array(node.input[2]).reshape(codes.shape[0], -1), bits, 2 ** (bits - 1))
            out[EMBEDDING] = weight.dequantize()
    return out


def reference_module(fp32_model, model_dir: Path):
    """(PyTorch module holding the dir's weights, label): the fp32 module itself for a float dir."""
    import torch

    from export.quantize import EMBEDDING, LM_HEAD
    from model.transformer import Transformer

    try:
        weights = dequantized_weights(model_dir)
    except (ImportError, KeyError) as e:
        return fp32_model, f"PyTorch fp32 weights (the dir's could not be dequantized: {e})"
    if not weights:
        return fp32_model, "PyTorch fp32"
    state = {k: v.clone() for k, v in fp32_model.state_dict().items()}
    config = fp32_model.config
    if LM_HEAD in weights and config.tie_embeddings:
        config = config.replace(tie_embeddings=False)  # the head has blocks of its own, unlike the embedding
        state[LM_HEAD] = state[EMBEDDING].clone()
    for name, values in weights.items():
        state[name] = torch.from_numpy(values)
    module = Transformer(config)
    module.load_state_dict(state, strict=True)
    return module.eval(), "PyTorch, the dir's weights dequantized"


def load_fp32_model(checkpoint: Optional[Path], card, tokenizer_json: str, work: Path):
    """The fp32 PyTorch module: the checkpoint's, or for a GGUF import the same file imported again."""
    from export import importers
    from model.checkpoint import load_checkpoint

    if checkpoint is None:
        source = (card.exporter or {}).get("source") or {}
        if source.get("format") != "gguf":
            raise SystemExit("error: give --checkpoint (the fp32 dir was not imported from a GGUF file)")
        checkpoint = importers.import_gguf(Path(source["path"]), work / "checkpoint", name=card.name,
                                           tokenizer_json=tokenizer_json)
    return load_checkpoint(checkpoint)[0]


# ---- measuring one dir ----

def encode_prompts(model_dir: Path, card) -> list[tuple[str, list[int]]]:
    from server.prompts import PromptCodec, load_tokenizer

    codec = PromptCodec(load_tokenizer(model_dir), card)
    prompts = [("chat" if codec.has_chat_template else "chat-as-plain",
                codec.encode_chat([("user", text)]) if codec.has_chat_template else codec.encode_prompt(text))
               for text in CHAT_PROMPTS]
    return prompts + [("plain", codec.encode_prompt(text)) for text in PLAIN_PROMPTS]


def greedy(runner, prompts: list[list[int]], tokens: int, slots: int) -> list[list[int]]:
    """GREEDY_TOKENS greedy tokens of each prompt, `slots` prompts at a time (prefilled together, ragged)."""
    from export.verify import Row, step

    out = []
    for first in range(0, len(prompts), slots):
        rows = [Row(list(p)) for p in prompts[first : first + slots]]
        logits = step(runner, rows, [len(r.tokens) for r in rows])
        generated = [[] for _ in rows]
        for i in range(tokens):
            for b, row in enumerate(rows):
                generated[b].append(int(logits[b].argmax()))
                row.tokens.append(generated[b][-1])
            if i + 1 < tokens:
                logits = step(runner, rows, [1] * len(rows))
        out.extend(generated)
    return out


def teacher_forced_nll(runner, texts: list[list[int]], context: int, slots: int) -> list[float]:
    """Per scored token, nats: each window's first `context` tokens are prefilled, the rest predicted one by one."""
    from export.verify import Row, step

    nll: list[float] = []
    for first in range(0, len(texts), slots):
        batch = texts[first : first + slots]
        rows = [Row(list(t)) for t in batch]
        logits = step(runner, rows, [context] * len(rows))
        for j in range(context, len(batch[0])):
            nll.extend(token_nll(logits, np.array([t[j] for t in batch])))
            if j + 1 < len(batch[0]):
                logits = step(runner, rows, [1] * len(rows))
    return nll


@functools.lru_cache(maxsize=1)
def heldout_corpora() -> dict[str, tuple[list[str], list[str]]]:
    """Corpus name -> (file names, texts). The standard library's files are split as `small` trained on them."""
    from model.corpus import read_documents, split_documents

    _, val = split_documents(read_documents())
    prose = [p for p in (PROSE_DIR / name for name in PROSE_FILES) if p.is_file()]
    return {"python-stdlib-heldout": ([d.name for d in val], [d.text for d in val]),
            "prose-common-licenses": ([str(p) for p in prose], [p.read_text(errors="replace") for p in prose])}


def heldout_texts(tokenizer, context: int, scored: int, count: int) -> dict[str, dict]:
    out = {}
    for name, (files, texts) in heldout_corpora().items():
        documents = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        out[name] = {"files": files, "windows": windows(documents, context + scored, count)}
    return out


def logit_diffs(module, model_dir: Path, card, seed: int = 0) -> dict:
    """max |logit diff| against `module` on calls shaped as export/verify.py's (seeded random tokens): a prompt
    call of four lengths, four decode steps, and a ragged call (a decode row, a chunk on a cache, an idle row, a
    fresh prompt). Its greedy and second-graph checks are left out: the greedy figures here cover them."""
    from export.verify import Comparison, Row, step
    from server.runner import ModelRunner

    rng = np.random.default_rng(seed)
    compare = Comparison()
    prompt_len = min(48, card.max_positions // 4)
    runner = ModelRunner(model_dir, card, kv_slots=4, capacity=prompt_len + 64, device="cpu")

    def random_tokens(n):
        return rng.integers(0, card.vocab_size, n).tolist()

    rows = [Row(random_tokens(prompt_len + 24)) for _ in range(4)]
    new = [prompt_len, prompt_len // 2, 3, 1]
    out = {"prompt_max_abs_diff": compare.rows(module, rows, step(runner, rows, new), new)}
    out["decode_max_abs_diff"] = max(compare.rows(module, rows, step(runner, rows, [1] * 4), [1] * 4)
                                     for _ in range(4))
    if runner.call_plan == "mixed":
        rows[3] = Row(random_tokens(16))
        new = [1, 9, 0, 16]
        out["ragged_max_abs_diff"] = compare.rows(module, rows, step(runner, rows, new), new)
    out["logit_scale"] = compare.scale
    return out


def measure_dir(model_dir: Path, fp32_model, reference_tokens: Optional[list[list[int]]], args, log) -> dict:
    from server.contract import ModelCard
    from server.prompts import load_tokenizer
    from server.runner import ModelRunner

    card = ModelCard.load(model_dir)
    started = time.perf_counter()
    result = {"dir": str(model_dir), "name": card.name, "scheme": weights_scheme(card), "dtype": card.dtype,
              "dir_bytes": dir_bytes(model_dir), "weights": getattr(card, "weights", None)}
    phases = result["phase_seconds"] = {}
    module, label = reference_module(fp32_model, model_dir)
    result["logits"] = {"reference": label, **logit_diffs(module, model_dir, card)}
    if module is not fp32_model:  # what quantizing costs, beside what the runtime's arithmetic costs
        result["logits_vs_fp32"] = logit_diffs(fp32_model, model_dir, card)
    phases["logits"] = round(time.perf_counter() - started, 1)
    log(f"  {model_dir.name}: max |logit diff| vs {label}: " +
        ", ".join(f"{k.split('_')[0]} {v:.2e}" for k, v in result["logits"].items() if k.endswith("_diff")))
    prompts = encode_prompts(model_dir, card)
    capacity = max(max(len(p) for _, p in prompts) + GREEDY_TOKENS, args.context + args.scored) + 1
    runner = ModelRunner(model_dir, card, kv_slots=args.slots, capacity=capacity, device="cpu")
    mark = time.perf_counter()
    tokens = greedy(runner, [p for _, p in prompts], GREEDY_TOKENS, args.slots)
    phases["greedy"] = round(time.perf_counter() - mark, 1)
    result["greedy_tokens"] = tokens
    result["prompt_kinds"] = [kind for kind, _ in prompts]
    if reference_tokens is not None:
        result["greedy"] = agreement(reference_tokens, tokens)
        log(f"  greedy: {result['greedy']['identical']}/{result['greedy']['prompts']} prompts identical over "
            f"{GREEDY_TOKENS} tokens, mean matching prefix {result['greedy']['mean_matching_prefix']:.1f}")
    result["perplexity"] = {}
    mark = time.perf_counter()
    for name, corpus in heldout_texts(load_tokenizer(model_dir), args.context, args.scored, args.windows).items():
        nll = teacher_forced_nll(runner, corpus["windows"], args.context, args.slots)
        result["perplexity"][name] = {**perplexity(nll), "files": corpus["files"], "windows": len(corpus["windows"]),
                                      "context": args.context}
        log(f"  {name}: {result['perplexity'][name]['nats_per_token']:.4f} nats/token over {len(nll)} tokens")
    phases["perplexity"] = round(time.perf_counter() - mark, 1)
    result["seconds"] = round(time.perf_counter() - started, 1)
    log(f"  {model_dir.name} measured in {result['seconds']:.0f} s ({phases})")
    return result


# ---- the report ----

DIFF_KEYS = ("prompt_max_abs_diff", "decode_max_abs_diff", "ragged_max_abs_diff")


def markdown(results: dict) -> str:
    reference = results["models"][0]
    corpora = list(reference["perplexity"])
    head = ["model dir", "weights", "dir MB", "max \\|logit diff\\| prompt / decode / ragged", "vs",
            "same, vs PyTorch fp32",
            f"greedy identical ({GREEDY_TOKENS} tokens)", "mean matching prefix"]
    head += [f"{c} nats/token (vs fp32)" for c in corpora]
    lines = [f"Command: `{results['command']}`  ", f"Commit: `{results['git']['commit']}`"
             + (" (uncommitted changes)" if results["git"]["dirty_files"] else "") + "  ",
             f"CPU flags: {' '.join(results['cpu_flags']) or 'unknown'}; onnxruntime {results['versions']['onnxruntime']}",
             "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in results["models"]:
        diffs, diffs_fp32 = (" / ".join(f"{figures.get(k, float('nan')):.1e}" for k in DIFF_KEYS) if figures else "(same)"
                             for figures in (m["logits"], m.get("logits_vs_fp32")))
        greedy_cells = (["(reference)", "(reference)"] if m is reference else
                        [f"{m['greedy']['identical']}/{m['greedy']['prompts']} ({m['greedy']['identical_share']:.0%})",
                         f"{m['greedy']['mean_matching_prefix']:.1f}"])
        ppl = []
        for c in corpora:
            nats = m["perplexity"][c]["nats_per_token"]
            ref = reference["perplexity"][c]["nats_per_token"]
            ppl.append(f"{nats:.4f}" + ("" if m is reference else f" ({relative_change(nats, ref):+.2%})"))
        level = (m.get("weights") or {}).get("accuracy_level")
        scheme = m["scheme"] + ("" if level is None else f", accuracy_level {level}")
        lines.append("| " + " | ".join([Path(m["dir"]).name, scheme, f"{m['dir_bytes'] / 1e6:.0f}", diffs,
                                        m["logits"]["reference"], diffs_fp32, *greedy_cells, *ppl]) + " |")
    s = results["settings"]
    kinds = reference["prompt_kinds"]
    chat = ("chat, through the chat template" if "chat" in kinds else
            "chat questions sent as plain prompts: the model has no chat template")
    lines += ["", f"Greedy: {len(kinds)} fixed prompts ({len(kinds) - kinds.count('plain')} {chat}; "
              f"{kinds.count('plain')} plain), "
              f"{GREEDY_TOKENS} tokens each, end of sequence ignored. Perplexity: {s['windows']} windows per corpus, "
              f"{s['context']} context tokens then {s['scored']} scored, teacher-forced through the KV cache; "
              "corpora: " + "; ".join(f"{c}: {len(reference['perplexity'][c]['files'])} files" for c in corpora) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", required=True,
                        help="a model dir; repeat it, the first is the fp32 reference")
    parser.add_argument("--checkpoint", type=Path, help="the fp32 checkpoint (default: re-import the dir's GGUF)")
    parser.add_argument("--name", help="results name (default: the first dir's name)")
    parser.add_argument("--slots", type=int, default=16, help="prompts or windows run together")
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows per corpus")
    parser.add_argument("--context", type=int, default=64, help="tokens of context before the scored ones")
    parser.add_argument("--scored", type=int, default=128, help="tokens scored per window")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Before torch loads: spinning OpenMP threads (its default) starve onnxruntime's on a busy machine, and
    # made the PyTorch reference 30 times slower here.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from bench.harness import git_state, versions
    from server.contract import ModelCard
    from server.probe import cpu_flags

    def log(message):
        print(message, flush=True)

    started = time.perf_counter()
    fp32_dir = args.model[0]
    card = ModelCard.load(fp32_dir)
    name = args.name or card.name
    with tempfile.TemporaryDirectory(prefix="attnserve-quality-") as work:
        fp32_model = load_fp32_model(args.checkpoint, card, (fp32_dir / "tokenizer.json").read_text(), Path(work))
        log(f"fp32 PyTorch reference loaded in {time.perf_counter() - started:.0f} s")
        models, reference_tokens = [], None
        for model_dir in args.model:
            log(f"measuring {model_dir} ...")
            measured = measure_dir(model_dir, fp32_model, reference_tokens, args, log)
            reference_tokens = reference_tokens or measured["greedy_tokens"]
            models.append(measured)
    results = {
        "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.quality " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "git": git_state(), "versions": versions(), "cpu_flags": cpu_flags(),
        "settings": {"greedy_tokens": GREEDY_TOKENS, "prompts": len(CHAT_PROMPTS) + len(PLAIN_PROMPTS),
                     "chat_prompts": len(CHAT_PROMPTS), "plain_prompts": len(PLAIN_PROMPTS), "slots": args.slots,
                     "windows": args.windows, "context": args.context, "scored": args.scored,
                     "checkpoint": str(args.checkpoint) if args.checkpoint else "re-imported from the GGUF"},
        "models": models, "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"quality-{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (RESULTS / f"quality-{name}.md").write_text(table)
    print(table)
    print(f"wrote {RESULTS / f'quality-{name}.json'} and .md in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
