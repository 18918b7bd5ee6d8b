"""A model's chat template rendered as Hugging Face's `apply_chat_template` renders it, from the
template a server publishes in /tokenizer_info: so that a machine with no Hugging Face tokenizer
(and no Hub) can evaluate an instruct model with its own template. Needs jinja2 (lm-eval brings it).

The server renders chat requests the same way (server/serving/chat.py); the two are kept apart
because the client is its own distribution, which does not import the server.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # jinja2 is imported where a template is compiled (the [eval] extra brings it)
    from jinja2 import Template


def _raise(message: str) -> NoReturn:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Hugging Face's tojson: JSON as written, not Jinja's HTML-escaped, key-sorted one."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=4)
def _compiled(template: str) -> Template:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Hugging Face's settings: blocks trimmed, loop controls ({% break %}), a sandbox, its tojson,
    # raise_exception and strftime_now.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# Appended to the final message's content to find where it ends once rendered: a word and a space,
# like Hugging Face's own mark, so that a template that trims the content trims the mark's space.
CONTINUE_MARK = "LOGPROBS_CONTINUE_FINAL_MESSAGE "


def _marked(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with CONTINUE_MARK after the final message's text (its last text part)."""
    final = dict(messages[-1])
    content = final.get("content")
    if isinstance(content, str):
        final["content"] = content + CONTINUE_MARK
    elif isinstance(content, list):
        parts = [dict(part) if isinstance(part, dict) else part for part in content]
        text_part = next((p for p in reversed(parts) if isinstance(p, dict) and "text" in p), None)
        if text_part is None:
            raise ValueError("continue_final_message: the final message has no text to continue")
        text_part["text"] += CONTINUE_MARK
        final["content"] = parts
    else:
        raise ValueError("continue_final_message: the final message has no content to continue")
    return [*messages[:-1], final]


def render(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    **special_tokens: str | None,
) -> str:
    """The conversation as the model reads it. continue_final_message: the text ends where the
    last message's content ends (lm-eval asks for this when a task gives the answer's first words,
    its gen_prefix), so the model continues that message instead of starting a new one.
    special_tokens: bos_token, eos_token, ... as the template may name them."""
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message exclude each other")
    tokens = {k: v for k, v in special_tokens.items() if v is not None}
    if continue_final_message:
        messages = _marked(messages)
    text = _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
    if not continue_final_message:
        return text
    at = text.rfind(CONTINUE_MARK.strip())
    if at < 0:
        raise ValueError(
            "continue_final_message: the template does not render the last message's content, so "
            "there is no place to continue it from"
        )
    # Where the template kept the content as it is, the text ends as the content does (its trailing
    # spaces included); where it trimmed the content, it ends trimmed (Hugging Face's rule).
    return text[:at] if text.startswith(CONTINUE_MARK, at) else text[:at].rstrip()
