"""Tool calls written in the content are read by the parser the backend is configured
with, each parser tested on recorded model output (tests/data/model_outputs/, every
sample naming where it came from); a model's plain JSON answer is never a call, under any
parser or default; malformed markup is reported, never executed."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from toolchain_service.backends.registry import build_backend
from toolchain_service.config import BackendSettings, ConfigError, ToolSettings, load_settings
from toolchain_service.events import ToolOutcome
from toolchain_service.toolcalls import PARSERS, parse_content_calls, parser_problem
from toolchain_service.tools.registry import ToolRegistry

from tests.fakes.server_process import run_serve, serve_env
from tests.fakes.tools import Echo

DATA = Path(__file__).parent / "data" / "model_outputs"
KINDS = ("openai", "local")


def kind_default(kind: str) -> str:
    fields: dict[str, Any] = {"kind": kind}
    if kind == "openai":
        fields["base_url"] = "http://127.0.0.1:1/v1"
    return BackendSettings(**fields).effective_tool_parser()


def load(name: str) -> dict[str, Any]:
    with (DATA / f"{name}.toml").open("rb") as file:
        return tomllib.load(file)


def recorded_samples() -> list[Any]:
    samples = []
    for name in ("hermes", "mistral", "llama3_json", "pythonic"):
        data = load(name)
        for sample in data["sample"]:
            samples.append(pytest.param(data["parser"], sample, id=f"{name}:{sample['id']}"))
    return samples


PLAIN = load("plain_answers")
EVERY_PARSER = sorted({*PARSERS, *(kind_default(k) for k in KINDS), "hermes+json", "mistral+json"})


def arguments_of(expected: dict[str, Any] | str) -> Any:
    return json.loads(expected) if isinstance(expected, str) else expected


@pytest.mark.parametrize(("parser", "sample"), recorded_samples())
def test_each_parser_reads_recorded_model_output(parser: str, sample: dict[str, Any]) -> None:
    calls, text = parse_content_calls(sample["output"], parser, sample["offered"])
    expected = sample.get("calls", [])
    problems = sample.get("problems", [])
    assert len(calls) == len(expected) + len(problems), calls
    for position, (call, want) in enumerate(zip(calls, expected, strict=False)):
        assert call.problem == ""
        assert call.name == want["name"]
        assert json.loads(call.arguments) == arguments_of(want["arguments"])
        assert call.id == f"call_{position}"
    for call, want in zip(calls[len(expected) :], problems, strict=True):
        assert want["problem"] in call.problem
        assert call.name == want["name"]
    assert text == sample["text"]


@pytest.mark.parametrize("parser", EVERY_PARSER)
@pytest.mark.parametrize("sample", PLAIN["sample"], ids=[s["id"] for s in PLAIN["sample"]])
def test_plain_answers_are_never_calls_under_any_parser(parser: str, sample: dict[str, Any]) -> None:
    calls, text = parse_content_calls(sample["output"], parser, PLAIN["offered"])
    assert calls == []
    assert text == sample["output"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_paris_answer_is_not_a_call_under_each_kinds_default(kind: str) -> None:
    paris = '{"name": "Paris", "country": "France"}'
    # Even with a tool named Paris offered: a call needs arguments.
    assert parse_content_calls(paris, kind_default(kind), ["Paris", "calculator"]) == ([], paris)


def test_defaults_per_kind() -> None:
    assert kind_default("openai") == "hermes+json"
    assert kind_default("local") == "native"


async def test_backends_expose_their_parser() -> None:
    configured = BackendSettings(base_url="http://127.0.0.1:1/v1", tool_parser="llama3_json")
    defaulted = BackendSettings(base_url="http://127.0.0.1:1/v1")
    for settings, expected in [(configured, "llama3_json"), (defaulted, "hermes+json")]:
        backend = build_backend("b", settings)
        try:
            assert backend.info.tool_parser == expected
        finally:
            await backend.aclose()


def test_native_reads_no_call_from_the_content() -> None:
    text = '<tool_call>{"name": "echo", "arguments": {"text": "x"}}</tool_call>'
    assert parse_content_calls(text, "native", ["echo"]) == ([], text)


def test_json_needs_arguments_and_an_offered_name() -> None:
    call = '{"name": "calculator", "arguments": {"expression": "2+3"}}'
    ((found,), rest) = parse_content_calls(call, "json", ["calculator"])
    assert (found.name, json.loads(found.arguments), rest) == ("calculator", {"expression": "2+3"}, "")
    assert parse_content_calls(call, "json", ["echo"]).calls == []  # not offered: an answer
    assert parse_content_calls('{"name": "calculator"}', "json", ["calculator"]).calls == []
    # Arguments as a string count only when the string is a JSON object.
    assert (
        parse_content_calls('{"name": "calculator", "arguments": "2+3"}', "json", ["calculator"]).calls == []
    )


def test_json_reads_an_openai_shaped_call_and_keeps_its_id_and_the_text_after_it() -> None:
    text = (
        '{"id": "call_abc", "type": "function", "function": {"name": "echo", "arguments": '
        '"{\\"text\\": \\"hi\\"}"}}\nI asked the echo tool.'
    )
    ((call,), rest) = parse_content_calls(text, "json", ["echo"])
    assert (call.id, call.name, call.arguments) == ("call_abc", "echo", '{"text": "hi"}')
    assert rest == "I asked the echo tool."


def test_json_call_cut_short_is_reported_not_shown_as_the_answer() -> None:
    ((call,), rest) = parse_content_calls('{"name": "echo", "arguments": {"text": "hel', "json", ["echo"])
    assert (call.name, rest) == ("echo", "")
    assert "not valid JSON" in call.problem


def test_a_list_is_calls_only_when_every_item_is_a_call_to_an_offered_tool() -> None:
    both = '[{"name": "echo", "arguments": {"text": "a"}}, {"name": "calculator", "arguments": {}}]'
    assert [c.name for c in parse_content_calls(both, "json", ["echo", "calculator"]).calls] == [
        "echo",
        "calculator",
    ]
    assert parse_content_calls(both, "json", ["echo"]).calls == []


def test_chains_try_each_parser_in_order() -> None:
    # Mistral 7B v0.3's list, the [TOOL_CALLS] mark skipped by the server as a special token.
    stripped = '[{"name": "get_current_weather", "arguments": {"city": "Paris"}}]'
    assert parse_content_calls(stripped, "mistral", ["get_current_weather"]).calls == []
    ((call,), _) = parse_content_calls(stripped, "mistral+json", ["get_current_weather"])
    assert call.name == "get_current_weather"
    hermes = '<tool_call>{"name": "unknown_tool", "arguments": {}}</tool_call>'
    ((marked,), _) = parse_content_calls(hermes, "hermes+json", ["echo"])
    assert marked.name == "unknown_tool"  # markup is a call whatever the name: UNKNOWN_TOOL later


def test_hermes_tags_named_in_prose_stay_text() -> None:
    text = "Use <tool_call> and </tool_call> around a call."
    assert parse_content_calls(text, "hermes", ["echo"]) == ([], text)


def test_hermes_block_without_a_name_is_reported() -> None:
    ((call,), _) = parse_content_calls('<tool_call>{"arguments": {}}</tool_call>', "hermes", ["echo"])
    assert 'no string "name"' in call.problem


def test_pythonic_arguments_are_never_evaluated() -> None:
    text = '[echo(text=open("/etc/passwd").read())]'
    ((call,), _) = parse_content_calls(text, "pythonic", ["echo"])
    assert "not a literal value" in call.problem
    ((positional,), _) = parse_content_calls('[echo("hi")]', "pythonic", ["echo"])
    assert "name=value" in positional.problem


async def test_malformed_calls_are_reported_and_never_executed() -> None:
    echo = Echo()
    registry = ToolRegistry([echo], ToolSettings())
    outputs = [
        ("hermes", '<tool_call>\n{"name": "echo", "arguments": {"text": "unclosed"}}'),
        ("hermes", '<tool_call>{"name": "echo", "arguments": {"text": }</tool_call>'),
        ("mistral", '[TOOL_CALLS] [{"name": "echo", "arguments": {"text": "cut'),
        ("mistral", '[TOOL_CALLS]echo{"text": "cut'),
        ("llama3_json", '<|python_tag|>echo.call(text="x")'),
        ("pythonic", '[echo(text="cut'),
        ("json", '{"name": "echo", "arguments": {"text": "cut'),
    ]
    for parser, text in outputs:
        calls, _ = parse_content_calls(text, parser, ["echo"])
        assert calls and all(c.problem for c in calls), (parser, text)
        results = await registry.run(calls, ["echo"])
        assert [r.outcome for r in results] == [ToolOutcome.INVALID_ARGUMENTS] * len(calls)
        assert results[0].error == calls[0].problem
    assert echo.calls == []


def test_parser_names_are_checked() -> None:
    assert parser_problem("hermes+json") == ""
    assert "unknown tool parser 'qwen'" in parser_problem("qwen")
    assert "twice" in parser_problem("json+json")
    assert "cannot be combined" in parser_problem("native+json")
    with pytest.raises(ValueError, match="unknown tool parser"):
        parse_content_calls("{}", "nope", [])


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        (
            {"base_url": "http://127.0.0.1:1/v1", "tool_parser": "qwen"},
            "backends.x.tool_parser: unknown tool parser 'qwen'",
        ),
        ({"base_url": "http://127.0.0.1:1/v1", "tool_parser": ""}, "backends.x.tool_parser: unknown"),
        ({"kind": "local", "tool_parser": "json"}, "backends.x.tool_parser: the local backend"),
    ],
)
def test_a_bad_tool_parser_is_a_configuration_error_naming_the_key(
    backend: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(default_backend="x", backends={"x": backend})
    assert expected in str(caught.value)


async def test_serve_exits_2_with_one_line_naming_the_bad_tool_parser() -> None:
    env = serve_env(
        DEFAULT_BACKEND="x",
        BACKENDS=json.dumps({"x": {"base_url": "http://127.0.0.1:1/v1", "tool_parser": "hermes+qwen"}}),
    )
    code, out, err = await run_serve(env)
    assert (code, out) == (2, "")
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "backends.x.tool_parser: unknown tool parser 'qwen'" in lines[0]
