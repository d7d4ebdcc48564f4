"""Stop strings over streamed text: send what is safe, hold back what might still become a stop.

Invariant between pushes: the held text is the longest suffix of the text
so far that is a proper prefix of some stop string, and it contains no
whole stop string. So no stop string can start inside text already sent,
and a stop that arrives split across any number of pushes is still found.

The first stop to complete wins, as if the text arrived one character at
a time: the one whose first occurrence ends earliest, and of those ending
at the same place, the longest. So where the pushes split the text never
changes the result. With stops "bc" and "abcd", "abcd" ends the text at
"a": generation stops when "bc" completes, before "abcd" could.
"""
from __future__ import annotations

from typing import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        if any(stop == "" for stop in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(dict.fromkeys(stops))  # deduplicated, in order
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Add new text; return (text safe to send now, whether a stop string matched).

        On a match the returned text is everything before the stop string; the
        stop string and anything after it are dropped, and later pushes return ("", True).
        """
        if self.stopped:
            return "", True
        pending = self._held + text
        found = [(i + len(stop), i) for stop in self._stops if (i := pending.find(stop)) >= 0]
        if found:
            self.stopped = True
            self._held = ""
            _, start = min(found)  # earliest end, then earliest start
            return pending[:start], True
        keep = self._held_suffix_length(pending)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        """Generation ended for another reason: the held text is not a stop after all."""
        held, self._held = self._held, ""
        return held

    def _held_suffix_length(self, pending: str) -> int:
        """Length of the longest suffix of pending that some stop string starts with (0 if none)."""
        for length in range(min(len(pending), self._longest - 1), 0, -1):
            suffix = pending[-length:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return length
        return 0
