"""Sampling: each transform on crafted logits, the draw against softmax, the batch fast path against rows."""
import numpy as np
import pytest

from server.sampling import RequestSampler, _nucleus, _top_k, sample_batch
from server.types import SamplingParams

VOCAB = 1000


def random_logits(seed: int, rows: int = 1, vocab: int = VOCAB, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * scale).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def draw_counts(params: SamplingParams, logits: np.ndarray, draws: int) -> np.ndarray:
    sampler = RequestSampler(params, vocab_size=len(logits))
    counts = np.zeros(len(logits))
    for _ in range(draws):
        counts[sampler.sample(logits)[0]] += 1
    return counts


def test_greedy_is_argmax():
    logits = random_logits(0, rows=20)
    sampler = RequestSampler(SamplingParams(temperature=0.0), VOCAB)
    for row in logits:
        assert sampler.sample(row) == (int(np.argmax(row)), None)


def test_same_seed_same_tokens_and_different_seeds_differ():
    logits = random_logits(1, rows=50, scale=1.0)

    def run(seed):
        sampler = RequestSampler(SamplingParams(temperature=1.0, seed=seed), VOCAB)
        return [sampler.sample(row)[0] for row in logits]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_missing_seed_is_drawn_and_reproduces():
    logits = random_logits(2, rows=30, scale=1.0)
    first = RequestSampler(SamplingParams(temperature=1.0), VOCAB)
    again = RequestSampler(SamplingParams(temperature=1.0, seed=first.seed), VOCAB)
    assert isinstance(first.seed, int)
    assert [first.sample(r)[0] for r in logits] == [again.sample(r)[0] for r in logits]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    logits = random_logits(3, vocab=8, scale=1.0)[0]
    draws = 40_000
    counts = draw_counts(SamplingParams(temperature=temperature, seed=11), logits, draws)
    expected = softmax(logits / temperature)
    # Pearson chi-square with 7 degrees of freedom: its 99.9th percentile is 24.3.
    chi_square = float((((counts - draws * expected) ** 2) / (draws * expected)).sum())
    assert chi_square < 24.3


def test_draws_on_a_long_row_follow_softmax():
    # Over 1024 tokens the draw goes block by block: put the mass on tokens at
    # block edges and in the short last block, and lump the rest together.
    vocab = 3000
    logits = np.full(vocab, -4.0, dtype=np.float32)
    spikes = [0, 1, 255, 256, 511, 1024, 2047, 2815, 2816, 2999]
    logits[spikes] = np.linspace(0.0, 2.0, len(spikes), dtype=np.float32)
    draws = 20_000
    counts = draw_counts(SamplingParams(temperature=1.0, seed=12), logits, draws)
    probs = softmax(logits.astype(np.float64))
    observed = np.append(counts[spikes], draws - counts[spikes].sum())
    expected = draws * np.append(probs[spikes], 1 - probs[spikes].sum())
    # Pearson chi-square with 10 degrees of freedom: its 99.9th percentile is 29.6.
    assert float(((observed - expected) ** 2 / expected).sum()) < 29.6


def test_top_k_selection_is_exact_on_both_paths():
    rng = np.random.default_rng(14)
    for k in [1, 2, 7, 50, 300]:
        for values in [
            rng.standard_normal(49152).astype(np.float32),
            np.round(rng.standard_normal(5000), 1).astype(np.float32),  # many ties
        ]:
            chosen = _top_k(values, k)
            assert len(set(chosen.tolist())) == k
            assert values[chosen].min() == np.sort(values)[-k]
    # The top values sit exactly on the strided sample, so the sampled threshold
    # lets too few through and the full partition must take over.
    values = rng.standard_normal(8000).astype(np.float32)
    values[::8] += 100
    chosen = _top_k(values, 40)
    assert values[chosen].min() == np.sort(values)[-40]


def test_top_k_never_leaves_the_top_k():
    logits = random_logits(4)[0]
    top5 = set(np.argsort(logits)[-5:].tolist())
    counts = draw_counts(SamplingParams(temperature=5.0, top_k=5, seed=3), logits, 3000)
    assert set(np.flatnonzero(counts).tolist()) == top5  # a high temperature visits all five


def test_top_k_renormalises_over_the_kept_tokens():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], dtype=np.float32)
    draws = 30_000
    counts = draw_counts(SamplingParams(temperature=1.0, top_k=3, seed=5), logits, draws)
    expected = np.zeros(5)
    expected[:3] = softmax(logits[:3])
    assert np.abs(counts / draws - expected).max() < 0.015


def test_top_p_keeps_exactly_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05 (shuffled): top_p 0.8 keeps {0.5, 0.3},
    # 0.81 must add 0.15, and 0.5 exactly keeps only the first.
    probs = np.array([0.15, 0.5, 0.05, 0.3])
    logits = np.log(probs).astype(np.float32)
    for top_p, nucleus in [(0.79, {1, 3}), (0.81, {0, 1, 3}), (0.5, {1}), (0.3, {1}), (1.0, {0, 1, 2, 3})]:
        counts = draw_counts(SamplingParams(temperature=1.0, top_p=top_p, seed=9), logits, 4000)
        assert set(np.flatnonzero(counts).tolist()) == nucleus, top_p
    draws = 30_000
    counts = draw_counts(SamplingParams(temperature=1.0, top_p=0.8, seed=10), logits, draws)
    assert abs(counts[1] / draws - 0.5 / 0.8) < 0.015  # renormalised within the nucleus


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    logits = random_logits(6, vocab=49152)[0]
    probs = softmax(logits.astype(np.float64) / 0.8)
    order = np.argsort(-probs)
    n_keep = int(np.searchsorted(np.cumsum(probs[order]), 0.9)) + 1
    nucleus = set(order[:n_keep].tolist())
    sampler = RequestSampler(SamplingParams(temperature=0.8, top_p=0.9, seed=1), 49152)
    drawn = {sampler.sample(logits)[0] for _ in range(300)}
    assert drawn <= nucleus
    assert len(drawn) > 20  # sanity: the draw spreads over the nucleus


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.0, 4.0, 8.0])  # from flat (thousands kept) to peaked (a few)
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_nucleus_equals_a_full_sort(scale, top_p):
    weights = np.exp(random_logits(15, vocab=49152, scale=scale)[0])
    weights /= weights.max()
    order = np.argsort(-weights, kind="stable")
    mass = np.cumsum(weights[order], dtype=np.float64)
    n_keep = int(np.searchsorted(mass, top_p * weights.sum(dtype=np.float64))) + 1
    kept = _nucleus(weights, top_p)
    assert len(set(kept.tolist())) == len(kept) == n_keep
    # Equal weights may swap places, so compare the weights, in order.
    np.testing.assert_array_equal(weights[kept], weights[order[:n_keep]])


def test_top_k_then_top_p():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1])).astype(np.float32)
    # top_k 3 renormalises to 4/9, 3/9, 2/9; top_p 0.7 then needs the first two (7/9).
    counts = draw_counts(SamplingParams(temperature=1.0, top_k=3, top_p=0.7, seed=2), logits, 3000)
    assert set(np.flatnonzero(counts).tolist()) == {0, 1}


def test_repetition_penalty_moves_the_argmax():
    logits = np.array([3.0, 2.0, -1.0, -0.5, 1.0], dtype=np.float32)
    # Token 0 is in the prompt: 3.0 / 2 = 1.5 < 2.0, so token 1 wins; then 1 is
    # seen as well (2.0 / 2 = 1.0) and token 0 wins again at 1.5.
    sampler = RequestSampler(SamplingParams(repetition_penalty=2.0), 5, prompt_token_ids=[0])
    assert [sampler.sample(logits)[0] for _ in range(3)] == [1, 0, 0]
    # Negative logits are multiplied: a seen -0.9 becomes -1.35 and loses to -1.0.
    negatives = np.array([-1.0, -0.9, -5.0], dtype=np.float32)
    sampler = RequestSampler(SamplingParams(repetition_penalty=1.5), 3, prompt_token_ids=[1])
    assert sampler.sample(negatives)[0] == 0
    # A penalty below 1 encourages repeats: 2.0 / 0.5 = 4.0 beats 3.0.
    sampler = RequestSampler(SamplingParams(repetition_penalty=0.5), 5, prompt_token_ids=[1])
    assert sampler.sample(logits)[0] == 1


@pytest.mark.parametrize("penalty", [1.4e-45, 1e-38, 3.4e38])
@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_extreme_repetition_penalty_still_samples_in_vocabulary(penalty, top_p):
    """Found by fuzzing the server: 1e-45 overflowed seen scores to inf, inf - inf gave NaN and an empty nucleus."""
    logits = random_logits(3)[0]
    logits[:10] = -np.abs(logits[:10])  # negative seen logits too, multiplied by a huge penalty
    everything_seen = range(VOCAB) if penalty > 1 else range(50)
    sampler = RequestSampler(SamplingParams(temperature=1.0, top_p=top_p, repetition_penalty=penalty, seed=2), VOCAB,
                             everything_seen)
    for _ in range(5):
        assert 0 <= sampler.sample(logits)[0] < VOCAB


def test_repetition_penalty_does_not_touch_the_callers_logits():
    logits = random_logits(7)[0]
    before = logits.copy()
    sampler = RequestSampler(SamplingParams(temperature=0.7, repetition_penalty=1.3, seed=1), VOCAB, range(50))
    sampler.sample(logits)
    np.testing.assert_array_equal(logits, before)


def test_logprobs_are_log_softmax_of_raw_logits_with_sorted_top_n():
    logits = random_logits(8)[0]
    expected = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    params = SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.2, seed=4)
    sampler = RequestSampler(params, VOCAB, prompt_token_ids=[3, 4], logprobs=5)
    token_id, logprob = sampler.sample(logits)
    assert logprob.token_id == token_id
    assert logprob.logprob == pytest.approx(expected[token_id], abs=1e-5)
    assert [t for t, _ in logprob.top] == np.argsort(-expected)[:5].tolist()
    values = [v for _, v in logprob.top]
    assert values == sorted(values, reverse=True)
    np.testing.assert_allclose(values, np.sort(expected)[::-1][:5], atol=1e-5)


def test_logprobs_top_n_larger_than_vocab_is_clamped():
    logits = random_logits(9, vocab=4)[0]
    _, logprob = RequestSampler(SamplingParams(), 4, logprobs=10).sample(logits)
    assert len(logprob.top) == 4
    assert sum(np.exp(v) for _, v in logprob.top) == pytest.approx(1.0, abs=1e-5)


def test_sample_batch_equals_row_by_row():
    rows = 12
    logits = random_logits(10, rows=rows)
    settings = [
        SamplingParams(),
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(temperature=1.2, top_k=40, seed=2),
    ]

    def make(i):
        return RequestSampler(settings[i % 4], VOCAB, prompt_token_ids=[i, 2 * i], logprobs=2 if i == 5 else 0)

    batched, single = [make(i) for i in range(rows)], [make(i) for i in range(rows)]
    for step in range(5):
        step_logits = logits + step
        expected = [s.sample(row) for s, row in zip(single, step_logits)]
        assert sample_batch(batched, step_logits) == expected


def test_a_rows_tokens_do_not_depend_on_its_batch():
    logits = random_logits(11, rows=4)
    params = SamplingParams(temperature=1.0, seed=123)
    alone = RequestSampler(params, VOCAB)
    in_batch = [RequestSampler(SamplingParams(temperature=1.0, seed=s), VOCAB) for s in (5, 6)]
    in_batch.insert(1, RequestSampler(params, VOCAB))
    for step in range(10):
        mine = alone.sample(logits[1] * (1 + step))[0]
        batch = sample_batch(in_batch, logits[:3] * (1 + step))
        assert batch[1][0] == mine


def test_tiny_temperature_behaves_like_greedy():
    logits = random_logits(12, rows=10)
    sampler = RequestSampler(SamplingParams(temperature=1e-300, top_p=0.5, seed=0), VOCAB)
    assert [sampler.sample(r)[0] for r in logits] == np.argmax(logits, axis=1).tolist()


@pytest.mark.parametrize(
    "params, logprobs",
    [
        (SamplingParams(temperature=-1.0), 0),
        (SamplingParams(top_k=-1), 0),
        (SamplingParams(top_p=0.0), 0),
        (SamplingParams(top_p=1.5), 0),
        (SamplingParams(repetition_penalty=0.0), 0),
        (SamplingParams(), -1),
    ],
)
def test_invalid_settings_are_rejected(params, logprobs):
    with pytest.raises(ValueError):
        RequestSampler(params, VOCAB, logprobs=logprobs)


def test_wrong_shape_and_out_of_vocab_tokens_are_rejected():
    sampler = RequestSampler(SamplingParams(repetition_penalty=1.1), VOCAB)
    with pytest.raises(ValueError):
        sampler.sample(random_logits(13, vocab=VOCAB + 1)[0])
    with pytest.raises(ValueError):
        sampler.observe(VOCAB)
