"""The scheduler and slot manager are pure: tested with fake sampled tokens, no onnxruntime."""
import random

import pytest

from server.scheduler import Chunk, Scheduler, SchedulerStats, Sequence, StepPlan, split_into_calls, uniform_calls
from server.slots import SlotManager


def make(slots=4, budget=8, capacity=64):
    return Scheduler(SlotManager(slots, capacity), budget)


def seq(seq_id, prompt_len):
    return Sequence(seq_id, list(range(100, 100 + prompt_len)), prompt_len)


def run_step(scheduler, next_token=7):
    plan = scheduler.schedule()
    sampled = {c.seq.seq_id: next_token for c in plan.chunks if c.samples}
    scheduler.update(plan, sampled)
    return plan


def test_prompt_is_chunked_under_budget_then_decodes():
    s = make(budget=8)
    a = seq(0, 20)
    s.add(a)
    lengths = [run_step(s).chunks[0].length for _ in range(4)]
    assert lengths == [8, 8, 4, 1]  # three prefill chunks (the last one samples), then a decode step
    assert a.num_computed == 21 and len(a.token_ids) == 22


def test_decode_rows_are_never_starved_by_a_long_prompt():
    s = make(budget=4)
    a = seq(0, 2)
    s.add(a)
    run_step(s)  # a prefills and samples its first token
    s.add(seq(1, 50))
    for _ in range(10):
        plan = run_step(s)
        decode = [c for c in plan.chunks if c.seq is a]
        assert decode and decode[0].length == 1
        assert plan.num_prefill_tokens <= 4


def test_waiting_requests_join_when_a_slot_frees():
    s = make(slots=2, budget=100)
    seqs = [seq(i, 3) for i in range(3)]
    for x in seqs:
        s.add(x)
    plan = run_step(s)
    assert {c.seq.seq_id for c in plan.chunks} == {0, 1}
    assert seqs[2].slot is None and len(s.waiting) == 1
    s.remove(seqs[0])
    plan = run_step(s)
    assert seqs[2].slot == 0  # the lowest free slot is reused
    assert {c.seq.seq_id for c in plan.chunks} == {1, 2}


def test_remove_frees_slot_for_waiting_and_running():
    s = make(slots=1)
    a, b = seq(0, 3), seq(1, 3)
    s.add(a)
    s.add(b)
    run_step(s)
    s.remove(b)  # waiting
    s.remove(a)  # running
    assert s.slots.free == 1 and not s.has_work


def test_rows_cover_highest_scheduled_slot():
    s = make(slots=4, budget=100)
    seqs = [seq(i, 2) for i in range(3)]
    for x in seqs:
        s.add(x)
    run_step(s)
    s.remove(seqs[0])
    plan = run_step(s)
    assert plan.rows == 3


def test_paused_sequence_keeps_its_slot_but_is_not_decoded():
    s = make(slots=4, budget=100)
    seqs = [seq(i, 2) for i in range(3)]
    for x in seqs:
        s.add(x)
    run_step(s)
    s.set_paused({seqs[2].seq_id})
    plan = run_step(s)
    assert [c.seq for c in plan.chunks] == seqs[:2]
    assert plan.rows == 2 and seqs[2].slot == 2 and s.stats().slots_in_use == 3
    s.set_paused(())
    assert [c.seq for c in run_step(s).chunks] == seqs


def test_a_plan_reads_the_same_after_update():
    s = make(slots=4, budget=8)
    prompt, decoding = seq(0, 6), seq(1, 2)
    s.add(decoding)
    run_step(s)  # `decoding` prefills and samples its first token
    s.add(prompt)
    plan = s.schedule()
    before = [(c.seq.seq_id, c.start, c.length, c.samples, c.prefill) for c in plan.chunks]
    assert before == [(1, 2, 1, True, False), (0, 0, 6, True, True)]
    assert plan.num_prefill_tokens == 6
    s.update(plan, {0: 7, 1: 7})
    assert [(c.seq.seq_id, c.start, c.length, c.samples, c.prefill) for c in plan.chunks] == before
    assert plan.num_prefill_tokens == 6


def test_stats_count_running_waiting_slots_and_cached_tokens():
    s = make(slots=2, budget=100)
    for i, length in enumerate((3, 5, 4)):
        s.add(seq(i, length))
    assert s.stats() == SchedulerStats(running=0, waiting=3, slots_in_use=0, tokens_in_use=0)
    run_step(s)
    assert s.stats() == SchedulerStats(running=2, waiting=1, slots_in_use=2, tokens_in_use=3 + 5)


def test_random_workload_invariants():
    rng = random.Random(1234)
    s = make(slots=3, budget=6)
    live = {}
    next_id = 0
    for _ in range(300):
        if rng.random() < 0.3:
            x = seq(next_id, rng.randint(1, 20))
            live[next_id] = x
            s.add(x)
            next_id += 1
        plan = run_step(s)
        slots = [c.slot for c in plan.chunks]
        assert len(slots) == len(set(slots))  # one chunk per slot
        assert plan.num_prefill_tokens <= 6
        for c in plan.chunks:
            assert c.start + c.length <= len(c.seq.token_ids)
        for x in list(live.values()):
            if x.num_generated >= 3 or (x.slot is not None and rng.random() < 0.05):
                s.remove(x)
                del live[x.seq_id]
        assert s.slots.in_use == len(s.running) <= 3
    for x in list(live.values()):
        s.remove(x)
    assert s.slots.free == 3


def _chunk(slot, length, prompt_len=100):
    x = Sequence(slot, list(range(prompt_len + 1)), prompt_len, slot=slot, num_computed=prompt_len + 1 - length)
    return Chunk.next_of(x, length)


def test_split_into_calls_keeps_cheap_mixes_together():
    plan = StepPlan((_chunk(0, 1), _chunk(1, 1), _chunk(2, 3)), rows=3)
    calls = split_into_calls(plan, call_overhead_tokens=32)
    assert len(calls) == 1 and calls[0].rows == 3 and calls[0].width == 3


def test_split_into_calls_separates_long_prefill_from_many_decode_rows():
    plan = StepPlan(tuple(_chunk(i, 1) for i in range(16)) + (_chunk(16, 256),), rows=17)
    calls = split_into_calls(plan, call_overhead_tokens=32)
    assert [(c.first_slot, c.rows, c.width) for c in calls] == [(0, 16, 1), (16, 1, 256)]


@pytest.mark.parametrize("budget", [0, -1])
def test_budget_must_be_positive(budget):
    with pytest.raises(ValueError):
        make(budget=budget)


def test_prefill_budget_scales_with_decoding_rows_while_streams_decode():
    s = Scheduler(SlotManager(64, 2048), 256, prefill_tokens_per_decode_row=8)
    assert s.prefill_budget(decode_rows=0) == 256  # nothing to stall: the whole budget
    assert s.prefill_budget(decode_rows=1) == 32  # the floor
    assert s.prefill_budget(decode_rows=12) == 96
    assert s.prefill_budget(decode_rows=48) == 256  # capped by prefill_chunk_tokens
    fixed = Scheduler(SlotManager(64, 2048), 256, prefill_tokens_per_decode_row=0)
    assert fixed.prefill_budget(decode_rows=12) == 256


def test_a_long_prompt_beside_decoding_streams_gets_the_scaled_budget():
    s = Scheduler(SlotManager(8, 4096), 256, prefill_tokens_per_decode_row=8)
    streams = [seq(i, 4) for i in range(5)]
    for stream in streams:
        s.add(stream)
    run_step(s)  # all five prefill at once (nothing was decoding) and sample
    s.add(seq(9, 1000))
    plan = run_step(s)
    decode = [c for c in plan.chunks if c.length == 1]
    prefill = [c for c in plan.chunks if c.length > 1]
    assert len(decode) == 5 and [c.length for c in prefill] == [40]  # 8 x 5 decoding rows
    assert plan.num_prefill_tokens == 40


def test_uniform_calls_give_every_row_a_chunk_of_the_call_width():
    plan = StepPlan((_chunk(0, 1), _chunk(1, 1), _chunk(3, 1), _chunk(4, 40), _chunk(5, 1)), rows=6)
    calls = split_into_calls(plan, call_overhead_tokens=32, uniform=True)
    assert [(c.first_slot, c.rows, c.width) for c in calls] == [(0, 2, 1), (3, 1, 1), (5, 1, 1), (4, 1, 40)]


def test_uniform_calls_never_touch_a_slot_without_a_chunk_on_random_workloads():
    """The invariant the op without query_seqlens needs: each call's rows are exactly its chunks' slots, every
    chunk as wide as the call, and each chunk computed in exactly one call."""
    rng = random.Random(4321)
    s = Scheduler(SlotManager(6, 256), 24, prefill_tokens_per_decode_row=4)
    next_id = 0
    for step in range(400):
        if rng.random() < 0.4:
            s.add(seq(next_id, rng.randint(1, 60)))
            next_id += 1
        if s.running and rng.random() < 0.1:
            s.remove(rng.choice(s.running))
        s.set_paused({x.seq_id for x in s.running if rng.random() < 0.2})
        plan = s.schedule()
        calls = uniform_calls(plan)
        seen = []
        for call in calls:
            slots = [c.slot for c in call.chunks]
            assert slots == list(range(call.first_slot, call.first_slot + call.rows)), (step, call)
            assert {c.length for c in call.chunks} == {call.width}
            assert call.width == 1 or call.rows == 1
            seen += [id(c) for c in call.chunks]
        assert sorted(seen) == sorted(id(c) for c in plan.chunks)
        s.update(plan, {c.seq.seq_id: 7 for c in plan.chunks if c.samples})
        for x in list(s.running):
            if x.num_generated >= 5:
                s.remove(x)
