"""bench.quality's pure parts: greedy agreement, matching prefixes, perplexity, windows, unpacking."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench import quality


def test_matching_prefix_stops_at_the_first_difference():
    assert quality.matching_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert quality.matching_prefix([1, 2], [1, 2]) == 2
    assert quality.matching_prefix([5], [6]) == 0


def test_agreement_counts_identical_prompts_and_the_mean_prefix():
    reference = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]]
    other = [[1, 2, 3], [4, 0, 6], [0, 8, 9], [1, 1, 1]]
    result = quality.agreement(reference, other)
    assert (result["prompts"], result["identical"]) == (4, 2)
    assert result["identical_share"] == 0.5
    assert result["mean_matching_prefix"] == (3 + 1 + 0 + 3) / 4


def test_agreement_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError):
        quality.agreement([[1]], [[1], [2]])


def test_token_nll_is_the_cross_entropy_of_the_softmax():
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -1.0, 1000.0]], np.float32)
    nll = quality.token_nll(logits, np.array([1, 3]))
    assert nll[0] == pytest.approx(math.log(4))
    # Large logits must not overflow: the target holds all the mass.
    assert nll[1] == pytest.approx(0.0, abs=1e-12)


def test_perplexity_is_exp_of_the_mean_nats():
    result = quality.perplexity([math.log(2), math.log(8)])
    assert result["nats_per_token"] == pytest.approx(math.log(4))
    assert result["perplexity"] == pytest.approx(4.0)
    assert quality.relative_change(1.02, 1.0) == pytest.approx(0.02)


def test_windows_take_each_documents_first_window_before_any_second():
    documents = [list(range(10)), list(range(100, 104)), list(range(200, 206))]
    assert quality.windows(documents, 3, 4) == [[0, 1, 2], [100, 101, 102], [200, 201, 202], [3, 4, 5]]
    assert quality.windows(documents, 20, 4) == []


@pytest.mark.parametrize("bits", [4, 8])
def test_unpack_codes_inverts_the_export_packing(bits):
    from export.quantize import BLOCK, pack_codes

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2 ** bits, (3, 2 * BLOCK)).astype(np.uint8)
    packed = pack_codes(codes.reshape(3, 2, BLOCK), bits)
    np.testing.assert_array_equal(quality.unpack_codes(packed, bits, 2 * BLOCK), codes)
