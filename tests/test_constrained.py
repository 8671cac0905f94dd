"""The envelope of constrained tool calls: its schema, its prompt, and its decoder.

The decoder is fed the model's output in every possible split (one character at a time,
pairs, odd sizes, whole), because a stream may cut anywhere: inside an escape, a surrogate
pair, the name, or between the arguments' closing brace and the envelope's."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError
from toolchain_service.backends.constrained import (
    EnvelopeDecoder,
    envelope_schema,
    grammar_schema,
    tool_phase_messages,
    tool_schemas,
)
from toolchain_service.config import ToolSettings
from toolchain_service.tools.builtin import builtin_tools
from toolchain_service.tools.registry import ToolRegistry
from toolchain_service.tools.weather import WeatherArgs

SPLITS = (1, 2, 3, 5, 7, 11, 1000)


def _decode(output: str, size: int) -> tuple[str, str, str, list[str]]:
    """(text, call name, arguments, call ids) from `output` fed `size` characters at a time."""
    decoder = EnvelopeDecoder()
    text, name, arguments, ids = "", "", "", []
    pieces = [output[i : i + size] for i in range(0, len(output), size)]
    for piece, last in [(p, False) for p in pieces] + [("", True)]:
        got, deltas = decoder.finish() if last else decoder.feed(piece)
        text += got
        for delta in deltas:
            assert delta.index == 0
            if delta.id:
                ids.append(delta.id)
            name = name or delta.name
            arguments += delta.arguments
    return text, name, arguments, ids


@pytest.mark.parametrize("size", SPLITS)
def test_a_text_answer_is_decoded_whatever_the_split(size: int) -> None:
    answer = 'He said "hi" \\ \u00e9\U0001f600 and a\nnewline'
    text, name, arguments, ids = _decode("  " + json.dumps(answer) + " ", size)
    assert (text, name, arguments, ids) == (answer, "", "", [])


@pytest.mark.parametrize("size", SPLITS)
def test_a_call_streams_its_name_once_and_its_arguments_exactly(size: int) -> None:
    arguments = '{\n  "expression": "(1 + 2) } {",\n  "nested": {"a": [1, {"b": "}"}]}\n}'
    output = f'{{ "name": "calculator",\n "arguments": {arguments} \n}}  '
    text, name, got, ids = _decode(output, size)
    assert (text, name, got) == ("", "calculator", arguments)
    assert len(ids) == 1 and ids[0].startswith("call_")


@pytest.mark.parametrize("size", SPLITS)
def test_a_call_cut_by_max_tokens_keeps_what_was_written(size: int) -> None:
    text, name, arguments, _ = _decode('{"name": "calculator", "arguments": {"expression": "12', size)
    assert (text, name, arguments) == ("", "calculator", '{"expression": "12')
    _, name, arguments, ids = _decode('{"name": "calc', size)
    assert (name, arguments, len(ids)) == ("calc", "", 1)


def test_output_that_is_not_the_envelope_passes_through_as_text() -> None:
    assert _decode("plain words", 3)[0] == "plain words"
    assert _decode("", 3) == ("", "", "", [])


def test_grammar_schema_bounds_numbers_as_integers_and_drops_optional_nulls() -> None:
    schema = {
        "type": "object",
        "title": "Args",
        "properties": {
            "lat": {"anyOf": [{"type": "number", "minimum": -90.5, "maximum": 90}, {"type": "null"}]},
            "x": {"type": "number"},
            "req": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "kept nullable"},
        },
        "required": ["req"],
    }
    assert grammar_schema(schema) == {
        "type": "object",
        "properties": {
            "lat": {"type": "integer", "minimum": -90, "maximum": 90},
            "x": {"type": "number"},
            "req": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["req"],
        "additionalProperties": False,
    }


def _registry() -> ToolRegistry:
    settings = ToolSettings()
    return ToolRegistry(builtin_tools(settings), settings)


def test_the_envelope_offers_each_enabled_tool_and_a_string() -> None:
    registry = _registry()
    enabled = ("calculator", "get_weather")
    tools = tool_schemas(registry.specs(enabled), registry.hints(enabled))
    options = envelope_schema(tools)["anyOf"]
    assert [o.get("properties", {}).get("name") for o in options] == [
        {"const": "calculator"},
        {"const": "get_weather"},
        None,
    ]
    assert options[-1] == {"type": "string"}
    assert all(o.get("additionalProperties") is False for o in options[:-1])


@pytest.mark.parametrize(
    "arguments",
    [{"city": "Paris"}, {"city": "Oslo", "unit": "fahrenheit"}, {"latitude": -90, "longitude": 180}],
)
def test_weathers_grammar_admits_valid_arguments(arguments: dict[str, Any]) -> None:
    WeatherArgs.model_validate_json(json.dumps(arguments))


@pytest.mark.parametrize("arguments", [{}, {"latitude": 10}, {"unit": "celsius"}])
def test_what_weathers_grammar_leaves_out_is_what_validation_refuses(arguments: dict[str, Any]) -> None:
    # Each branch of get_weather's grammar schema requires a city or both coordinates:
    # exactly the cross-field rule its parameters schema cannot say.
    schema = _registry().hints(("get_weather",))["get_weather"].grammar
    assert schema is not None
    branches = schema["anyOf"]
    assert not any(set(b["required"]) <= set(arguments) for b in branches)
    with pytest.raises(ValidationError):
        WeatherArgs.model_validate_json(json.dumps(arguments))


def test_the_tool_prompt_shows_worked_examples_before_the_callers_turns() -> None:
    registry = _registry()
    enabled = registry.names()
    tools = tool_schemas(registry.specs(enabled), registry.hints(enabled))
    caller = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    messages = tool_phase_messages(caller, tools)
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("Be brief.\n\nYou can use these tools:")
    assert messages[-1] == caller[-1]
    examples = messages[1:-1]
    assert [m["role"] for m in examples] == ["user", "assistant"] * (len(enabled) + 2)
    calls = [json.loads(m["content"]) for m in examples if m["role"] == "assistant"]
    assert isinstance(calls[0], str) and isinstance(calls[-1], str)  # text answers around the calls
    assert [c["name"] for c in calls[1:-1]] == list(enabled)
    for call in calls[1:-1]:  # every worked example is a valid call of its tool
        tool = registry.get(call["name"])
        assert tool is not None
        tool.Arguments.model_validate_json(json.dumps(call["arguments"]))
