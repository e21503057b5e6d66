"""Tool calls while streaming: text deltas in, content deltas and OpenAI-shaped tool-call deltas out.

- a named function (forced): the output is its arguments, streamed as they come — the first delta
  carries the call's id and name (OpenAI's shape: ``{"index", "id", "type", "function": {"name",
  "arguments"}}``), the next ones argument fragments;
- "required" (forced): the calls are sent whole when the output is complete;
- "auto": text is content until the model's tool-call marker shows; from there it is held back
  and parsed at the end (text that only might start a marker is held until it is clear).
"""

from __future__ import annotations

from paged_backend.tools.calling import ToolCalling
from paged_backend.tools.parsers import new_call_id


class ToolCallStream:
    def __init__(self, calling: ToolCalling):
        self.calling = calling
        self.text = ""
        self._sent = 0  # characters of text already sent as content
        self._in_calls = False
        self._named_id = None
        self.num_calls = 0  # tool calls sent so far (finish_reason "tool_calls" when > 0)

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        """(content delta, tool-call deltas) for the next piece of text."""
        self.text += delta
        c = self.calling
        if not c.active:
            return self._content_upto(len(self.text)), []
        if c.forced:
            if c.choice == "required":
                return "", []
            if self._named_id is None:
                self._named_id = new_call_id()
                self.num_calls = 1
                head = {"index": 0, "id": self._named_id, "type": "function", "function": {"name": c.choice, "arguments": delta}}
                return "", [head]
            return "", ([{"index": 0, "function": {"arguments": delta}}] if delta else [])
        if self._in_calls:
            return "", []
        return self._content_upto(self._safe_end()), []

    def finish(self) -> tuple[str, list[dict]]:
        """What is left once the output is complete."""
        c = self.calling
        if not c.active:
            return self._content_upto(len(self.text)), []
        if c.forced and c.choice != "required":  # its arguments went out as they came
            return "", []
        content, calls = c.parse(self.text)
        if not calls:
            return self._content_upto(len(self.text)), []
        deltas = [{"index": self.num_calls + i, **call.openai()} for i, call in enumerate(calls)]
        self.num_calls += len(calls)
        return "", deltas

    def _content_upto(self, end: int) -> str:
        out = self.text[self._sent:end]
        self._sent = max(self._sent, end)
        return out

    def _safe_end(self) -> int:
        """How far the text is surely content; sets _in_calls when a marker has appeared."""
        p = self.calling.parser
        if p.at_start_only:
            if self._sent:  # already decided: content
                return len(self.text)
            head = self.text.lstrip()
            if any(head.startswith(m) for m in p.markers):
                self._in_calls = True
                return 0
            if not head or any(m.startswith(head) for m in p.markers):
                return 0
            return len(self.text)
        found = [i for i in (self.text.find(m, self._sent) for m in p.markers) if i >= 0]
        if found:
            self._in_calls = True
            return min(found)
        # hold back a tail that may be the start of a marker
        hold = max((k for m in p.markers for k in range(1, len(m)) if self.text.endswith(m[:k])), default=0)
        return len(self.text) - hold
