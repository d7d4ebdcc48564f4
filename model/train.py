"""Train a model from scratch on CPU:  python -m model.train --preset small --out checkpoints/small

(An image preset, vit-digits, trains on scikit-learn's digits instead: model/digits.py.)

    corpus ─► split by file hash ─► BPE tokenizer (train side) ─► token ids (cached)
        ─► AdamW, warmup + cosine, clipped gradients, until --steps or --max-minutes
        ─► checkpoint + train_state.pt + loss_curve.png in --out

--out receives:

    model.safetensors, config.json, tokenizer.json   the checkpoint (model/checkpoint.py) that export/ reads
    train_state.pt                                   weights, optimizer, step, RNG, history: what --resume needs
    loss_curve.png                                   train and validation loss against tokens seen

Ctrl-C (or SIGTERM) finishes the current step, saves all of the above and
exits 0; a second Ctrl-C aborts at once and leaves the previous save intact.

On a machine shared with other jobs, run it with OMP_WAIT_POLICY=PASSIVE:
torch's OpenMP threads otherwise spin while they wait for one another, and a
busy neighbour made a `small` step 2.5 to 3.5 times slower (measured, 2 cores).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from model.checkpoint import CheckpointError, save_checkpoint
from model.config import ModelConfig, preset
from model.corpus import DEFAULT_MAX_BYTES, CorpusError
from model.dataset import Dataset, DatasetError, build_dataset, sample_batch
from model.loss_curve import plot_loss_curve
from model.tokenizer import special_token_ids
from model.transformer import Transformer

TRAIN_STATE, LOSS_CURVE = "train_state.pt", "loss_curve.png"


class TrainError(Exception):
    """A run that cannot start or continue; the message says what to do."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a run besides the model config. Saved with the run, so --resume repeats it."""

    preset: str
    batch_size: int  # sequences of config.train_seq_len tokens per step
    lr: float  # peak learning rate, reached after warmup_steps
    warmup_steps: int
    eval_every: int  # steps between validation evaluations
    max_minutes: Optional[float]  # time budget of the training loop, evaluations included; None = none
    steps: Optional[int] = None  # step budget; None = none. The run ends at whichever budget runs out first
    eval_tokens: int = 32_768  # validation tokens scored per evaluation (fewer if the split is smaller)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast for training steps where the CPU has bf16 instructions
    corpus: Optional[tuple[str, ...]] = None  # files or folders; None = the Python standard library
    max_corpus_mb: float = DEFAULT_MAX_BYTES / 1e6
    cache_dir: Optional[str] = None  # tokenized corpora; None = ~/.cache/attnserve/tokens


TEST_DEFAULTS = dict(
    batch_size=8, lr=3e-3, warmup_steps=10, eval_every=20, max_minutes=1.0, eval_tokens=4096,
    precision="fp32",  # tiny matrices: bf16 kernels cost more to set up than they save
)
# `small` is sized so that the whole run (corpus, tokenizer, training, evaluation,
# saving) stays under 15 minutes on 2 CPU cores.
PRESET_DEFAULTS = {
    "test": TEST_DEFAULTS,
    "test-llama": TEST_DEFAULTS,
    "small": dict(batch_size=16, lr=2e-3, warmup_steps=50, eval_every=100, max_minutes=13.0),
}
FALLBACK_DEFAULTS = dict(batch_size=8, lr=3e-4, warmup_steps=200, eval_every=200, max_minutes=60.0)


@dataclass
class History:
    train: list = field(default_factory=list)  # (step, tokens seen, loss of that step's batch)
    val: list = field(default_factory=list)  # (step, tokens seen, validation loss)


@dataclass
class RunState:
    """What changes as training goes: all of it is saved, so a resumed run continues exactly."""

    model: Transformer
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator  # draws the training batches
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    history: History = field(default_factory=History)

    def to_dict(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": {"numpy": self.rng.bit_generator.state, "torch": torch.get_rng_state()},
            "step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
            "history": asdict(self.history),
        }

    def restore(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.rng.bit_generator.state = saved["rng"]["numpy"]
        torch.set_rng_state(saved["rng"]["torch"])
        self.step, self.tokens_seen, self.train_seconds = saved["step"], saved["tokens_seen"], saved["train_seconds"]
        self.history = History(**saved["history"])


@dataclass
class TrainResult:
    out_dir: Path
    model: Transformer
    config: ModelConfig
    step: int
    tokens_seen: int
    train_seconds: float
    final_val_loss: float
    unigram_val_loss: float
    interrupted: bool
    history: History


def train(out_dir: Path, preset_name: Optional[str] = None, *, resume: bool = False, progress_bar: bool = True,
          **overrides) -> TrainResult:
    """Train a run into out_dir, or with resume=True continue the one saved there.

    overrides: TrainSettings fields (None = the default). The `test` preset on
    a few hundred KB of text trains in seconds:
        train(out_dir, "test", steps=60, max_corpus_mb=0.3)
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    saved = load_train_state(out_dir) if resume else None
    settings, config = resolve_settings(preset_name, overrides, saved)
    torch.set_num_threads(cpu_count())
    torch.manual_seed(settings.seed)

    if not saved:
        log("reading the corpus and training the tokenizer")
    tokenizer, data = build_dataset(
        settings.corpus, int(settings.max_corpus_mb * 1e6), config.vocab_size, config.train_seq_len,
        settings.eval_tokens, token_cache_dir(settings), Tokenizer.from_str(saved["tokenizer_json"]) if saved else None,
    )
    if tokenizer.get_vocab_size() != config.vocab_size:
        log(f"note: the corpus gives {tokenizer.get_vocab_size()} BPE tokens, not {config.vocab_size}; the model uses that")
        config = config.replace(vocab_size=tokenizer.get_vocab_size())

    model = Transformer(config)
    run = RunState(model, make_optimizer(model, settings), np.random.default_rng(settings.seed))
    if saved:
        run.restore(saved)
    log(f"training {settings.preset} ({model.num_parameters() / 1e6:.2f} M parameters) on {data.description}; "
        f"batch {settings.batch_size} x {config.train_seq_len}, {'bf16 autocast' if use_bf16(settings.precision) else 'fp32'}, "
        f"{torch.get_num_threads()} threads; unigram baseline {data.unigram_val_loss:.4f} nats/token "
        f"on {data.val_y.numel():,} validation tokens")

    with GracefulStop() as stop:
        train_loop(run, data, settings, stop, progress_bar)
        if run.history.val[-1][0] != run.step:
            run.history.val.append((run.step, run.tokens_seen, evaluate(model, data)))
        save_run(out_dir, run, settings, tokenizer, data, interrupted=stop.requested)

    final_val = run.history.val[-1][2]
    log(f"{'interrupted' if stop.requested else 'done'} at step {run.step}, {run.tokens_seen / 1e6:.2f} M tokens: "
        f"training time {format_duration(run.train_seconds)}{' over all sessions' if saved else ''}; this run took "
        f"{format_duration(time.perf_counter() - started)} with corpus, tokenizer, evaluation and saving")
    log(f"final validation loss {final_val:.4f} nats/token; unigram baseline {data.unigram_val_loss:.4f} nats/token")
    log(f"checkpoint: {out_dir} (loss curve {out_dir / LOSS_CURVE}; continue with --resume)")
    return TrainResult(out_dir, model, config, run.step, run.tokens_seen, run.train_seconds, final_val,
                       data.unigram_val_loss, stop.requested, run.history)


def train_loop(run: RunState, data: Dataset, settings: TrainSettings, stop: "GracefulStop", progress_bar: bool) -> None:
    model, seq_len = run.model, run.model.config.train_seq_len
    autocast = use_bf16(settings.precision)
    if not run.history.val:
        run.history.val.append((0, 0, evaluate(model, data)))
        log(f"step 0: val loss {run.history.val[-1][2]:.4f}")
    if progress(settings, run.step, run.train_seconds) >= 1:
        log("the run has used its budget; give a larger --steps or --max-minutes to train further")
    model.train()
    with ProgressBar(enabled=progress_bar) as bar:
        while progress(settings, run.step, run.train_seconds) < 1 and not stop.requested:
            step_started = time.perf_counter()
            lr = learning_rate(settings, run.step, progress(settings, run.step, run.train_seconds))
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            x, y = sample_batch(data.train_ids, run.rng, settings.batch_size, seq_len)  # (B, T) each
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(x)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            run.optimizer.step()

            run.step += 1
            run.tokens_seen += x.numel()
            run.history.train.append((run.step, run.tokens_seen, loss.item()))
            step_seconds = time.perf_counter() - step_started
            if run.step % settings.eval_every == 0:
                run.history.val.append((run.step, run.tokens_seen, evaluate(model, data)))
                log(f"step {run.step}: val loss {run.history.val[-1][2]:.4f}, train loss {loss.item():.4f}, lr {lr:.2e}")
            run.train_seconds += time.perf_counter() - step_started  # evaluations count against the budget too
            bar.show(progress(settings, run.step, run.train_seconds), loss.item(), x.numel() / step_seconds, lr)


@torch.no_grad()
def evaluate(model: Transformer, data: Dataset, batch_size: int = 16) -> float:
    """Mean cross-entropy (nats/token) on the validation windows, in fp32 as the model is served."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(data.val_x), batch_size):
        logits = model(data.val_x[start : start + batch_size])  # (b, T, V)
        targets = data.val_y[start : start + batch_size]
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
    model.train(was_training)
    return total / data.val_y.numel()


def resolve_settings(preset_name, overrides, saved) -> tuple[TrainSettings, ModelConfig]:
    """Fresh run: the preset's defaults, then overrides. Resume: the saved settings, then overrides."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "corpus" in overrides:
        overrides["corpus"] = tuple(map(str, overrides["corpus"])) or None
    if "cache_dir" in overrides:
        overrides["cache_dir"] = str(overrides["cache_dir"])
    if saved:
        settings = TrainSettings(**{**saved["settings"], "corpus": tuple(saved["settings"]["corpus"] or ()) or None})
        if preset_name and preset_name != settings.preset:
            raise TrainError(f"cannot resume the {settings.preset!r} run in this dir as preset {preset_name!r}")
        config = ModelConfig.from_dict(saved["config"])
    else:
        preset_name = preset_name or "small"
        try:
            config = preset(preset_name)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if config.head != "lm":
            raise TrainError(f"preset {preset_name!r} is not a language model: this trainer trains decoders "
                             "(and vit-digits on the digits)")
        settings = TrainSettings(preset=preset_name, **PRESET_DEFAULTS.get(preset_name, FALLBACK_DEFAULTS))
        if "steps" in overrides and "max_minutes" not in overrides:
            overrides["max_minutes"] = None  # a step count replaces the preset's time budget
    try:
        settings = replace(settings, **overrides)
    except TypeError as e:
        raise TrainError(f"unknown training setting: {e}") from None
    if settings.max_minutes is not None and settings.max_minutes <= 0:
        settings = replace(settings, max_minutes=None)
    if settings.steps is None and settings.max_minutes is None:
        raise TrainError("give --steps or a positive --max-minutes: the run needs a limit")
    if settings.precision not in ("auto", "bf16", "fp32"):
        raise TrainError(f"precision must be auto, bf16 or fp32, got {settings.precision!r}")
    if min(settings.batch_size, settings.eval_every, settings.warmup_steps) < 1 or settings.lr <= 0:
        raise TrainError("batch size, eval interval, warmup steps and learning rate must be positive")
    return settings, config


def progress(settings: TrainSettings, step: int, train_seconds: float) -> float:
    """How far the run is, 0 to 1: the step or the time budget, whichever is closer to its end."""
    done = 0.0
    if settings.steps:
        done = max(done, step / settings.steps)
    if settings.max_minutes:
        done = max(done, train_seconds / (settings.max_minutes * 60))
    return done


def learning_rate(settings: TrainSettings, step: int, done: float) -> float:
    """Linear warmup over the first steps, times a cosine from 1 down to min_lr_ratio over the run."""
    warmup = min(1.0, (step + 1) / settings.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    return settings.lr * warmup * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


def make_optimizer(model: Transformer, settings: TrainSettings) -> torch.optim.AdamW:
    # Weight decay pulls matrices (projections, embeddings) toward zero; norms and biases are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


def save_run(out_dir: Path, run: RunState, settings: TrainSettings, tokenizer: Tokenizer, data: Dataset,
             interrupted: bool) -> None:
    """The checkpoint first (it replaces out_dir whole), then the train state and the loss curve beside it."""
    figures = {
        "steps": run.step, "tokens_seen": run.tokens_seen, "train_seconds": round(run.train_seconds, 1),
        "final_val_loss": round(run.history.val[-1][2], 4), "unigram_val_loss": round(data.unigram_val_loss, 4),
        "val_tokens": data.val_y.numel(), "train_tokens": len(data.train_ids), "interrupted": interrupted,
        "settings": asdict(settings),
    }
    save_checkpoint(out_dir, run.model, tokenizer.to_str(), special_token_ids(tokenizer), extra={"training": figures})
    state = {"config": run.model.config.to_dict(), "settings": asdict(settings), "tokenizer_json": tokenizer.to_str()}
    tmp = out_dir / f".{TRAIN_STATE}.{os.getpid()}"
    torch.save(state | run.to_dict(), tmp)
    os.replace(tmp, out_dir / TRAIN_STATE)
    title = f"{settings.preset}: {run.model.num_parameters() / 1e6:.1f} M parameters"
    plot_loss_curve(out_dir / LOSS_CURVE, run.history, data.unigram_val_loss, title)


def load_train_state(out_dir: Path) -> dict:
    path = Path(out_dir) / TRAIN_STATE
    if not path.is_file():
        raise TrainError(f"cannot resume: {path} does not exist (train into {out_dir} without --resume first)")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a damaged file surfaces as one of several exception types
        raise TrainError(f"cannot resume: {path} is unreadable ({type(e).__name__}); start a fresh run") from None


def use_bf16(precision: str) -> bool:
    if precision == "auto":
        # Without native bf16 instructions, autocast emulates them and runs slower than fp32.
        check = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        return bool(check())
    return precision == "bf16"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def token_cache_dir(settings: TrainSettings) -> Path:
    if settings.cache_dir:
        return Path(settings.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnserve" / "tokens"


def format_duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def log(message: str) -> None:
    tqdm.write(message, file=sys.stdout)  # above the progress bar, not through it
    sys.stdout.flush()


class GracefulStop:
    """The first SIGINT or SIGTERM asks the loop to stop after the current step and save; a second aborts.

    Stopping between steps, never inside one, keeps the saved weights and
    optimizer state consistent with each other.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("stopping after this step to save a checkpoint (Ctrl-C again aborts without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers only there
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class ProgressBar:
    """tqdm over the run's progress in %, so its ETA follows whichever budget ends the run."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.tokens_per_second = 0.0

    def __enter__(self):
        if self.enabled:
            self.bar = tqdm(
                total=100.0, unit="%", dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
                bar_format="{l_bar}{bar}| {n:.1f}% [{elapsed}<{remaining}{postfix}]",
            )
        return self

    def show(self, done: float, loss: float, tokens_per_second: float, lr: float) -> None:
        if not self.bar:
            return
        weight = 0.9 if self.tokens_per_second else 0.0  # smoothed, so one slow step does not swing the figure
        self.tokens_per_second = weight * self.tokens_per_second + (1 - weight) * tokens_per_second
        self.bar.set_postfix_str(f"loss {loss:.3f}, {self.tokens_per_second:,.0f} tok/s, lr {lr:.1e}", refresh=False)
        self.bar.update(min(100.0, done * 100) - self.bar.n)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.close()


def parse_args(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m model.train", description="Train a model from scratch on CPU.")
    parser.add_argument("--preset", help="model preset from model/config.py (default: small)")
    parser.add_argument("--out", required=True, type=Path, help="run dir: checkpoint, train state, loss curve")
    parser.add_argument("--corpus", nargs="+", metavar="PATH", help="text files or folders (default: the Python standard library)")
    parser.add_argument("--max-corpus-mb", type=float, help=f"read at most this much text (default {DEFAULT_MAX_BYTES / 1e6:.0f})")
    parser.add_argument("--max-minutes", type=float, help="time budget of the training loop (default: the preset's; 0 = none)")
    parser.add_argument("--steps", type=int, help="step budget; given without --max-minutes, it replaces the time budget")
    parser.add_argument("--epochs", type=int, help="image presets: passes over the training images (default: the preset's)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--eval-every", type=int, help="steps between validation evaluations")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="precision of the training steps")
    parser.add_argument("--cache-dir", type=Path, help="where tokenized corpora are kept (default ~/.cache/attnserve/tokens)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--no-progress", dest="progress_bar", action="store_false", help="no progress bar")
    return vars(parser.parse_args(argv))


# What an image preset's run takes from the command line; the other options are the text trainer's.
IMAGE_OPTIONS = ("steps", "epochs", "batch_size", "lr", "seed")


def train_image_preset(out_dir: Path, preset_name: str, args: dict) -> None:
    from model.digits import train_digits

    text_only = sorted(k for k, v in args.items() if k not in IMAGE_OPTIONS + ("progress_bar",) and v not in (None, False))
    if text_only:
        raise TrainError(f"--{text_only[0].replace('_', '-')} applies to text presets; {preset_name} takes "
                         + ", ".join(f"--{k.replace('_', '-')}" for k in IMAGE_OPTIONS))
    try:
        train_digits(out_dir, preset_name, log=log, **{k: args[k] for k in IMAGE_OPTIONS})
    except ValueError as e:
        raise TrainError(str(e)) from None


def is_image_preset(name: Optional[str]) -> bool:
    try:
        return bool(name) and preset(name).patch_size > 0
    except ValueError:
        return False  # an unknown name: the text trainer says so


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out_dir, preset_name = args.pop("out"), args.pop("preset")
        if is_image_preset(preset_name):
            train_image_preset(out_dir, preset_name, args)
        elif args.pop("epochs") is not None:
            raise TrainError("--epochs applies to image presets; give a text preset --steps or --max-minutes")
        else:
            train(out_dir, preset_name, **args)
    except (TrainError, CorpusError, DatasetError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; this run saved nothing", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
