"""Hands out KV slots and takes them back. The scheduler sees slot numbers only.

The lowest free slot is always handed out first, so busy slots stay packed at
the front and a step binds at most the prefix [0, highest busy slot + 1) of the
cache (server/kv_buffers.py).
"""
from __future__ import annotations

import heapq


class SlotManager:
    def __init__(self, slots: int, capacity: int):
        self.slots = slots
        self.capacity = capacity  # tokens per slot
        self._free = list(range(slots))  # a min-heap
        self._busy: set[int] = set()

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return len(self._busy)

    def allocate(self) -> int | None:
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._busy.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._busy:
            raise ValueError(f"slot {slot} is not in use")
        self._busy.remove(slot)
        heapq.heappush(self._free, slot)
