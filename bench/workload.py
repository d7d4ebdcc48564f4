"""Fixed, seeded request mixes: every system in a run gets the very same requests.

Prompts are token ids (sent as `prompt_token_ids`), so no system's tokenizer
or chat template changes a length; outputs have a fixed length each
(`ignore_eos`, or the peer's own way to keep generating past end-of-sequence).

    chat   prompt ~ lognormal, median 128 tokens, in [16, 512];
           output ~ lognormal, median 96 tokens, in [16, 256]
    long   the chat mix, where one request in four instead has a prompt of
           1024 to 1536 tokens (uniform): long prefills arriving among streams
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIXES = ("chat", "long")
CHAT_PROMPT_MEDIAN, CHAT_PROMPT_RANGE = 128, (16, 512)
CHAT_OUTPUT_MEDIAN, CHAT_OUTPUT_RANGE = 96, (16, 256)
LONG_PROMPT_RANGE = (1024, 1536)
LONG_FRACTION = 0.25


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int

    @property
    def total_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.max_new_tokens


@dataclass(frozen=True)
class LengthScale:
    """Shrinks every length (bench-quick, tests): lengths are multiplied by `factor`, at least 1 token."""

    factor: float = 1.0

    def __call__(self, n: int) -> int:
        return max(1, int(round(n * self.factor)))


def _lognormal_lengths(rng: np.random.Generator, n: int, median: int, bounds: tuple[int, int], sigma: float) -> np.ndarray:
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), *bounds).astype(int)


def make_requests(mix: str, count: int, seed: int, token_range: tuple[int, int],
                  scale: LengthScale = LengthScale()) -> list[BenchRequest]:
    """`count` requests of `mix`; the same (mix, count, seed, token_range, scale) always gives the same list.

    Prompt tokens are drawn uniformly from token_range = [low, high): ordinary vocabulary entries,
    no special tokens, so they mean nothing but cost what real text costs.
    """
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; choose one of {', '.join(MIXES)}")
    rng = np.random.default_rng([seed, MIXES.index(mix)])
    prompt_lens = _lognormal_lengths(rng, count, CHAT_PROMPT_MEDIAN, CHAT_PROMPT_RANGE, sigma=0.6)
    output_lens = _lognormal_lengths(rng, count, CHAT_OUTPUT_MEDIAN, CHAT_OUTPUT_RANGE, sigma=0.5)
    if mix == "long":
        long_rows = rng.random(count) < LONG_FRACTION
        prompt_lens = np.where(long_rows, rng.integers(LONG_PROMPT_RANGE[0], LONG_PROMPT_RANGE[1] + 1, count), prompt_lens)
    requests = []
    for i, (p, o) in enumerate(zip(prompt_lens, output_lens)):
        tokens = rng.integers(token_range[0], token_range[1], scale(int(p)))
        requests.append(BenchRequest(i, tuple(int(t) for t in tokens), scale(int(o))))
    return requests


def max_total_tokens(scale: LengthScale = LengthScale()) -> int:
    """Longest prompt + output any mix can produce: the KV capacity every system is given."""
    return scale(max(CHAT_PROMPT_RANGE[1], LONG_PROMPT_RANGE[1])) + scale(CHAT_OUTPUT_RANGE[1])


def poisson_arrivals(count: int, rate: float, seed: int) -> np.ndarray:
    """Arrival offsets (seconds from the start) of `count` requests at `rate` per second."""
    if rate <= 0:
        raise ValueError(f"a Poisson rate must be positive, got {rate}")
    rng = np.random.default_rng([seed, 1000])
    return np.cumsum(rng.exponential(1.0 / rate, count))
