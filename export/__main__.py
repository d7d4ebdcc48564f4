"""python -m export: build a model dir from a checkpoint, a GGUF file, a Hugging Face folder or a preset.

    python -m export --checkpoint DIR --out MODEL_DIR
    python -m export --from-gguf FILE.gguf --out MODEL_DIR
    python -m export --from-hf HF_DIR --out MODEL_DIR
    python -m export --preset smollm2-135m-instruct --out MODEL_DIR

--dtype fp16 writes weights and KV cache in float16 (logits stay float32) and
verifies against the fp32 PyTorch model under its own bounds.

--weights int4 / int8 writes block-quantized weights (MatMulNBits for every projection and
the LM head, an 8-bit GatherBlockQuantized embedding; docs/quantization.md). From a GGUF, the
file's own Q4_0 / Q4_1 / Q8_0 blocks are imported as they are; other weights are rounded to
nearest from fp32. The graph is verified against PyTorch holding the same dequantized weights.
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
    # Checked by the exporter rather than by argparse choices, so a wrong value is one `error:` line.
    parser.add_argument("--weights", default="fp32", metavar="{fp32,int8,int4}",
                        help="fp32 (default), or block-quantized int8 / int4 weights")
    parser.add_argument("--accuracy-level", type=int, default=None, metavar="{0,4}",
                        help="MatMulNBits' accuracy_level for int8/int4: 4 (default) multiplies int8 activations "
                             "(faster), 0 dequantizes to fp32")
    parser.add_argument("--gguf-q4-1", default="offsets", metavar="{offsets,requantize}",
                        help="GGUF Q4_1 tensors under --weights int4: offsets (default) holds them exactly, "
                             "requantize rounds them to symmetric 4-bit")
    parser.add_argument("--verify-device", choices=("cpu", "cuda"), default="cpu",
                        help="execution provider of the verification pass (cuda needs onnxruntime-gpu)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    # Imported lazily: torch takes seconds to import and `--help` should not wait for it.
    from export import importers
    from export.model_dir import DEFAULT_ACCURACY_LEVEL, build_model_dir, check_weights
    from model.config import PRESETS

    accuracy_level = DEFAULT_ACCURACY_LEVEL if args.accuracy_level is None else args.accuracy_level
    # Before any import: a wrong --weights must not wait for a GGUF to be read.
    check_weights(args.weights, DTYPE_NAMES[args.dtype], accuracy_level)
    if args.gguf_q4_1 not in ("offsets", "requantize"):
        raise ExportError(f"--gguf-q4-1 must be offsets or requantize, got {args.gguf_q4_1!r}")

    def build(checkpoint: Path, gguf_blocks=None) -> None:
        build_model_dir(checkpoint, args.out, dtype=DTYPE_NAMES[args.dtype], verify_device=args.verify_device,
                        weights=args.weights, accuracy_level=accuracy_level, gguf_blocks=gguf_blocks,
                        q4_1=args.gguf_q4_1)

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
            if args.weights != "fp32":
                from export.gguf_blocks import gguf_block_weights
                from model.checkpoint import read_checkpoint_meta

                config = read_checkpoint_meta(checkpoint)["model"]
                build(checkpoint, gguf_block_weights(gguf_file, config))
                return
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
