"""Prompts to token ids: the tokenizer and the chat template of a model dir."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from server import contract
from server.contract import ModelCard
from server.chat import ROLES, ChatTemplate, ChatTemplateError
from server.errors import InvalidRequestError


def load_tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(model_dir) / contract.TOKENIZER_FILE))


class PromptCodec:
    def __init__(self, tokenizer: Tokenizer, card: ModelCard):
        self.tokenizer = tokenizer
        self.max_chars_per_token = max_chars_per_token(tokenizer)
        self.template = None
        if card.chat_template:
            names = {key.replace("_token_id", "_token"): self._token_text(value)
                     for key, value in card.special_tokens.items() if key.endswith("_token_id")}
            self.template = ChatTemplate(card.chat_template, names)

    def _token_text(self, token_id):
        return self.tokenizer.id_to_token(token_id) if isinstance(token_id, int) else None

    @property
    def has_chat_template(self) -> bool:
        return self.template is not None

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def max_prompt_chars(self, context: int) -> int:
        """Characters beyond which no text can fit in `context` tokens."""
        return context * self.max_chars_per_token

    def encode_chat(self, messages: Sequence[tuple[str, str]], max_chars: int = 0) -> list[int]:
        if self.template is None:
            raise InvalidRequestError("messages", "this model has no chat template; send a plain `prompt` instead")
        if not messages:
            raise InvalidRequestError("messages", "must hold at least one message")
        for i, (role, _) in enumerate(messages):
            if role not in ROLES:
                raise InvalidRequestError(f"messages[{i}].role", f"unknown role {role[:40]!r}; use one of {', '.join(ROLES)}")
        try:
            text = self.template.render(messages)
        except ChatTemplateError as e:
            raise InvalidRequestError("messages", f"the chat template rejected them: {e}") from None
        if max_chars and len(text) > max_chars:  # many short messages: the template adds text to each
            raise InvalidRequestError("messages", f"render to {len(text)} characters; no text over {max_chars} "
                                                  "characters fits in the context")
        # The template writes the special tokens itself; do not add them twice.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.id_to_token(i) or "" for i in ids]


def max_chars_per_token(tokenizer: Tokenizer) -> int:
    """An upper bound of the characters one token covers: its longest vocabulary entry.

    Entries spell at least what they cover (a byte-level entry spells one character per byte,
    a byte-fallback entry `<0xE2>` six for one byte). A normalizer may first shrink the text
    (NFC composes up to about four code points into one), so then four times that.
    """
    longest = max(len(entry) for entry in tokenizer.get_vocab(with_added_tokens=True))
    return longest * (4 if tokenizer.normalizer is not None else 1)
