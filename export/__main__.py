"""python -m export: build a model dir from a checkpoint, a GGUF file, a Hugging Face folder or a preset.

    python -m export --checkpoint DIR --out MODEL_DIR
    python -m export --from-gguf FILE.gguf --out MODEL_DIR
    python -m export --from-hf HF_DIR --out MODEL_DIR
    python -m export --preset smollm2-135m-instruct --out MODEL_DIR

--dtype fp16 writes weights and KV cache in float16 (logits stay float32) and
verifies against the fp32 PyTorch model under its own bounds.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from export.errors import ExportError

# Presets that are imported from a published checkpoint rather than trained here.
IMPORTED_PRESETS = ("smollm2-135m-instruct",)
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "float32": "float32", "float16": "float16"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint dir written by `python -m model.train`")
    source.add_argument("--from-gguf", type=Path, metavar="FILE", help="a Llama-family GGUF file")
    source.add_argument("--from-hf", type=Path, metavar="DIR", help="a Hugging Face folder (config.json + safetensors)")
    source.add_argument("--preset", help=f"an imported preset: {', '.join(IMPORTED_PRESETS)}")
    parser.add_argument("--out", type=Path, required=True, help="model dir to write (replaced if it exists)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32",
                        help="weights and KV cache: fp32 (default) or fp16; logits are float32 either way")
    parser.add_argument("--verify-device", choices=("cpu", "cuda"), default="cpu",
                        help="execution provider of the verification pass (cuda needs onnxruntime-gpu)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    # Imported lazily: torch takes seconds to import and `--help` should not wait for it.
    from export import importers
    from export.model_dir import build_model_dir
    from model.config import PRESETS

    def build(checkpoint: Path) -> None:
        build_model_dir(checkpoint, args.out, dtype=DTYPE_NAMES[args.dtype], verify_device=args.verify_device)

    if args.checkpoint:
        build(args.checkpoint)
        return
    if args.preset and args.preset not in IMPORTED_PRESETS:
        if args.preset in PRESETS:
            raise ExportError(
                f"preset {args.preset!r} is trained, not imported: run `python -m model.train --preset "
                f"{args.preset} --out DIR`, then `python -m export --checkpoint DIR --out {args.out}`"
            )
        raise ExportError(f"unknown preset {args.preset!r}; imported presets: {', '.join(IMPORTED_PRESETS)}")
    with tempfile.TemporaryDirectory(prefix="attnserve-import-") as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        if args.from_hf:
            importers.import_hf(args.from_hf, checkpoint)
        else:
            gguf_file = args.from_gguf or importers.find_smollm2_gguf()
            print(f"importing {gguf_file} ...")
            importers.import_gguf(gguf_file, checkpoint, name=args.preset)
        build(checkpoint)


def main(argv=None) -> int:
    args = parse_args(argv)
    from model.checkpoint import CheckpointError

    try:
        run(args)
    except (ExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no model dir was written", file=sys.stderr)
        return 130
    print(f"model dir ready: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
