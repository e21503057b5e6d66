"""Tool definitions and tool_choice, as the OpenAI API shapes them, checked; and the grammar that
forces a call.

With tool_choice "required" the output is constrained to a JSON array of one or more
``{"name": <one of the tools>, "arguments": <that tool's parameters>}`` objects; with a named
function, to that function's arguments object. Either way every call parses and validates.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

from pydantic import BaseModel, Field

from paged_backend.structured.compiler import build_grammar
from paged_backend.structured.spec import StructuredOutputs

_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class FunctionTool(BaseModel):
    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: dict(_EMPTY_PARAMETERS))
    strict: Optional[bool] = None

    def openai(self) -> dict[str, Any]:
        """The {"type": "function", "function": {...}} form chat templates take."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


def normalize_tools(tools: Any) -> list[FunctionTool]:
    """OpenAI tool dicts ({"type": "function", "function": {...}}) or bare function dicts
    ({"name", "description", "parameters"}); ValueError naming the tool that is wrong."""
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of function definitions, got {type(tools).__name__}")
    out: list[FunctionTool] = []
    for i, tool in enumerate(tools):
        if isinstance(tool, BaseModel):
            tool = tool.model_dump(exclude_none=True)
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}] must be a dict, got {type(tool).__name__}")
        if "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function":
                raise ValueError(f"tools[{i}]: only type 'function' is supported, got {tool.get('type')!r}")
            fn = tool.get("function")
        else:
            fn = tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise ValueError(
                f"tools[{i}] needs a function name of 1-64 letters, digits, '_', '.' or '-'; got {fn!r}"
            )
        params = fn.get("parameters")
        if params is None:
            params = dict(_EMPTY_PARAMETERS)
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}] ({fn['name']}): parameters must be a JSON schema object")
        try:
            build_grammar(StructuredOutputs(json=params))
        except ValueError as e:
            raise ValueError(f"tools[{i}] ({fn['name']}): parameters are not a usable JSON schema: {e}") from None
        desc = fn.get("description") or ""
        out.append(FunctionTool(name=fn["name"], description=desc, parameters=params, strict=fn.get("strict")))
    names = [t.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"tools: function names must be unique, repeated: {dupes}")
    return out


ToolChoice = Union[str, dict]


def normalize_tool_choice(choice: Optional[ToolChoice], tools: list[FunctionTool]) -> str:
    """"none" | "auto" | "required" | the name of the function that must be called."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}")
        if choice == "required" and not tools:
            raise ValueError("tool_choice 'required' needs at least one tool in tools")
        return choice if tools else "none"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ValueError(f"tool_choice must look like {{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}")
        if name not in {t.name for t in tools}:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools {[t.name for t in tools]}")
        return name
    raise ValueError(f"tool_choice must be a str or a dict, got {type(choice).__name__}")


def forced_call_outputs(tools: list[FunctionTool], choice: str, parallel: bool = True) -> Optional[StructuredOutputs]:
    """The constraint that forces the call(s) for "required" or a named function; None otherwise."""
    if choice in ("none", "auto"):
        return None
    by_name = {t.name: t for t in tools}
    if choice in by_name:
        return StructuredOutputs(json=by_name[choice].parameters)
    call = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    schema = {"type": "array", "minItems": 1, "items": call[0] if len(call) == 1 else {"anyOf": call}}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputs(json=schema)
