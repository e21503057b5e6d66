"""One chat request's tools: what goes into the prompt, the constraint that forces a call, and how
the reply is read back into content and tool calls.

Templates that take ``tools`` (transformers' ``apply_chat_template(..., tools=...)``) get them and
are parsed in their own format. For a template that takes none, the tools are described in a
system message (Hermes-style ``<tool_call>`` tags, which most chat-tuned models have seen), and
earlier assistant tool calls in the conversation are written back in that format.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from paged_backend.tools.parsers import ToolCall, ToolCallParser, parse_forced, parser_for_template
from paged_backend.tools.spec import forced_call_outputs, normalize_tool_choice, normalize_tools

_TOOL_PROMPT = (
    "You may call one or more functions to assist with the user query. The functions are listed, as "
    "JSON signatures, within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function "
    'call, return a JSON object with the function name and arguments within <tool_call></tool_call> XML '
    'tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_FORCED = {
    "required": "\n\nCall at least one function now: reply with a JSON array of "
    '{{"name": <function-name>, "arguments": <args-json-object>}} objects.',
    "named": "\n\nCall the function {name} now: reply with its arguments as a JSON object.",
}


class ToolCalling:
    def __init__(
        self,
        tools: Any,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        chat_template: Optional[str] = None,
    ):
        """chat_template: the template the conversation will be rendered with (the tokenizer's)."""
        self.tools = normalize_tools(tools or [])
        self.choice = normalize_tool_choice(tool_choice, self.tools)
        self.structured = forced_call_outputs(self.tools, self.choice, parallel_tool_calls)
        self.template_takes_tools = bool(chat_template) and "tools" in chat_template
        self.parser: ToolCallParser = parser_for_template(chat_template if self.template_takes_tools else None)

    @property
    def active(self) -> bool:
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.structured is not None

    def prepare(self, messages: list[dict]) -> tuple[list[dict], Optional[list[dict]]]:
        """(messages to render, the ``tools`` argument for apply_chat_template or None)."""
        if not self.active:
            return [_without_tool_calls(m) for m in messages], None
        if self.template_takes_tools:
            return [_with_content(m) for m in messages], [t.openai() for t in self.tools]
        prompt = _TOOL_PROMPT.format(tools="\n".join(json.dumps(t.openai()["function"]) for t in self.tools))
        if self.forced:
            prompt += _FORCED["required"] if self.choice == "required" else _FORCED["named"].format(name=self.choice)
        out = [_without_tool_calls(m) for m in messages]
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
        return out, None

    def parse(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """The finished reply as (content, tool calls)."""
        if not self.active:
            return text, []
        if self.forced:
            calls = parse_forced(text, self.choice)
            return (None if calls else text), calls
        content, calls = self.parser.parse(text)
        names = {t.name for t in self.tools}
        if any(c.name not in names for c in calls):  # a call of a function it was not given: text
            return text, []
        return content, calls


def _with_content(m: dict) -> dict:
    return {**m, "content": m.get("content") or ""} if m.get("content") is None else m


def _without_tool_calls(m: dict) -> dict:
    """An assistant tool-call message as text in the Hermes format, for templates without tools."""
    calls = m.get("tool_calls")
    if not calls:
        return _with_content(m)
    parts = [m.get("content") or ""]
    for c in calls:
        fn = c.get("function", c) if isinstance(c, dict) else {}
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        parts.append("<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args}) + "\n</tool_call>")
    rest = {k: v for k, v in m.items() if k != "tool_calls"}
    return {**rest, "content": "\n".join(p for p in parts if p)}
