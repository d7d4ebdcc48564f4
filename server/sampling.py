"""Per-request token sampling in NumPy.

Every request owns a RequestSampler with its own seeded generator, and each
step draws exactly one uniform number per sampled (non-greedy) token, so a
request's tokens depend only on its own logits and seed, never on which other
requests share the batch. The order of the transforms follows Hugging Face:

    raw logits ─┬─► repetition penalty ─► temperature ─► top-k ─► top-p ─► draw
                │                       (temperature 0: argmax after the penalty)
                └─► log_softmax ─► reported logprobs (chosen token + top-n)
"""
from __future__ import annotations

import secrets
from typing import Optional, Sequence

import numpy as np

from server.types import SamplingParams, TokenLogprob

SampleResult = tuple[int, Optional[TokenLogprob]]
_DRAW_BLOCK = 256  # tokens per block in the two-level draw
_NUCLEUS_GUESS = 256  # heaviest tokens tried first as top-p candidates, growing 4x per try
_FLOAT32_MAX = np.finfo(np.float32).max


class RequestSampler:
    """Turns one request's logits rows into tokens, one step at a time.

    `seed` is the seed actually used: params.seed, or a random one drawn here
    when params.seed is None (report it so a result can be reproduced).
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        prompt_token_ids: Sequence[int] = (),
        logprobs: int = 0,
    ) -> None:
        _validate(params, vocab_size, logprobs)
        self.params = params
        self.vocab_size = vocab_size
        self.logprobs = min(logprobs, vocab_size)
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._rng = np.random.default_rng(self.seed)
        self._penalized = params.repetition_penalty != 1.0
        # Tokens seen so far (prompt + output), kept only when a penalty needs
        # them. Invariant: _seen_ids[:_n_seen] are exactly the ids set in
        # _seen_mask, each once, so penalising costs O(distinct tokens), not O(V).
        self._seen_mask = np.zeros(vocab_size, dtype=bool) if self._penalized else None
        self._seen_ids = np.empty(64, dtype=np.int64)
        self._n_seen = 0
        for token_id in prompt_token_ids:
            self.observe(token_id)

    @property
    def plain_greedy(self) -> bool:
        """The token is the argmax of the raw logits and nothing else is computed."""
        return self.params.greedy and not self._penalized and self.logprobs == 0

    def observe(self, token_id: int) -> None:
        """Record a token as seen for the repetition penalty. Idempotent; sample() calls it itself."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        if self._seen_mask is None or self._seen_mask[token_id]:
            return
        self._seen_mask[token_id] = True
        if self._n_seen == len(self._seen_ids):
            self._seen_ids = np.resize(self._seen_ids, 2 * len(self._seen_ids))
        self._seen_ids[self._n_seen] = token_id
        self._n_seen += 1

    def sample(self, logits: np.ndarray) -> SampleResult:
        """Choose the next token from one row of raw logits [V] and record it as seen.

        Logprobs, when asked for, are log_softmax of the model's raw logits:
        the model's own distribution, before the repetition penalty,
        temperature and truncation reshape it for the draw (the OpenAI and
        vLLM default). So they do not depend on the sampling settings, and a
        chosen token outside the reported top-n is still scored.
        """
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"expected logits of shape ({self.vocab_size},), got {logits.shape}")
        token_id = self._choose(logits)
        self.observe(token_id)
        return token_id, (self._logprob(logits, token_id) if self.logprobs else None)

    def _choose(self, logits: np.ndarray) -> int:
        scores = self._penalize(logits)
        p = self.params
        if p.greedy:
            return int(np.argmax(scores))
        # Unnormalised probabilities in [0, 1] with the best token at 1;
        # normalisation is left to the draw, which divides by the running sum.
        # The max is subtracted before scaling and 1/T is capped, so even a
        # tiny temperature gives 0 * finite = 0 for the best token, never NaN.
        weights = scores - scores.max()
        weights *= np.float32(min(1.0 / p.temperature, 1e30))
        np.exp(weights, out=weights)
        candidates: Optional[np.ndarray] = None  # None: every token is a candidate
        if 0 < p.top_k < self.vocab_size:
            candidates = _top_k(weights, p.top_k)
            weights = weights[candidates]
        if p.top_p < 1.0:
            keep = _nucleus(weights, p.top_p)
            candidates = keep if candidates is None else candidates[keep]
            weights = weights[keep]
        index = _draw(weights, self._rng.random())
        return index if candidates is None else int(candidates[index])

    def _penalize(self, logits: np.ndarray) -> np.ndarray:
        """HF repetition penalty: a seen token's logit is divided by the penalty if positive, else multiplied."""
        if not self._penalized or self._n_seen == 0:
            return logits
        seen = self._seen_ids[: self._n_seen]
        penalty = np.float32(self.params.repetition_penalty)
        scores = logits.copy()  # never write into the caller's (onnxruntime's) buffer
        values = scores[seen]
        # An extreme penalty (1e-45, 1e38) overflows float32 to inf, and inf - inf in the draw is NaN:
        # keep penalised scores finite, which keeps their order.
        with np.errstate(over="ignore"):
            penalized = np.where(values > 0, values / penalty, values * penalty)
        scores[seen] = np.clip(penalized, -_FLOAT32_MAX, _FLOAT32_MAX)
        return scores

    def _logprob(self, logits: np.ndarray, token_id: int) -> TokenLogprob:
        shifted = logits - logits.max()
        log_total = float(np.log(np.exp(shifted).sum(dtype=np.float64)))
        n = self.logprobs
        top = _top_k(shifted, n)
        top = top[np.argsort(-shifted[top], kind="stable")]
        return TokenLogprob(
            token_id=token_id,
            logprob=float(shifted[token_id]) - log_total,
            top=tuple((int(t), float(shifted[t]) - log_total) for t in top),
        )


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, unordered; ties at the k-th value are broken arbitrarily.

    np.argpartition over 49152 values costs about 0.4 ms. The ceil(k/2)-th
    largest of every 8th value is a threshold that about 4k values pass, and
    only those are partitioned. Whenever at least k pass, the k-th largest
    value is >= the threshold, so the top k are all among them; when fewer
    pass (rare), partition everything.
    """
    if 8 * k <= len(values):
        rank = -(-k // 2)
        threshold = np.partition(values[::8], -rank)[-rank]
        above = np.flatnonzero(values >= threshold)
        if len(above) >= k:
            return above[np.argpartition(values[above], -k)[-k:]]
    return np.argpartition(values, -k)[-k:]


def _draw(weights: np.ndarray, u: float) -> int:
    """Index i with probability weights[i] / weights.sum(), by inverting the CDF at u in [0, 1).

    A cumulative sum over 49152 floats is sequential and costs about 0.4 ms,
    so a long row is cut into blocks: find the block from the block sums,
    then the token inside that block.
    """
    if len(weights) <= 4 * _DRAW_BLOCK:
        cdf = np.cumsum(weights, dtype=np.float64)
        return _invert(cdf, u * cdf[-1])
    starts = np.arange(0, len(weights), _DRAW_BLOCK)
    block_cdf = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    target = u * block_cdf[-1]
    block = _invert(block_cdf, target)
    mass_before = block_cdf[block - 1] if block else 0.0
    start = int(starts[block])
    cdf = np.cumsum(weights[start : start + _DRAW_BLOCK], dtype=np.float64)
    return start + _invert(cdf, target - mass_before)


def _invert(cdf: np.ndarray, target: float) -> int:
    """First index whose cumulative weight exceeds target: a zero-weight entry owns an empty interval."""
    index = int(np.searchsorted(cdf, target, side="right"))
    if index == len(cdf):  # rounding carried target to the total: take the last entry with weight
        index = int(np.searchsorted(cdf, cdf[-1], side="left"))
    return index


def _nucleus(weights: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of largest weights holding at least top_p of the mass, largest first.

    No full sort. Any set made of the heaviest tokens that holds top_p of
    the mass contains the nucleus, and two such sets are cheap to find:
    - tokens at least floor = (1 - top_p) * total / n: the lighter ones hold
      less than (1 - top_p) of the mass between them. For SmolLM2 at
      temperature 0.8 that is a few hundred of 49152, at 1.0 a few thousand;
    - the heaviest 256 tokens, or else 1024, 4096, ..., the first whose mass
      is checked to reach top_p: most nuclei are far smaller (median 8
      tokens at temperature 1.0), and partitioning is cheaper than sorting.
    Only the smallest set found is sorted.
    """
    total = float(weights.sum(dtype=np.float64))
    floor = (1.0 - top_p) * total / len(weights)
    heavy = np.flatnonzero(weights >= floor)  # never empty: the max weight is >= total / n
    guess_size = _NUCLEUS_GUESS
    while 2 * guess_size <= len(heavy):
        guess = heavy[_top_k(weights[heavy], guess_size)]
        if weights[guess].sum(dtype=np.float64) >= top_p * total:
            heavy = guess
            break
        guess_size *= 4
    heavy = heavy[np.argsort(-weights[heavy])]
    mass = np.cumsum(weights[heavy], dtype=np.float64)
    n_keep = int(np.searchsorted(mass, top_p * total, side="left")) + 1
    return heavy[: min(n_keep, len(heavy))]  # at least one token; rounding can leave mass[-1] a hair short


def sample_batch(samplers: Sequence[RequestSampler], logits: np.ndarray) -> list[SampleResult]:
    """Sample row i of logits [B, V] with samplers[i].

    Plain greedy rows take their token from one vectorised argmax; the rest
    go through their own sampler. The result equals calling sample() row by
    row: a plain greedy sampler keeps no state, so skipping its sample()
    loses nothing.
    """
    if logits.ndim != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"expected logits [{len(samplers)}, V], got {logits.shape}")
    # The argmax covers every row: gathering the greedy rows first would copy
    # them (12 MB for 64 x 49152), while a wasted argmax costs a sampled row
    # a few microseconds on top of its own ~100.
    argmax = np.argmax(logits, axis=1).tolist() if any(s.plain_greedy for s in samplers) else []
    return [
        (argmax[row], None) if sampler.plain_greedy else sampler.sample(logits[row])
        for row, sampler in enumerate(samplers)
    ]


def _validate(params: SamplingParams, vocab_size: int, logprobs: int) -> None:
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if not params.temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {params.top_k}")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if not params.repetition_penalty > 0.0:
        raise ValueError(f"repetition_penalty must be > 0, got {params.repetition_penalty}")
    if logprobs < 0:
        raise ValueError(f"logprobs must be >= 0, got {logprobs}")
