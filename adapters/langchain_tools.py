"""Tool calling and structured output for the LangChain chat model.

``bind_tools(tools, tool_choice=...)`` binds OpenAI-shaped tools (converted by LangChain's own
``convert_to_openai_tool``: pydantic classes, TypedDicts, functions, BaseTools, dicts); the model's
reply comes back as ``AIMessage.tool_calls`` (streamed: ``tool_call_chunks``). With tool_choice
"any"/"required", True or a tool's name the call is grammar-constrained to the tool's parameters.
``with_structured_output(schema, method=...)``: "json_schema" constrains the reply to the schema,
"json_mode" to any JSON object, "function_calling" forces a call of the schema as a tool.
"""

from __future__ import annotations

import json
from operator import itemgetter
from typing import Any, Literal, Optional

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.messages.tool import tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel

from paged_backend import ToolCalling

TOOL_KWARGS = ("tools", "tool_choice", "parallel_tool_calls")


def _is_pydantic_class(obj: Any) -> bool:
    from pydantic import v1

    return isinstance(obj, type) and issubclass(obj, (BaseModel, v1.BaseModel))


def _tool_choice(choice: Any, tools: list[dict]) -> Any:
    """LangChain's tool_choice spellings -> OpenAI's."""
    names = [t["function"]["name"] for t in tools]
    if choice is None or choice in ("auto", "none"):
        return choice
    if choice in ("any", "required", True) and len(names) == 1:  # the same, and a shorter output
        return {"type": "function", "function": {"name": names[0]}}
    if choice == "any" or choice is True:
        return "required"
    if isinstance(choice, str):
        return {"type": "function", "function": {"name": choice}}
    return choice  # a dict in OpenAI's shape (checked by ToolCalling)


def tool_calling_from(kwargs: dict[str, Any], chat_template: Optional[str]) -> Optional[ToolCalling]:
    """Pops the tool arguments bound by bind_tools from kwargs; the request's ToolCalling or None."""
    tools = kwargs.pop("tools", None)
    choice = kwargs.pop("tool_choice", None)
    parallel = kwargs.pop("parallel_tool_calls", None)
    if not tools:
        return None
    return ToolCalling(tools, choice, parallel is not False, chat_template)


def message_dict(m: BaseMessage, d: dict[str, Any]) -> dict[str, Any]:
    """Adds an AIMessage's tool calls to its template dict (OpenAI's shape)."""
    if isinstance(m, AIMessage) and m.tool_calls:
        d["tool_calls"] = [
            {"id": c.get("id") or f"call_{i}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["args"])}}
            for i, c in enumerate(m.tool_calls)
        ]
        if not d.get("content"):
            d["content"] = None
    if isinstance(m, ToolMessage):
        d["tool_call_id"] = m.tool_call_id
    return d


def reply_message(text: str, calling: Optional[ToolCalling], **fields: Any) -> AIMessage:
    if calling is None:
        return AIMessage(content=text, **fields)
    content, calls = calling.parse(text)
    tool_calls = []
    for c in calls:
        try:
            args = json.loads(c.arguments)
        except ValueError:  # cut short by max_tokens
            continue
        tool_calls.append(tool_call(name=c.name, args=args, id=c.id))
    return AIMessage(content=content or "", tool_calls=tool_calls, **fields)


def chunk_message(content: str, deltas: list[dict], **fields: Any) -> AIMessageChunk:
    """A streamed piece: OpenAI-shaped tool-call deltas -> LangChain tool_call_chunks."""
    chunks = [
        tool_call_chunk(name=d.get("function", {}).get("name"), args=d.get("function", {}).get("arguments"),
                        id=d.get("id"), index=d["index"])
        for d in deltas
    ]
    return AIMessageChunk(content=content, tool_call_chunks=chunks, **fields)


class ToolCallingChatMixin:
    """bind_tools and with_structured_output for a BaseChatModel whose calls accept the tools,
    tool_choice, parallel_tool_calls and structured_outputs arguments."""

    def bind_tools(self, tools: list[Any], *, tool_choice: Any = None, parallel_tool_calls: Optional[bool] = None,
                   **kwargs: Any) -> Runnable:
        formatted = [convert_to_openai_tool(t) for t in tools]
        extra = {} if parallel_tool_calls is None else {"parallel_tool_calls": parallel_tool_calls}
        return self.bind(tools=formatted, tool_choice=_tool_choice(tool_choice, formatted), **extra, **kwargs)

    def with_structured_output(
        self,
        schema: Any,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: Optional[bool] = None,  # accepted for compatibility: the grammar is always strict
        **kwargs: Any,
    ) -> Runnable:
        if kwargs:
            raise ValueError(f"unknown with_structured_output argument(s) {sorted(kwargs)}")
        pydantic = _is_pydantic_class(schema)
        trace = {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}}
        if method == "function_calling":
            if schema is None:
                raise ValueError("method='function_calling' needs a schema")
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, parallel_tool_calls=False, **trace)
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if pydantic
                      else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method == "json_schema":
            if schema is None:
                raise ValueError("method='json_schema' needs a schema")
            json_schema = convert_to_json_schema(schema)
            llm = self.bind(structured_outputs={"json": json_schema}, **trace)
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()
        elif method == "json_mode":
            llm = self.bind(structured_outputs={"json_object": True}, **trace)
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        with_error = parsed.with_fallbacks([fallback], exception_key="parsing_error")
        return RunnableMap(raw=llm) | with_error
