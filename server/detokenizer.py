"""Incremental detokenization: a stream of token ids in, a stream of text out.

Decoding each new token alone goes wrong twice over. A character can span
several tokens (byte-level BPE and byte-fallback tokens such as <0xE2> carry
raw UTF-8 bytes), and decoders look at context: a Metaspace ("▁") tokenizer
drops the leading space of the first token of whatever it decodes. So each
step decodes a short window of recent tokens twice, without and with the
unsent ones, and sends the difference:

    window:  | already sent | not yet sent |
             0            read            end
    new text = decode(window)[len(decode(window[:read])):]

Both decodes start at the same token, so whatever the decoder does to the
start of a string it does to both. Text is sent only when the window's
decode does not end in U+FFFD (a character still missing bytes); then the
window slides to start where that text started, so a step costs O(window),
not O(sequence).

Invariant: the concatenation of push() outputs and flush() equals
tokenizer.decode(all ids pushed, skip_special_tokens=True). Note that for
Metaspace tokenizers this drops the leading space of the very first
generated token, just as decoding the generated ids in one go does.
"""
from __future__ import annotations

from tokenizers import Tokenizer

_INCOMPLETE = "\ufffd"  # what a decoder emits for bytes that are not (yet) a whole character


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._window: list[int] = []  # the ids from the start of the last text sent
        self._read = 0  # window[:read] produced the last text sent; window[read:] has not been sent
        self._sent_text = ""  # decode(window[:read]), kept so a held step decodes once

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (often "", never a broken character)."""
        self._window.append(token_id)
        text = self._decode(self._window)
        if len(text) <= len(self._sent_text) or text.endswith(_INCOMPLETE):
            return ""  # nothing new yet (a special token, or a character still missing bytes)
        new_text = text[len(self._sent_text) :]
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._sent_text = self._decode(self._window)
        return new_text

    def flush(self) -> str:
        """At the end of generation: whatever is held back, replacement characters included."""
        new_text = self._decode(self._window)[len(self._sent_text) :]
        self._window, self._read, self._sent_text = [], 0, ""
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)
