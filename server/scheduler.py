"""The scheduler: pure logic, no I/O, no onnxruntime, no clocks.

Each sequence only tracks the tokens it knows (prompt + generated) against the
tokens already computed into its KV slot, so prefill and decode are one path:
a step computes, per sequence, some of the tokens it has not computed yet.

    add(seq) ──► waiting ──(slot free, budget left)──► running ──finish/abort──► slot released
                                                          │
                               schedule() -> StepPlan ────┤ every running row gets its next chunk:
                               update(plan, sampled)  ◄───┘ decode rows 1 token, prefills up to the budget

Decode rows are always scheduled, so a long prompt never stalls running
streams; prompt tokens share a per-step budget (`prefill_chunk_tokens`). While
streams decode, that budget shrinks to `prefill_tokens_per_decode_row` per
decoding row (at least MIN_PREFILL_CHUNK): a prompt chunk then costs about as
much as the decode rows it rides with, so a step that carries one is not many
times slower than a step that does not, and no stream sees a long gap. With
nothing decoding, a prompt gets the whole budget and its first token sooner.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterable, Optional

from server.slots import SlotManager

# The smallest prompt chunk while streams decode: below it, a long prompt takes so many
# steps that its time to first token suffers more than the streams' latency gains.
MIN_PREFILL_CHUNK = 32


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    slot: Optional[int] = None
    num_computed: int = 0  # tokens whose keys and values are in the slot

    @property
    def num_to_compute(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(frozen=True)
class Chunk:
    """Tokens token_ids[start : start + length] of `seq`, computed into `slot` this step.

    What the chunk is (prompt or generated tokens, sampling or not) is fixed when the plan is
    made: `update()` then moves its sequence on, and the plan must still read as it was run.
    """

    seq: Sequence
    slot: int
    start: int
    length: int
    samples: bool  # reaches the last known token, so its logits give the next token
    prefill: bool  # computes prompt tokens (a prompt chunk; the rest are decode rows)

    @classmethod
    def next_of(cls, seq: Sequence, length: int) -> "Chunk":
        """The next `length` uncomputed tokens of a sequence that holds a slot."""
        start = seq.num_computed
        return cls(seq, seq.slot, start, length, samples=start + length == len(seq.token_ids),
                   prefill=start < seq.num_prompt_tokens)


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[Chunk, ...] = ()
    rows: int = 0  # leading slots the step must bind: up to the highest slot with a chunk

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.length for c in self.chunks if c.prefill)


@dataclass(frozen=True)
class SchedulerStats:
    running: int  # sequences holding a slot
    waiting: int  # sequences waiting for one
    slots_in_use: int
    tokens_in_use: int  # tokens computed into the slots of running sequences


class Scheduler:
    def __init__(self, slots: SlotManager, prefill_chunk_tokens: int, prefill_tokens_per_decode_row: int = 0):
        if prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be at least 1")
        if prefill_tokens_per_decode_row < 0:
            raise ValueError("prefill_tokens_per_decode_row must be at least 0 (0: a fixed budget)")
        self.slots = slots
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_tokens_per_decode_row = prefill_tokens_per_decode_row
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order
        self._paused: frozenset[int] = frozenset()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def set_paused(self, seq_ids: Iterable[int]) -> None:
        """Sequences (by seq_id) that keep their slot but compute nothing until the next call."""
        self._paused = frozenset(seq_ids)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(running=len(self.running), waiting=len(self.waiting), slots_in_use=self.slots.in_use,
                              tokens_in_use=sum(s.num_computed for s in self.running))

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, cancelled, expired or failed) and free its slot."""
        if seq.slot is not None:
            self.running.remove(seq)
            self.slots.release(seq.slot)
            seq.slot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> StepPlan:
        # Decode rows first: every running stream that is not paused advances every step.
        chunks = [Chunk.next_of(seq, 1) for seq in self.running
                  if seq.num_to_compute == 1 and seq.num_computed >= seq.num_prompt_tokens
                  and seq.seq_id not in self._paused]
        budget = self.prefill_budget(decode_rows=len(chunks))
        # Then prompts already being prefilled, then new arrivals while slots and budget last.
        for seq in self._prefill_candidates():
            if budget == 0:
                break
            if seq.slot is None:
                seq.slot = self.slots.allocate()
                if seq.slot is None:
                    break
                self.waiting.remove(seq)
                self.running.append(seq)
            length = min(seq.num_to_compute, budget)
            budget -= length
            chunks.append(Chunk.next_of(seq, length))
        # Bind up to the highest slot computed this step: busy slots above it (paused requests) sit idle.
        return StepPlan(tuple(chunks), rows=max(c.slot for c in chunks) + 1 if chunks else 0)

    def prefill_budget(self, decode_rows: int) -> int:
        """Prompt tokens a step may compute beside `decode_rows` decoding streams."""
        if decode_rows == 0 or self.prefill_tokens_per_decode_row == 0:
            return self.prefill_chunk_tokens
        scaled = max(MIN_PREFILL_CHUNK, self.prefill_tokens_per_decode_row * decode_rows)
        return min(self.prefill_chunk_tokens, scaled)

    def _prefill_candidates(self) -> Iterable[Sequence]:
        yield from [s for s in self.running if s.num_computed < s.num_prompt_tokens]
        yield from list(self.waiting)

    def update(self, plan: StepPlan, sampled: dict[int, int]) -> None:
        """Record a finished step: chunks are now computed; sampled[seq_id] is each sampling row's next token."""
        for chunk in plan.chunks:
            chunk.seq.num_computed = chunk.start + chunk.length
            if chunk.seq.seq_id in sampled:
                chunk.seq.token_ids.append(sampled[chunk.seq.seq_id])


@dataclass(frozen=True)
class Call:
    """One onnxruntime call: slots [first_slot, first_slot + rows), with these chunks (others idle)."""

    first_slot: int
    rows: int
    chunks: tuple[Chunk, ...]

    @property
    def width(self) -> int:
        return max(c.length for c in self.chunks)


def split_into_calls(plan: StepPlan, call_overhead_tokens: int, uniform: bool = False) -> list[Call]:
    """Group a step's chunks into onnxruntime calls.

    A call pads every row to its longest chunk, so one mixed call costs about
    rows x longest-chunk token computations. When that dwarfs the useful work,
    decode rows go in one call and each prefill chunk in a call of its own
    (bound to just its slot), at the price of `call_overhead_tokens` per extra call.

    uniform: the GroupQueryAttention lacks `query_seqlens` (see uniform_calls).
    """
    if uniform:
        return uniform_calls(plan)
    if not plan.chunks:
        return []
    mixed = Call(0, plan.rows, tuple(plan.chunks))
    decode = tuple(c for c in plan.chunks if c.length == 1)
    prefill = [c for c in plan.chunks if c.length > 1]
    if not prefill:
        return [mixed]
    decode_rows = max(c.slot for c in decode) + 1 if decode else 0
    split_cost = decode_rows + sum(c.length + call_overhead_tokens for c in prefill)
    if plan.rows * mixed.width <= split_cost:
        return [mixed]
    calls = [Call(0, decode_rows, decode)] if decode else []
    return calls + [Call(c.slot, 1, (c,)) for c in prefill]


def uniform_calls(plan: StepPlan) -> list[Call]:
    """Calls for a GroupQueryAttention without `query_seqlens` (onnxruntime 1.31 and older, CUDA included).

    That op takes every row of a call to bring the call's full width of new tokens, ending at
    the row's seqlens_k; a row with fewer, or none, would still have keys and values written for
    the missing ones. So every row of a call here is a chunk of the call's width:

        slots   0  1  2  3  4  5        decode (1 token) rows in runs of consecutive slots,
        chunk   1  1  -  1  40 1   ──►  Call(0, 2), Call(3, 1), Call(5, 1): S = 1 each;
                                        each longer chunk alone: Call(4, 1), S = 40, a batch-1 call
                                        on its slot's one-row view of the shared buffer.

    Slots without a chunk this step (idle, paused, prefilling elsewhere) are in no call, so nothing
    is written to them; within a call every row's new tokens land at [start, start + length) of its
    own slot, the positions the scheduler asked for.
    """
    decode = sorted((c for c in plan.chunks if c.length == 1), key=lambda c: c.slot)
    calls: list[Call] = []
    run: list[Chunk] = []
    for chunk in decode:
        if run and chunk.slot != run[-1].slot + 1:
            calls.append(Call(run[0].slot, len(run), tuple(run)))
            run = []
        run.append(chunk)
    if run:
        calls.append(Call(run[0].slot, len(run), tuple(run)))
    return calls + [Call(c.slot, 1, (c,)) for c in plan.chunks if c.length > 1]
