"""Conversations through the tokenizer's own chat template."""

from __future__ import annotations

from typing import Any, Optional

from jinja2 import TemplateError  # transformers renders chat templates with jinja2


def validate_messages(conversation: Any) -> list[dict[str, Any]]:
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError("a conversation must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(conversation):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise ValueError(f"message {i} has no {' or '.join(repr(k) for k in missing)}: {m!r}")
        if not isinstance(m["role"], str) or not m["role"]:
            raise ValueError(f"message {i}: 'role' must be a non-empty str, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: 'content' must be a str, got {type(m['content']).__name__}")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: the tokenizer would fail with a TypeError
            raise ValueError(f"message {i}: 'content' is not valid Unicode (lone surrogate at {e.start})") from None
    return list(conversation)


def render_chat_text(
    tokenizer,
    conversation,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template: Optional[str] = None,
    tools: Optional[list[dict]] = None,
) -> str:
    """The conversation as the model's prompt text, through the tokenizer's (or the given) template.
    tools: OpenAI-style function definitions for templates that take them."""
    conversation = validate_messages(conversation)
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of this model ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template: "
            "pass chat_template=... or format the prompt yourself and call generate()"
        )
    if add_generation_prompt and continue_final_message:
        add_generation_prompt = False  # continuing the last message means no new turn
    try:
        return tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template=chat_template,
            **({"tools": tools} if tools else {}),
        )
    except TemplateError as e:  # a broken custom template, or one that raises on this conversation
        raise ValueError(f"the chat template failed: {e}") from e
