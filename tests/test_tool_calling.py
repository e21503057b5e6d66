"""Tool calling without a model: tool and tool_choice validation, the parsers of each template
family, the prompt for templates with and without tools, and streaming of tool-call deltas."""

from __future__ import annotations

import json

import pytest

from paged_backend import ToolCalling, ToolCallStream

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}

HERMES_TEMPLATE = "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %} ... <tool_call> ..."
LLAMA3_TEMPLATE = "{% if tools %}Environment: ipython{% endif %} <|python_tag|> {{ tools }}"
MISTRAL_TEMPLATE = "{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"


@pytest.mark.parametrize(
    "tools, choice, words",
    [
        ([{"type": "function", "function": {"description": "x"}}], None, "name"),
        ([{"name": "bad name!"}], None, "name"),
        ([{"name": "f", "parameters": {"type": "wrong"}}], None, "wrong"),
        ([{"name": "f", "parameters": [1]}], None, "JSON schema"),
        ([{"type": "retrieval"}], None, "function"),
        ([WEATHER, WEATHER], None, "unique"),
        ("not a list", None, "list"),
        ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "get_time"),
        ([WEATHER], "sometimes", "tool_choice"),
        ([], "required", "at least one tool"),
    ],
)
def test_bad_tools_and_tool_choice(tools, choice, words):
    with pytest.raises(ValueError) as e:
        ToolCalling(tools, choice)
    assert words in str(e.value)


def test_forced_calls_are_constraints_and_parse():
    named = ToolCalling([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert named.structured.json == WEATHER["function"]["parameters"]
    content, calls = named.parse('{"city": "Oslo"}')
    assert content is None and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}
    required = ToolCalling([WEATHER, TIME], "required", parallel_tool_calls=False)
    schema = required.structured.json
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    _, calls = required.parse('[{"name": "get_time", "arguments": {"tz": "UTC"}}]')
    assert [c.name for c in calls] == ["get_time"] and calls[0].id.startswith("call_")
    assert required.parse('[{"name": "get_ti')[1] == []  # cut by max_tokens: no call, the text is content
    assert ToolCalling([WEATHER], "auto").structured is None and not ToolCalling([WEATHER], "none").active


@pytest.mark.parametrize(
    "template, text, expected_content, expected",
    [
        (HERMES_TEMPLATE, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
         '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>', "Let me check.",
         [("get_weather", {"city": "Rome"}), ("get_time", {"tz": "CET"})]),
        (None, '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>', None,
         [("get_weather", {"city": "Rome"})]),
        (LLAMA3_TEMPLATE, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', None,
         [("get_weather", {"city": "Rome"})]),
        (LLAMA3_TEMPLATE, '{"name": "get_weather", "parameters": {"city": "A"}}; {"name": "get_time", "parameters": {}}',
         None, [("get_weather", {"city": "A"}), ("get_time", {})]),
        (MISTRAL_TEMPLATE, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}]', None,
         [("get_weather", {"city": "Rome"})]),
        (HERMES_TEMPLATE, "It is sunny in Rome.", "It is sunny in Rome.", []),
        (LLAMA3_TEMPLATE, "{not json at all", "{not json at all", []),
        (HERMES_TEMPLATE, "<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),
        (HERMES_TEMPLATE, '<tool_call>{"name": "unknown_fn", "arguments": {}}</tool_call>',
         '<tool_call>{"name": "unknown_fn", "arguments": {}}</tool_call>', []),
    ],
)
def test_auto_parsers_by_template(template, text, expected_content, expected):
    calling = ToolCalling([WEATHER, TIME], "auto", chat_template=template)
    content, calls = calling.parse(text)
    assert content == expected_content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected


def test_prompt_with_and_without_template_tools():
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    own = ToolCalling([WEATHER], "auto", chat_template="{{ messages }}")  # a template that takes no tools
    messages, tools = own.prepare(convo)
    assert tools is None and messages[0]["content"].startswith("Be brief.") and "<tools>" in messages[0]["content"]
    assert '"name": "get_weather"' in messages[2]["content"] and "tool_calls" not in messages[2]
    native = ToolCalling([WEATHER], "auto", chat_template=HERMES_TEMPLATE)
    messages, tools = native.prepare(convo)
    assert tools == [WEATHER] and messages[2]["tool_calls"] and messages[2]["content"] == ""


def _run_stream(calling, text, step=3):
    stream, content, deltas = ToolCallStream(calling), "", []
    for i in range(0, len(text), step):
        c, d = stream.feed(text[i:i + step])
        content, deltas = content + c, deltas + d
    c, d = stream.finish()
    return content + c, deltas + d, stream.num_calls


def test_streaming_auto_holds_back_only_what_may_be_a_call():
    calling = ToolCalling([WEATHER], "auto", chat_template=HERMES_TEMPLATE)
    text = 'Checking <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    content, deltas, n = _run_stream(calling, text)
    assert content == "Checking " and n == 1
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'} and deltas[0]["index"] == 0
    content, deltas, n = _run_stream(calling, "No call here, a < sign and <tool", step=2)
    assert content == "No call here, a < sign and <tool" and not deltas and n == 0


def test_streaming_named_call_streams_its_arguments():
    calling = ToolCalling([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    content, deltas, n = _run_stream(calling, '{"city": "Rome"}', step=4)
    assert content == "" and n == 1
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"]["name"] == "get_weather"
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city": "Rome"}'
    assert all("id" not in d for d in deltas[1:])
