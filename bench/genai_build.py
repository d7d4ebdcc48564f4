"""Build the onnxruntime-genai peer the way its users build it: its own model builder, int4, CPU.

    python -m bench.genai_build [--out DIR]

    SmolLM2's GGUF ──transformers──► Hugging Face folder (fp32 safetensors) ──onnxruntime_genai.models.builder
        -p int4 -e cpu──► DIR (model.onnx, genai_config.json, tokenizer): systems genai-builder-engine and
        genai-builder-generator in `python -m bench --peers`

The same weights attnserve imports (the GGUF's, dequantized by transformers), quantized by the builder with
its defaults. transformers will not save a model it loaded from a GGUF, so its weights are moved into a plain
model of the same config first. Cached under the peers folder: a second run returns at once.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.peers import PEERS_DIR

GENAI_DIR = PEERS_DIR / "genai" / "smollm2-135m-instruct-int4"
BUILD_RECORD = "attnserve-build.json"  # how the folder was built, for the results' peer table


def builder_command(hf_dir: Path, out_dir: Path, cache_dir: Path) -> list[str]:
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
            "-p", "int4", "-e", "cpu", "-c", str(cache_dir)]


def save_hf_folder(out: Path) -> Path:
    """SmolLM2's GGUF as a Hugging Face folder (config, fp32 safetensors, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.importers import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker that makes transformers refuse to save
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return gguf


def build(out_dir: Path = GENAI_DIR, log=print) -> Path:
    if (out_dir / "genai_config.json").is_file() and (out_dir / BUILD_RECORD).is_file():
        log(f"onnxruntime-genai peer already built: {out_dir}")
        return out_dir
    work = out_dir.parent / f".{out_dir.name}.work"
    subprocess.run(["rm", "-rf", str(work), str(out_dir)], check=True)
    hf_dir, staged = work / "hf", work / "model"
    started = time.perf_counter()
    log(f"writing the GGUF's weights as a Hugging Face folder in {hf_dir} ...")
    gguf = save_hf_folder(hf_dir)
    command = builder_command(hf_dir, staged, work / "cache")
    log("running " + " ".join(command[1:]))
    # HF_HUB_OFFLINE: the builder reads the local folder and must never reach for the hub.
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                   stdout=subprocess.DEVNULL)
    import onnxruntime_genai

    (staged / BUILD_RECORD).write_text(json.dumps({
        "builder": "onnxruntime_genai.models.builder", "onnxruntime_genai": onnxruntime_genai.__version__,
        "command": " ".join(["python"] + command[1:]).replace(str(work), "WORK"), "precision": "int4",
        "execution_provider": "cpu", "source_gguf": str(gguf), "bytes": sum(
            p.stat().st_size for p in staged.rglob("*") if p.is_file()),
        "seconds": round(time.perf_counter() - started, 1),
    }, indent=2) + "\n")
    staged.rename(out_dir)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    log(f"onnxruntime-genai peer ready: {out_dir}")
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.genai_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=GENAI_DIR, help=f"folder to write [{GENAI_DIR}]")
    args = parser.parse_args(argv)
    try:
        build(args.out)
    except subprocess.CalledProcessError as e:
        print(f"error: the onnxruntime-genai builder failed (exit {e.returncode}); nothing was written to "
              f"{args.out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
