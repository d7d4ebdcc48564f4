"""The corpus as token ids, and what training reads from them: random batches, fixed validation windows, the unigram baseline."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from model.corpus import read_documents, split_documents
from model.tokenizer import cached_token_arrays, train_tokenizer


class DatasetError(Exception):
    """Too little text to train or validate on; the message says so."""


@dataclass
class Dataset:
    train_ids: np.ndarray  # the train split, documents joined by <|endoftext|>
    val_x: torch.Tensor  # (N, T) validation inputs, fixed for the whole run
    val_y: torch.Tensor  # (N, T) their next tokens
    unigram_val_loss: float  # nats/token of train-split token frequencies on val_y
    description: str


def build_dataset(
    corpus: Optional[Sequence[str]], max_bytes: int, vocab_size: int, seq_len: int, eval_tokens: int,
    cache_dir: Path, tokenizer: Optional[Tokenizer] = None,
) -> tuple[Tokenizer, Dataset]:
    """Read and split the corpus, train a tokenizer on the train side (unless one is given), tokenize (cached)."""
    documents = read_documents(corpus, max_bytes=max_bytes)
    train_docs, val_docs = split_documents(documents)
    if tokenizer is None:
        tokenizer = train_tokenizer(train_docs, vocab_size)
    train_ids, val_ids = cached_token_arrays(cache_dir, tokenizer, train_docs, val_docs)
    if len(train_ids) <= seq_len + 1:
        raise DatasetError(f"the corpus has {len(train_ids)} training tokens, fewer than one sequence of {seq_len + 1}; give more text")
    val_x, val_y = validation_windows(val_ids, seq_len, eval_tokens)
    description = (
        f"{len(train_docs)} train / {len(val_docs)} validation documents, "
        f"{sum(len(d.text) for d in documents) / 1e6:.1f} M characters, {len(train_ids):,} train tokens"
    )
    unigram = unigram_cross_entropy(train_ids, val_y, tokenizer.get_vocab_size())
    return tokenizer, Dataset(train_ids, val_x, val_y, unigram, description)


def sample_batch(ids: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int):
    """Random windows of the training tokens: x (B, T) and y, x shifted by one token (B, T)."""
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
    windows = torch.from_numpy(ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def validation_windows(ids: np.ndarray, seq_len: int, max_tokens: int):
    """Non-overlapping windows spread evenly over the validation tokens: x (N, T), y (N, T)."""
    if len(ids) < 2:
        raise DatasetError("the validation split has no token to predict; give a larger corpus")
    seq_len = min(seq_len, len(ids) - 1)
    n_available = (len(ids) - 1) // seq_len
    n_windows = max(1, min(n_available, max_tokens // seq_len))
    starts = np.linspace(0, n_available - 1, n_windows).round().astype(np.int64) * seq_len
    windows = torch.from_numpy(ids[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))  # (N, T+1)
    return windows[:, :-1], windows[:, 1:]


def unigram_cross_entropy(train_ids: np.ndarray, targets: torch.Tensor, vocab_size: int) -> float:
    """The baseline a model must beat: train-split token frequencies (add-one smoothed) scored on the targets, in nats/token."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[targets.flatten().numpy()].mean())
