"""Structured outputs and tool calling on the OpenAI routes: a real `bentoml serve` with the bundled
SmolLM2-135M, driven by the official `openai` client (its own `parse` helper included)."""

from __future__ import annotations

import json
import re

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from pydantic import BaseModel, Field  # noqa: E402

from service_server import Server  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time in a timezone",
                 "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 12}},
                                "required": ["tz"]}},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=50)


@pytest.fixture(scope="module")
def server(smollm_tokenizer, shared_servers) -> Server:
    """SmolLM2, float32, max_model_len 1024 (the session's, shared with test_bentoml)."""
    return shared_servers.get("smollm")["smollm"]


def test_response_format_json_object_and_json_schema(server):
    client = server.client()
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = City.model_json_schema()
    for strict in (True, False):
        r = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Describe Paris."}], max_tokens=60,
            temperature=0, response_format={"type": "json_schema",
                                            "json_schema": {"name": "city", "schema": schema, "strict": strict}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_openai_client_parse_with_a_pydantic_model(server):
    r = server.client().chat.completions.parse(model="smollm2-135m-instruct", max_tokens=60, temperature=0,
                                               messages=[{"role": "user", "content": "Describe Tokyo."}],
                                               response_format=City)
    assert isinstance(r.choices[0].message.parsed, City)


def test_vllm_guided_fields(server):
    client = server.client()
    r = client.completions.create(model="smollm2-135m-instruct", prompt="The answer is", max_tokens=8,
                                  temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no")
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, max_tokens=20, temperature=0,
                                       extra_body={"guided_regex": "[A-Z][a-z]+, [0-9]{1,2} degrees"})
    assert re.fullmatch("[A-Z][a-z]+, [0-9]{1,2} degrees", r.choices[0].message.content)
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, max_tokens=60, temperature=0,
                                       extra_body={"guided_json": City.model_json_schema()})
    City.model_validate_json(r.choices[0].message.content)


def _check_call(call, tool: dict) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_tool_choice_required_and_named(server):
    client = server.client()
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, max_tokens=80, temperature=0,
                                       tools=[WEATHER, TIME], tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_call(call, WEATHER if call.function.name == "get_weather" else TIME)
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, max_tokens=60, temperature=0.7,
                                       seed=1, tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    _check_call(choice.message.tool_calls[0], TIME)


def _streamed_calls(stream) -> tuple[list[dict], str, str]:
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        content += ch.delta.content or ""
        for d in ch.delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = d.id or entry["id"]
            if d.function is not None:
                entry["name"] = d.function.name or entry["name"]
                entry["arguments"] += d.function.arguments or ""
        finish = ch.finish_reason or finish
    return [calls[i] for i in sorted(calls)], content, finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls(server, tool_choice):
    stream = server.client().chat.completions.create(
        model="smollm2-135m-instruct", messages=ASK, max_tokens=80, temperature=0, tools=[WEATHER],
        tool_choice=tool_choice, stream=True)
    calls, content, finish = _streamed_calls(stream)
    assert finish == "tool_calls" and calls and content == ""
    for c in calls:
        assert c["id"].startswith("call_") and c["name"] == "get_weather"
        jsonschema.validate(json.loads(c["arguments"]), WEATHER["function"]["parameters"])


def test_tool_choice_auto_and_none(server):
    """auto: the model decides (a 135M model mostly answers in text); whatever it does comes back
    well formed. none: never a tool call. A conversation with an earlier call and its result works."""
    client = server.client()
    convo = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    for messages in (ASK, convo):
        for stream in (False, True):
            kw = dict(model="smollm2-135m-instruct", messages=messages, max_tokens=60, temperature=0,
                      tools=[WEATHER], tool_choice="auto")
            if stream:
                calls, content, finish = _streamed_calls(client.chat.completions.create(stream=True, **kw))
            else:
                msg = client.chat.completions.create(**kw).choices[0]
                finish, content = msg.finish_reason, msg.message.content or ""
                calls = [{"name": c.function.name, "arguments": c.function.arguments}
                         for c in msg.message.tool_calls or []]
            assert (finish == "tool_calls") == bool(calls)
            for c in calls:
                assert c["name"] == "get_weather"
                json.loads(c["arguments"])
            assert calls or content
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, max_tokens=20, temperature=0,
                                       tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"


@pytest.mark.parametrize(
    "extra, words",
    [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
         "nope"),
        (dict(response_format={"type": "xml"}), "response_format"),
        (dict(extra_body={"guided_regex": "(open"}), "regex"),
        (dict(extra_body={"guided_regex": "a", "guided_choice": ["b"]}), "at most one"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "nope"),
        (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "name"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]), "bogus"),
        (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "forced"),
    ],
)
def test_bad_constraints_and_tools_are_400_and_the_server_keeps_serving(server, extra, words):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, max_tokens=5, **extra)
    assert words in str(e.value)
    ok = client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, max_tokens=3)
    assert ok.choices[0].message.content
