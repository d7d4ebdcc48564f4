"""The dynamic-batching policy of encoders and image classifiers (server/batching.py): fake inputs, a fake clock."""
from __future__ import annotations

import numpy as np
import pytest

from server.batching import MAX_PADDING, BatchLimits, BatchPolicy, length_groups

WINDOW = 0.002


def policy(max_batch: int = 4, max_batch_tokens: int = 100, window: float = WINDOW) -> BatchPolicy:
    return BatchPolicy(BatchLimits(window_seconds=window, max_batch=max_batch, max_batch_tokens=max_batch_tokens))


def add_all(batcher: BatchPolicy, tokens: list[int], now: float = 0.0) -> None:
    for i, n in enumerate(tokens):
        batcher.add(f"input-{i}", n, now)


def test_nothing_pending_means_no_batch_and_waiting_for_an_add():
    batcher = policy()
    assert batcher.next_batch(1.0) is None
    assert batcher.wait_seconds(1.0) is None


def test_a_lone_input_waits_for_the_window_then_runs_alone():
    batcher = policy()
    batcher.add("a", 5, now=10.0)
    assert batcher.next_batch(10.0 + WINDOW / 2) is None
    assert batcher.wait_seconds(10.0 + WINDOW / 2) == pytest.approx(WINDOW / 2)
    assert batcher.wait_seconds(10.0 + WINDOW) == 0.0
    batch = batcher.next_batch(10.0 + WINDOW)
    assert batch.items == ("a",) and batch.longest == 5 and batch.padded_tokens == 5
    assert len(batcher) == 0 and batcher.wait_seconds(11.0) is None


def test_inputs_arriving_within_the_window_share_a_run():
    batcher = policy()
    batcher.add("a", 3, now=0.0)
    batcher.add("b", 7, now=WINDOW / 2)
    assert batcher.next_batch(WINDOW * 0.9) is None
    batch = batcher.next_batch(WINDOW)
    assert batch.items == ("a", "b") and batch.longest == 7 and batch.padded_tokens == 14


def test_the_window_counts_from_the_oldest_input_not_the_newest():
    batcher = policy()
    batcher.add("a", 1, now=0.0)
    batcher.add("b", 1, now=WINDOW * 0.99)
    assert batcher.wait_seconds(WINDOW * 0.99) == pytest.approx(WINDOW * 0.01)
    assert batcher.next_batch(WINDOW).items == ("a", "b")


def test_max_batch_inputs_run_at_once_and_the_rest_wait_in_order():
    batcher = policy(max_batch=4)
    add_all(batcher, [1] * 6)
    assert batcher.wait_seconds(0.0) == 0.0
    first = batcher.next_batch(0.0)
    assert first.items == ("input-0", "input-1", "input-2", "input-3")
    assert batcher.next_batch(0.0) is None  # two left: not full, their window is still open
    assert batcher.next_batch(WINDOW).items == ("input-4", "input-5")


def test_padded_tokens_end_a_batch_before_max_batch():
    # 30, 30, 30 pad to 90 <= 100; a fourth of 30 would pad to 120.
    batcher = policy(max_batch=8, max_batch_tokens=100)
    add_all(batcher, [30, 30, 30, 30])
    batch = batcher.next_batch(0.0)
    assert batch.items == ("input-0", "input-1", "input-2") and batch.padded_tokens == 90


def test_a_long_input_pads_every_row_so_it_counts_once_per_row():
    # 10 then 40: two rows of 40 = 80 fit; a third row would make 120.
    batcher = policy(max_batch=8, max_batch_tokens=100)
    add_all(batcher, [10, 40, 10])
    batch = batcher.next_batch(0.0)
    assert batch.items == ("input-0", "input-1") and batch.longest == 40 and batch.padded_tokens == 80


def test_inputs_never_overtake_one_that_does_not_fit():
    # The 60-token input does not fit beside the 50 (2 x 60 > 100); the 1-token one behind it would (2 x 50), but waits.
    batcher = policy(max_batch=8, max_batch_tokens=100)
    add_all(batcher, [50, 60, 1])
    assert batcher.next_batch(0.0).items == ("input-0",)
    assert batcher.next_batch(0.0).items == ("input-1",)  # 60 beside 1 pads to 120: 60 runs alone, at once
    assert batcher.next_batch(0.0) is None
    assert batcher.next_batch(WINDOW).items == ("input-2",)


def test_an_input_longer_than_max_batch_tokens_runs_alone_at_once():
    batcher = policy(max_batch=8, max_batch_tokens=100)
    batcher.add("long", 500, now=0.0)
    assert batcher.wait_seconds(0.0) == 0.0  # no other input could ever join it
    batch = batcher.next_batch(0.0)
    assert batch.items == ("long",) and batch.padded_tokens == 500


def test_a_batch_that_no_input_could_join_runs_without_waiting_for_the_window():
    # 2 x 50 = 100: a third input of any length would pass 100.
    batcher = policy(max_batch=8, max_batch_tokens=100)
    add_all(batcher, [50, 50])
    assert batcher.next_batch(0.0).items == ("input-0", "input-1")


def test_a_zero_window_runs_every_input_as_soon_as_it_is_asked():
    batcher = policy(window=0.0)
    batcher.add("a", 1, now=5.0)
    assert batcher.wait_seconds(5.0) == 0.0
    assert batcher.next_batch(5.0).items == ("a",)


def test_images_count_one_token_each():
    batcher = policy(max_batch=3, max_batch_tokens=100)
    add_all(batcher, [0, 0, 0, 0])
    batch = batcher.next_batch(0.0)
    assert len(batch.items) == 3 and batch.padded_tokens == 3


@pytest.mark.parametrize("limits", [dict(window_seconds=-1.0, max_batch=1, max_batch_tokens=1),
                                    dict(window_seconds=0.0, max_batch=0, max_batch_tokens=1),
                                    dict(window_seconds=0.0, max_batch=1, max_batch_tokens=0)])
def test_limits_out_of_range_are_refused(limits):
    with pytest.raises(ValueError):
        BatchLimits(**limits)


# ---- length_groups: runs of similar length inside a batch ------------------------------------------


def padded_over_real(tokens, group) -> float:
    return len(group) * max(tokens[i] for i in group) / sum(tokens[i] for i in group)


@pytest.mark.parametrize("seed", range(5))
def test_length_groups_cover_every_input_once_within_the_padding_bound(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 300, size=int(rng.integers(1, 64))).tolist()
    groups = length_groups(tokens)
    assert sorted(i for g in groups for i in g) == list(range(len(tokens)))
    assert all(padded_over_real(tokens, g) <= MAX_PADDING for g in groups)
    # Greedy from the shortest: joining the next group's first input would have broken the bound.
    for group, after in zip(groups, groups[1:]):
        assert padded_over_real(tokens, group + after[:1]) > MAX_PADDING


def test_length_groups_keep_equal_lengths_in_one_run_and_split_a_long_tail():
    assert length_groups([64] * 10) == [list(range(10))]  # images: one run
    tokens = [10, 11, 12, 100]
    assert length_groups(tokens) == [[0, 1, 2], [3]]  # padding the three short texts to 100 would be 3.3x
    assert length_groups([]) == []
