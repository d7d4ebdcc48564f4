"""Measure an fp16 export's error against fp32 PyTorch over several random seeds: what FP16_BOUNDS come from.

    python -m export.fp16_error --checkpoint DIR [--seeds 8]
    python -m export.fp16_error --preset smollm2-135m-instruct [--seeds 8]

Exports the checkpoint once in fp16 (to a temporary dir), runs the
verification pass's measurements (export/verify.py) with N seeds on
onnxruntime's CPU provider (or --device cuda), and prints each seed's
figures and the worst of each across seeds. docs/benchmarks.md records the
figures and the bounds chosen from them.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from server import contract


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


def worst(results: list[dict]) -> dict:
    return {
        **{k: max(r[k] for r in results) for k in ("prompt_max_abs_diff", "decode_max_abs_diff",
                                                    "ragged_max_abs_diff", "teacher_forced_max_abs_diff")},
        "teacher_forced_top1_agreement_min": min(r["teacher_forced_top1_agreement"] for r in results),
        "greedy_first_divergence": [r["greedy_first_divergence"] for r in results],
        "bound": results[0]["bound"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.fp16_error", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path)
    source.add_argument("--preset", help="an imported preset (smollm2-135m-instruct)")
    parser.add_argument("--seeds", type=int, default=8, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="attnserve-import-") as tmp:
        checkpoint = args.checkpoint
        if args.preset:
            from export import importers

            checkpoint = Path(tmp) / "checkpoint"
            importers.import_gguf(importers.find_smollm2_gguf(), checkpoint, name=args.preset)
        results = measure_seeds(checkpoint, args.seeds, args.device, first_seed=args.first_seed)
    print("worst over", len(results), "seeds:", json.dumps(worst(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
