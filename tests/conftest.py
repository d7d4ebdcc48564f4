"""Fixtures shared by the whole suite."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

# Test modules import shared helpers as `tests.…` (tests/server/helpers.py and the like), from any directory.
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Idle OpenMP threads sleep instead of spinning. Set before anything imports torch (its
# libgomp reads this once, when loaded); subprocesses inherit it. Measured on this shared
# 2-core machine with other jobs running: a `test`-preset training step took 460-1525 ms
# with spinning threads and 65 ms with sleeping ones, and tests/model 202 s against 46 s.
# On an idle machine sleeping costs a thread wake-up (microseconds) per parallel region.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A few hundred KB of the standard library: enough text for the `test` preset's 512-token
# BPE and a loss that visibly falls, little enough to tokenize and train in seconds.
TINY_CORPUS_MB = 0.3


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    """Tokenized corpora, shared by every test in the session so each is tokenized once."""
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="session")
def tiny_corpus_mb() -> float:
    return TINY_CORPUS_MB


@pytest.fixture(scope="session")
def train_tiny(token_cache):
    """train_tiny(out_dir, preset="test", steps=60, **overrides) -> model.train.TrainResult, in a few seconds."""
    from model.train import train

    def train_tiny(out_dir: Path, preset: str = "test", steps: int = 60, **overrides):
        settings = dict(max_corpus_mb=TINY_CORPUS_MB, cache_dir=token_cache, progress_bar=False) | overrides
        return train(out_dir, preset, steps=steps, **settings)

    return train_tiny


@pytest.fixture(scope="session")
def test_checkpoint(tmp_path_factory, train_tiny) -> Path:
    """A checkpoint dir of the `test` preset (seed-style model), trained once per session.

    Holds model.safetensors, config.json and tokenizer.json as model.load_checkpoint
    and the exporter expect. Treat it as read-only: other tests share it.
    """
    out_dir = tmp_path_factory.mktemp("test-checkpoint") / "test"
    train_tiny(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def test_llama_checkpoint(tmp_path_factory, train_tiny) -> Path:
    """The same for the `test-llama` preset (RoPE, RMSNorm, SwiGLU, grouped-query heads)."""
    out_dir = tmp_path_factory.mktemp("test-llama-checkpoint") / "test-llama"
    train_tiny(out_dir, preset="test-llama")
    return out_dir


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory, test_checkpoint) -> Path:
    """The `test` checkpoint exported to a model dir (verified at export), once per session."""
    from export.model_dir import build_model_dir

    out = tmp_path_factory.mktemp("test-model-dir") / "test"
    build_model_dir(test_checkpoint, out, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def test_fp16_model_dir(tmp_path_factory, test_checkpoint) -> Path:
    """The `test` checkpoint exported in fp16 (weights and KV cache; float32 logits), verified at export."""
    from export.model_dir import build_model_dir

    out = tmp_path_factory.mktemp("test-fp16-model-dir") / "test-fp16"
    build_model_dir(test_checkpoint, out, log=lambda *_: None, dtype="float16")
    return out


@pytest.fixture(scope="session")
def test_encoder_dir(tmp_path_factory) -> Path:
    """The `test-encoder` preset (a tiny BERT-style sentence encoder), random seeded weights, exported once."""
    from export.encoders import build_test_encoder_dir

    return build_test_encoder_dir(tmp_path_factory.mktemp("test-encoder-dir") / "test-encoder", seed=0)


@pytest.fixture(scope="session")
def test_classifier_dir(tmp_path_factory) -> Path:
    """The `vit-digits` preset trained briefly (20 steps: well above chance, far from its full accuracy), exported."""
    from export.encoders import build_test_classifier_dir

    return build_test_classifier_dir(tmp_path_factory.mktemp("test-classifier-dir") / "vit-digits", seed=0, steps=20)


# The Hugging Face libraries' offline switch, for what reads SmolLM2 and tiny references from local files:
# transformers then never asks the Hub (there is no network here, and a request would wait for a timeout).
HF_OFFLINE = {"HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hf_offline():
    """HF_HUB_OFFLINE=1 for one module's tests and the processes they start; undone when the module ends.

    huggingface_hub reads the variable once, when imported, into huggingface_hub.constants.HF_HUB_OFFLINE
    (which transformers asks at each download): that is set too, and put back afterwards.
    """
    with pytest.MonkeyPatch.context() as patch:
        try:  # imported before the variable is set, so that what is put back is the session's own setting
            constants = importlib.import_module("huggingface_hub.constants")
        except ImportError:
            constants = None
        if constants is not None:
            patch.setattr(constants, "HF_HUB_OFFLINE", True)
        for name, value in HF_OFFLINE.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def smollm2_model_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported from its GGUF and exported, through the CLI a newcomer uses."""
    import subprocess

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    # Offline: transformers converts the GGUF's tokenizer from the local file.
    result = subprocess.run([sys.executable, "-m", "export", "--preset", "smollm2-135m-instruct", "--out", str(out)],
                            capture_output=True, text=True, timeout=1200, env={**os.environ, **HF_OFFLINE})
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)
    return out
