"""What one request's generated tokens become: streamed token ids, text, and when to stop.

    token id ──► end of sequence? ──► detokenizer ──► stop strings ──► TokenOutput(token_ids, text, finish_reason)
                 (not streamed)       (whole chars)   (hold back a possible prefix)

Pure: no engine state, no clocks, no onnxruntime. The engine owns one
pipeline per request and pushes each sampled token through it; the order of
the checks is the contract clients see:

- an end-of-sequence token (unless `ignore_eos`) ends the request with EOS and
  is not streamed;
- a stop string ends it with STOP; the text before the stop is streamed, the
  stop string and anything after it are not;
- otherwise `max_new_tokens`, or the slot's capacity, ends it with LENGTH.

When EOS or LENGTH ends a request, the text still held back (the bytes of an
incomplete character, the start of a possible stop string) is due: it is
flushed into the last output, and a stop string that the flush completes
still reads STOP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from tokenizers import Tokenizer

from server.detokenizer import IncrementalDetokenizer
from server.stop_strings import StopMatcher
from server.types import FinishReason


@dataclass(frozen=True)
class TokenOutput:
    token_ids: tuple[int, ...]  # the token, or () when it is not streamed (an end-of-sequence token)
    text: str  # the text that became safe to send with this token (often "")
    finish_reason: Optional[FinishReason] = None


class TokenPipeline:
    def __init__(self, tokenizer: Tokenizer, *, stop: Sequence[str], eos_token_ids: Iterable[int],
                 ignore_eos: bool, max_new_tokens: int, num_prompt_tokens: int, max_total_tokens: int):
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stop = StopMatcher(stop)
        self._eos_token_ids = frozenset(() if ignore_eos else eos_token_ids)
        self._max_new_tokens = max_new_tokens
        self._num_prompt_tokens = num_prompt_tokens
        self._max_total_tokens = max_total_tokens
        self.num_generated = 0

    def push(self, token: int) -> TokenOutput:
        """One sampled token: what to stream now, and the finish reason if it ends the request."""
        self.num_generated += 1
        if token in self._eos_token_ids:
            return self._finish((), "", FinishReason.EOS)
        text, stopped = self._stop.push(self._detokenizer.push(token))
        if stopped:
            return TokenOutput((token,), text, FinishReason.STOP)
        if (self.num_generated >= self._max_new_tokens
                or self._num_prompt_tokens + self.num_generated >= self._max_total_tokens):
            return self._finish((token,), text, FinishReason.LENGTH)
        return TokenOutput((token,), text)

    def _finish(self, token_ids: tuple[int, ...], text: str, reason: FinishReason) -> TokenOutput:
        """End for EOS or LENGTH: the held-back text is due, unless it completes a stop string."""
        tail, stopped = self._stop.push(self._detokenizer.flush())
        if stopped:
            return TokenOutput(token_ids, text + tail, FinishReason.STOP)
        return TokenOutput(token_ids, text + tail + self._stop.flush(), reason)
