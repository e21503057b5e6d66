"""Tool calls in a model's own output format (tool_choice "auto"), picked from its chat template.

Families covered:
- Hermes / Qwen 2.x-3 (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number,
  text before them is the message content) — also the format our own tool prompt asks for when
  a chat template takes no tools (SmolLM2 and other ChatML models);
- Llama 3.1-3.3 JSON calls (the whole reply is ``{"name": ..., "parameters": {...}}``, optionally
  after ``<|python_tag|>``; several separated by ``;``);
- Mistral (``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``).
A reply that does not parse as calls is plain content: never an error.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)
    id: str = field(default_factory=new_call_id)

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call_from(obj: Any, args_keys=("arguments", "parameters")) -> Optional[ToolCall]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """``parse(text) -> (content or None, calls)``. ``markers``: strings whose appearance means
    the rest of the reply is tool calls (streaming holds text back from there on)."""

    name = "base"
    markers: tuple[str, ...] = ()
    at_start_only = False  # the markers count only at the start of the reply

    def parse(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        raise NotImplementedError


class HermesParser(ToolCallParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def parse(self, text):
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for body in self._CALL.findall(text[start:]):
            try:
                call = _call_from(json.loads(body))
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        content = text[:start].strip()
        return (content or None), calls


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")
    at_start_only = True

    def parse(self, text):
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return text, []
            call = _call_from(obj, ("parameters", "arguments"))
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \n\t;":
                pos += 1
        return None, calls


class MistralParser(ToolCallParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def parse(self, text):
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return text, []
        body = text[start + len("[TOOL_CALLS]"):].strip()
        try:
            obj, _ = json.JSONDecoder().raw_decode(body)
        except ValueError:
            return text, []
        objs = obj if isinstance(obj, list) else [obj]
        calls = [_call_from(o) for o in objs]
        if not calls or any(c is None for c in calls):
            return text, []
        content = text[:start].strip()
        return (content or None), calls


def parser_for_template(chat_template: Optional[str]) -> ToolCallParser:
    """The parser for the format a chat template teaches; Hermes when it has none of its own
    (then our own tool prompt, which asks for Hermes tags, is used)."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return MistralParser()
    if "<|python_tag|>" in t or ("ipython" in t and "tools" in t):
        return Llama3JsonParser()
    return HermesParser()


def parse_forced(text: str, choice: str) -> list[ToolCall]:
    """Calls from an output constrained by ``forced_call_outputs``: the arguments of the named
    function, or the JSON array of {"name", "arguments"} for "required"."""
    if choice != "required":
        return [ToolCall(choice, text.strip())]
    try:  # (cut short by max_tokens, it is no call)
        return [ToolCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in json.loads(text)]
    except (ValueError, TypeError, KeyError):
        return []
