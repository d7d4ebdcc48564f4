"""Chat templates: a model card's Jinja template, rendered the way Hugging Face renders it."""
from __future__ import annotations

from typing import Optional, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")


class ChatTemplateError(Exception):
    pass


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, Optional[str]]):
        def raise_exception(message):
            raise ChatTemplateError(message)

        # Hugging Face renders with these settings; templates are written against them.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.special_tokens = special_tokens

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """messages: (role, content) pairs -> the prompt text, ending with the assistant's turn."""
        try:
            return self.template.render(
                messages=[{"role": role, "content": content} for role, content in messages],
                add_generation_prompt=True,
                **{k: v for k, v in self.special_tokens.items() if v is not None},
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(str(e)) from None
