"""Training: the loss falls, checkpoints load and match, runs resume, Ctrl-C saves, bad input fails in one line."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import model.train
from model.checkpoint import load_checkpoint
from model.dataset import unigram_cross_entropy, validation_windows
from model.train import PRESET_DEFAULTS, TRAIN_STATE, TrainSettings, learning_rate, progress, train

REPO = Path(__file__).resolve().parents[2]


def run_train_cli(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "model.train", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )


def test_schedule_warms_up_then_decays_to_the_floor():
    settings = TrainSettings(preset="test", **{**PRESET_DEFAULTS["test"], "warmup_steps": 10, "lr": 1.0})
    assert learning_rate(settings, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(settings, 9, 0.0) == pytest.approx(1.0)
    assert learning_rate(settings, 500, 0.5) == pytest.approx(0.55)
    assert learning_rate(settings, 1000, 1.0) == pytest.approx(settings.min_lr_ratio)


def test_the_closer_budget_decides_progress():
    settings = TrainSettings(preset="test", **{**PRESET_DEFAULTS["test"], "max_minutes": 10.0}, steps=100)
    assert progress(settings, 50, 60.0) == pytest.approx(0.5)
    assert progress(settings, 10, 300.0) == pytest.approx(0.5)


def test_validation_windows_do_not_overlap():
    ids = np.arange(1000, dtype=np.uint16)  # token i at position i: values show positions
    x, y = validation_windows(ids, seq_len=16, max_tokens=64)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)
    assert (x[1:, 0] - x[:-1, 0] >= 16).all()


def test_unigram_baseline_of_equally_frequent_tokens_is_log_vocab():
    ids = np.arange(800, dtype=np.uint16) % 8
    assert unigram_cross_entropy(ids, torch.tensor([0, 3, 7]), vocab_size=8) == pytest.approx(math.log(8))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_tiny):
    """One short run of the `test` preset, shared by the tests that only read it."""
    return train_tiny(tmp_path_factory.mktemp("run") / "test", steps=40)


def test_loss_falls(trained):
    first_val, last_val = trained.history.val[0][2], trained.history.val[-1][2]
    assert last_val < first_val - 0.5, trained.history.val
    assert trained.final_val_loss == last_val
    assert trained.step == 40 and len(trained.history.train) == 40


def test_checkpoint_loads_and_matches_the_trained_model(trained):
    loaded, config = load_checkpoint(trained.out_dir)
    assert config == trained.config
    input_ids = torch.randint(0, config.vocab_size, (2, 17))
    with torch.no_grad():
        expected = trained.model.eval()(input_ids)
        assert torch.equal(loaded(input_ids), expected)


def test_run_dir_contents(trained):
    meta = json.loads((trained.out_dir / "config.json").read_text())
    assert meta["special_tokens"] == {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    figures = meta["training"]
    assert figures["steps"] == 40 and figures["interrupted"] is False
    assert figures["final_val_loss"] == pytest.approx(trained.final_val_loss, abs=1e-4)
    assert figures["unigram_val_loss"] == pytest.approx(trained.unigram_val_loss, abs=1e-4)
    assert (trained.out_dir / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert (trained.out_dir / TRAIN_STATE).is_file()


def test_resume_matches_an_uninterrupted_run(tmp_path, train_tiny, monkeypatch):
    """30 steps straight give the same weights as a run stopped by SIGINT after step 21 and resumed:
    the optimizer, the data order and the learning-rate schedule all continue where they stopped."""
    straight = train_tiny(tmp_path / "straight", steps=30)

    batches = 0
    real_sample_batch = model.train.sample_batch

    def sample_batch_then_interrupt(*args):
        nonlocal batches
        batches += 1
        if batches == 21:
            signal.raise_signal(signal.SIGINT)  # handled like Ctrl-C: this step finishes, then the run saves
        return real_sample_batch(*args)

    monkeypatch.setattr(model.train, "sample_batch", sample_batch_then_interrupt)
    stopped = train_tiny(tmp_path / "split", steps=30)
    assert stopped.interrupted and stopped.step == 21
    monkeypatch.setattr(model.train, "sample_batch", real_sample_batch)

    resumed = train(tmp_path / "split", resume=True, progress_bar=False)
    assert not resumed.interrupted and resumed.step == 30
    assert [step for step, _, _ in resumed.history.train] == list(range(1, 31))
    assert resumed.tokens_seen == straight.tokens_seen
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.timeout(180)
def test_sigint_saves_a_loadable_checkpoint(tmp_path, token_cache, tiny_corpus_mb):
    out_dir = tmp_path / "run"
    process = run_train_cli(
        "--preset", "test", "--out", str(out_dir), "--steps", "1000000", "--eval-every", "5",
        "--max-corpus-mb", str(tiny_corpus_mb), "--cache-dir", str(token_cache), "--no-progress",
    )
    try:
        for line in process.stdout:
            if line.startswith("step 5:"):  # training is under way
                break
        else:
            pytest.fail(f"training never reached step 5: {process.stderr.read()}")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "interrupted at step" in stdout
    load_checkpoint(out_dir)
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["training"]["interrupted"] is True and 5 <= meta["training"]["steps"] < 1000000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["--preset", "test", "--corpus", "/no/such/corpus"], "corpus path /no/such/corpus does not exist"),
        (["--preset", "test", "--resume"], "cannot resume"),
    ],
)
def test_bad_input_fails_with_one_line(tmp_path, args, message):
    process = run_train_cli("--out", str(tmp_path / "run"), *args)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    assert stderr.strip().count("\n") == 0 and stderr.startswith("error: "), stderr
    assert message in stderr
    assert not (tmp_path / "run").exists()
