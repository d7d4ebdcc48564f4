"""Measure an fp16 export's error against fp32 PyTorch over many seeds: what export/verify.py's fp16 bound is checked against.

    python -m export.fp16_error --train test [--seeds 1000]
    python -m export.fp16_error --checkpoint DIR [--seeds 50]
    python -m export.fp16_error --preset smollm2-135m-instruct [--seeds 50]

Exports the checkpoint once in fp16 (to a temporary dir), runs the
verification pass's measurements (export/verify.py) with seeds first-seed,
first-seed + 1, ... on onnxruntime's CPU provider (or --device cuda), prints
each seed's figures as a JSON line, then the distribution over the seeds:
min / median / max of every logit figure, and of each seed's worst figure
in rounding units (export/verify.py: fp16_rounding_unit, the unit
FP16_BOUND_UNITS is written in), the margin the bound leaves above the
worst seed, the seeds over the bound, and the CPU's vector
instruction sets (onnxruntime picks its kernels by them). --train builds the
test suite's own checkpoint (tests/conftest.py: 60 seeded steps on 0.3 MB of
the standard library). docs/benchmarks.md records the figures.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

from server import contract

DIFF_FIGURES = ("prompt_max_abs_diff", "decode_max_abs_diff", "ragged_max_abs_diff", "teacher_forced_max_abs_diff")
SUITE_TRAINING = dict(steps=60, max_corpus_mb=0.3)  # what tests/conftest.py's train_tiny gives every test


def measure_seeds(checkpoint: Path, seeds: int, device: str = "cpu", log=print, first_seed: int = 0) -> list[dict]:
    from export.model_dir import architecture, make_card, verification_bound
    from export.onnx_export import export_onnx
    from export.verify import measure
    from model.checkpoint import load_checkpoint, read_checkpoint_meta

    model, config = load_checkpoint(checkpoint)
    card = make_card(config, read_checkpoint_meta(checkpoint), verification={}, dtype="float16")
    bound = verification_bound(architecture(config), "float16")
    with tempfile.TemporaryDirectory(prefix="attnserve-fp16-") as tmp:
        export_onnx(model, Path(tmp) / contract.MODEL_FILE, "float16")
        results = []
        for seed in range(first_seed, first_seed + seeds):
            results.append(measure(model, Path(tmp), card, bound, seed=seed, device=device))
            log(json.dumps(results[-1]))
    return results


def worst_in_units(figures: dict, n_layers: int) -> float:
    """The seed's largest logit figure in fp16 rounding units: the unit of export/verify.py's FP16_BOUND_UNITS."""
    from export.verify import fp16_rounding_unit

    worst = max(figures[name] for name in DIFF_FIGURES if name in figures)
    return worst / fp16_rounding_unit(n_layers, figures["logit_scale"])


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def distribution(results: list[dict], architecture: str, n_layers: int) -> dict:
    from export.verify import FP16_BOUND_UNITS

    names = [n for n in DIFF_FIGURES if n in results[0]]
    units = [worst_in_units(r, n_layers) for r in results]
    return {
        "seeds": len(results),
        **{name: spread([r[name] for r in results]) for name in names},
        "logit_scale": spread([r["logit_scale"] for r in results]),
        "worst_figure_in_rounding_units": spread(units),
        "bound_in_rounding_units": FP16_BOUND_UNITS[architecture],
        "margin": FP16_BOUND_UNITS[architecture] / max(units),  # the bound over the worst seed
        "seeds_over_the_bound": [r["seed"] for r, u in zip(results, units) if u > FP16_BOUND_UNITS[architecture]],
        "bound": spread([r["bound"] for r in results]),
        "teacher_forced_top1_agreement_min": min(r["teacher_forced_top1_agreement"] for r in results),
        "greedy_diverged_seeds": sum(r["greedy_first_divergence"] is not None for r in results),
        "cpu_flags": cpu_flags(),
    }


def cpu_flags() -> list[str]:
    """The AVX2 / AVX-512 sets /proc/cpuinfo lists (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(avx2|avx512\w*)\b", text)))


def train_suite_checkpoint(preset: str, out: Path) -> Path:
    from model.train import train

    train(out, preset, cache_dir=out.parent / "tokens", progress_bar=False, **SUITE_TRAINING)
    return out


def checkpoint_for(args: argparse.Namespace, tmp: Path) -> Path:
    if args.train:
        return train_suite_checkpoint(args.train, tmp / args.train)
    if args.preset:
        from export import importers

        checkpoint = tmp / "checkpoint"
        importers.import_gguf(importers.find_smollm2_gguf(), checkpoint, name=args.preset)
        return checkpoint
    return args.checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.fp16_error", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path)
    source.add_argument("--preset", help="an imported preset (smollm2-135m-instruct)")
    source.add_argument("--train", choices=("test", "test-llama"), help="train the test suite's checkpoint first")
    parser.add_argument("--seeds", type=int, default=50, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    from export.model_dir import architecture
    from model.checkpoint import read_checkpoint_meta

    with tempfile.TemporaryDirectory(prefix="attnserve-fp16-source-") as tmp:
        checkpoint = checkpoint_for(args, Path(tmp))
        results = measure_seeds(checkpoint, args.seeds, args.device, first_seed=args.first_seed)
        config = read_checkpoint_meta(checkpoint)["model"]
    summary = distribution(results, architecture(config), config.n_layers)
    print("distribution over", len(results), "seeds:", json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
