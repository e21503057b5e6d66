"""Structured outputs and tool calls on the OpenAI routes: request fields -> constraint and tool
plan, reply -> ``message.tool_calls`` / streamed ``delta.tool_calls``.

Framework-free like ``openai_protocol``. Accepted, as OpenAI and vLLM take them:
``response_format`` ({"type": "json_object"} | {"type": "json_schema", "json_schema": {"schema",
"strict"?, "name"?}} | {"type": "text"}), ``tools`` + ``tool_choice`` + ``parallel_tool_calls``,
and vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` /
``structured_outputs``. At most one constraint per request.
"""

from __future__ import annotations

from typing import Any, Optional

from paged_backend import StructuredOutputs, ToolCalling, ToolCallStream

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _response_format(rf: Optional[dict]) -> Optional[dict]:
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", js.get("json_schema")), dict):
            raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return {"json": js.get("schema", js.get("json_schema"))}
    raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def structured_from_fields(fields: dict[str, Any]) -> Optional[StructuredOutputs]:
    """The one constraint a request's fields ask for (None if none); ValueError naming the field."""
    asked: dict[str, dict] = {}
    rf = _response_format(fields.get("response_format"))
    if rf:
        asked["response_format"] = rf
    for name, kind in _GUIDED.items():
        if fields.get(name) is not None:
            asked[name] = {kind: fields[name]}
    if fields.get("structured_outputs") is not None:
        asked["structured_outputs"] = fields["structured_outputs"]
    if len(asked) > 1:
        raise ValueError(f"give at most one output constraint; got {sorted(asked)}")
    if not asked:
        return None
    (name, spec), = asked.items()
    try:
        return StructuredOutputs(**spec).check()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None


def tool_calling(fields: dict[str, Any], chat_template: Optional[str]) -> Optional[ToolCalling]:
    if not fields.get("tools"):
        if fields.get("tool_choice") not in (None, "none", "auto"):
            raise ValueError("tool_choice needs tools")
        return None
    parallel = fields.get("parallel_tool_calls")
    return ToolCalling(fields["tools"], fields.get("tool_choice"), parallel is not False, chat_template)


def merge_constraint(structured: Optional[StructuredOutputs], calling: Optional[ToolCalling]):
    """The constraint for the engine: the forced tool call's, or the requested one (not both)."""
    if calling is not None and calling.forced:
        if structured is not None:
            raise ValueError("a forced tool call (tool_choice 'required' or a named function) cannot be "
                             "combined with response_format or guided_* fields")
        return calling.structured
    return structured


def assistant_message(text: str, calling: Optional[ToolCalling]) -> tuple[dict[str, Any], bool]:
    """(the message dict, whether it calls tools: finish_reason "tool_calls")."""
    if calling is None:
        return {"role": "assistant", "content": text}, False
    content, calls = calling.parse(text)
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [c.openai() for c in calls]
    return msg, bool(calls)


class ChatDeltas:
    """Per choice while streaming: text deltas -> OpenAI delta dicts (content and/or tool_calls)."""

    def __init__(self, calling: Optional[ToolCalling]):
        self._stream = ToolCallStream(calling) if calling is not None else None

    def feed(self, text_delta: str, finished: bool) -> dict[str, Any]:
        if self._stream is None:
            return {"content": text_delta} if text_delta else {}
        content, calls = self._stream.feed(text_delta)
        if finished:
            more_content, more_calls = self._stream.finish()
            content, calls = content + more_content, calls + more_calls
        delta: dict[str, Any] = {}
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        return delta

    @property
    def called(self) -> bool:
        return self._stream is not None and self._stream.num_calls > 0
