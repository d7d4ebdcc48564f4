"""Checkpoint dirs: weights in safetensors, the config, the tokenizer, and metadata.

    DIR/model.safetensors   weights, named as in model/transformer.py
    DIR/config.json         {"model": ModelConfig, "special_tokens": {...}, "chat_template": str | null, ...}
    DIR/tokenizer.json      a Hugging Face `tokenizers` file

Both the trainer and the importers (GGUF, Hugging Face) write this layout, so
the exporter has one input format.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.transformer import Transformer

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


class CheckpointError(Exception):
    """A checkpoint dir that cannot be used; the message says what to do."""


def save_checkpoint(
    out_dir: Path,
    model: Transformer,
    tokenizer_json: str,
    special_tokens: dict[str, Optional[int]],
    chat_template: Optional[str] = None,
    extra: Optional[dict[str, Any]] = None,
) -> Path:
    """Write atomically: a temporary sibling dir is renamed into place, so a crash leaves no partial checkpoint."""
    with staging_dir(out_dir) as tmp:
        state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        meta = {"model": model.config.to_dict(), "special_tokens": special_tokens, "chat_template": chat_template}
        meta.update(extra or {})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / TOKENIZER).write_text(tokenizer_json)
    return Path(out_dir)


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of out_dir to write a whole dir into. When the block ends well its files are made
    readable by all (safetensors and onnx write 0600; servers often run as another user) and it replaces
    out_dir (replace_dir); when it raises, it is removed and out_dir is left as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                path.chmod(0o644)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move src to dst, replacing an existing dst; the old one disappears only once the new one is complete."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def read_checkpoint_meta(ckpt_dir: Path) -> dict:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint dir {ckpt_dir} does not exist; train one with `python -m model.train --out {ckpt_dir}`")
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (ckpt_dir / name).is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir} has no {name}; it is incomplete, train or import it again")
    try:
        meta = json.loads((ckpt_dir / CONFIG).read_text())
        meta["model"] = ModelConfig.from_dict(meta["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}/{CONFIG} is corrupt ({e}); train or import it again") from None
    return meta


def load_checkpoint(ckpt_dir: Path) -> tuple[Transformer, ModelConfig]:
    """Load a checkpoint dir -> (module in eval mode, config). input_ids (B, T) -> logits (B, T, V)."""
    meta = read_checkpoint_meta(ckpt_dir)
    config: ModelConfig = meta["model"]
    try:
        state = load_file(str(Path(ckpt_dir) / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint weights {ckpt_dir}/{WEIGHTS} are corrupt ({e}); train or import it again") from None
    return module_from_state(config, state, ckpt_dir), config


def module_from_state(config: ModelConfig, state: dict, ckpt_dir: Path) -> Transformer:
    """The module of config holding exactly state's weights, in eval mode; a mismatch is a CheckpointError."""
    model = Transformer(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint weights do not fit the config in {ckpt_dir}: {first}") from None
    return model.eval()
