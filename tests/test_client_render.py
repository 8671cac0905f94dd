"""The client package without a server: request building, error decoding, rendering,
config redaction and the CLI paths that need no connection."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2, json_format, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from toolchain_client import cli
from toolchain_client.aio import ErrorDetails, PhaseOptions, build_stage, error_details, status_code_name
from toolchain_client.cli import main, redact
from toolchain_client.render import (
    event_to_json,
    format_cancel,
    format_done,
    format_error,
    format_tool_table,
    format_tools,
    outcome_word,
    truncate,
)
from toolchain_proto.v1 import toolchain_pb2 as pb

# --- helpers ----------------------------------------------------------------------------


def ms(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(value * 1e6))
    return duration


def value(data: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(data, out)
    return out


def result(
    tool: str,
    outcome: pb.ToolOutcome.ValueType,
    *,
    arguments: str = "{}",
    output: Any = None,
    error: str = "",
    duration_ms: float = 0.0,
) -> pb.ToolCallResult:
    call = pb.ToolCallResult(
        call_id=f"call_{tool}", tool_name=tool, arguments=arguments, outcome=outcome, error=error
    )
    if output is not None:
        call.result.CopyFrom(value(output))
    call.duration.CopyFrom(ms(duration_ms))
    return call


def stats(
    model: str = "m", finish: str = "stop", usage: tuple[int, int] | None = None, duration: float = 0.0
) -> pb.PhaseStats:
    phase = pb.PhaseStats(model=model, finish_reason=finish)
    if usage is not None:
        phase.usage.CopyFrom(
            pb.Usage(prompt_tokens=usage[0], completion_tokens=usage[1], total_tokens=sum(usage))
        )
    phase.duration.CopyFrom(ms(duration))
    return phase


def packed(message: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def rich_trailer(code: grpc.StatusCode, message: str, *details: Any) -> tuple[tuple[str, str | bytes], ...]:
    status = status_pb2.Status(code=code.value[0], message=message, details=[packed(d) for d in details])
    return (("grpc-status-details-bin", status.SerializeToString()),)


# --- requests ---------------------------------------------------------------------------


def test_phase_options_sets_only_given_fields() -> None:
    only_tokens = PhaseOptions(max_tokens=64).to_proto()
    assert only_tokens.HasField("max_tokens") and only_tokens.max_tokens == 64
    assert not only_tokens.HasField("temperature")

    zero_temperature = PhaseOptions(temperature=0.0).to_proto()  # 0.0 is a value, not "unset"
    assert zero_temperature.HasField("temperature") and zero_temperature.temperature == 0.0
    assert not zero_temperature.HasField("max_tokens")

    empty = PhaseOptions().to_proto()
    assert not empty.HasField("max_tokens") and not empty.HasField("temperature")


def test_phase_options_is_frozen() -> None:
    options = PhaseOptions(max_tokens=1)
    with pytest.raises(AttributeError):
        options.max_tokens = 2  # type: ignore[misc]


def test_build_stage_copies_fields() -> None:
    stage = build_stage(
        "What is 2+3?",
        system_prompt="be brief",
        stage_id="s-1",
        model="m",
        backend="b",
        tools=("calculator", "current_time"),
        tool_phase=PhaseOptions(max_tokens=32),
    )
    assert stage.user_prompt == "What is 2+3?"
    assert (stage.system_prompt, stage.stage_id, stage.model, stage.backend) == ("be brief", "s-1", "m", "b")
    assert list(stage.tools) == ["calculator", "current_time"]
    assert stage.HasField("tool_phase")
    assert stage.tool_phase.max_tokens == 32 and not stage.tool_phase.HasField("temperature")
    assert not stage.HasField("synthesis_phase")


def test_build_stage_defaults_leave_everything_unset() -> None:
    stage = build_stage("hi")
    assert stage == pb.StageRequest(user_prompt="hi")
    assert not stage.HasField("tool_phase") and not stage.HasField("synthesis_phase")


def test_build_stage_accepts_proto_phase_options() -> None:
    stage = build_stage("hi", synthesis_phase=pb.PhaseOptions(temperature=0.5))
    assert stage.synthesis_phase.temperature == 0.5
    assert not stage.synthesis_phase.HasField("max_tokens")


# --- the tool table -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "word"),
    [
        (pb.TOOL_OUTCOME_OK, "ok"),
        (pb.TOOL_OUTCOME_INVALID_ARGUMENTS, "invalid arguments"),
        (pb.TOOL_OUTCOME_UNKNOWN_TOOL, "unknown tool"),
        (pb.TOOL_OUTCOME_FAILED, "failed"),
        (pb.TOOL_OUTCOME_TIMED_OUT, "timed out"),
        (pb.TOOL_OUTCOME_SKIPPED, "skipped"),
    ],
)
def test_outcome_words(outcome: pb.ToolOutcome.ValueType, word: str) -> None:
    assert outcome_word(outcome) == word
    table = format_tool_table([result("t", outcome)])
    assert f"  {word}  " in table.splitlines()[1]


def test_tool_table_rows() -> None:
    table = format_tool_table(
        [
            result(
                "calculator",
                pb.TOOL_OUTCOME_OK,
                arguments='{"expression": "2 + 3"}',
                output={"expression": "2 + 3", "result": 5},
                duration_ms=1.25,
            ),
            result(
                "get_weather",
                pb.TOOL_OUTCOME_INVALID_ARGUMENTS,
                arguments='{"city": ',
                error="arguments are not JSON",
            ),
            result("slow", pb.TOOL_OUTCOME_TIMED_OUT, error="timed out after 10 s", duration_ms=10_000),
        ]
    )
    header, *rows = table.splitlines()
    assert header.split() == ["#", "tool", "outcome", "ms", "arguments", "result", "/", "error"]
    assert len(rows) == 3
    assert rows[0].split(maxsplit=4) == [
        "1",
        "calculator",
        "ok",
        "1.2",  # 1.25 rounds half to even
        '{"expression":"2 + 3"}  {"expression":"2 + 3","result":5}',
    ]
    # arguments that are not JSON are shown as written; the error replaces the result
    assert rows[1].startswith("2  get_weather  invalid arguments")
    assert '{"city":' in rows[1] and rows[1].endswith("arguments are not JSON")
    assert "10000.0" in rows[2] and rows[2].endswith("timed out after 10 s")
    # fixed width: every row's columns start where the header's do
    assert {row.index("ok") for row in rows[:1]} == {header.index("outcome")}
    assert rows[2].index("timed out") == header.index("outcome")


def test_tool_table_truncates_long_cells() -> None:
    long_arguments = json.dumps({"text": "x" * 500})
    long_error = "boom " * 100
    table = format_tool_table(
        [result("echo", pb.TOOL_OUTCOME_FAILED, arguments=long_arguments, error=long_error)],
        arguments_width=30,
        result_width=20,
    )
    row = table.splitlines()[1]
    assert "\n" not in row
    assert '{"text":"xxxxxxxxxxxxxxxxxxxx…' in row
    assert row.endswith("boom boom boom boom…")
    assert len(row) < 30 + 20 + 60


def test_tool_table_flattens_newlines() -> None:
    table = format_tool_table([result("t", pb.TOOL_OUTCOME_FAILED, arguments="not\njson", error="a\nb")])
    assert " ".join(table.splitlines()[1].split()).endswith("failed 0.0 not json a b")


def test_tool_table_empty() -> None:
    assert format_tool_table([]) == "no tool calls"


def test_truncate() -> None:
    assert truncate("short", 10) == "short"
    assert truncate("0123456789", 10) == "0123456789"
    assert truncate("0123456789abc", 10) == "012345678…"
    assert truncate("a \n\t b", 10) == "a b"


# --- done, cancel, error ------------------------------------------------------------------


def test_done_with_both_phases() -> None:
    done = pb.Done(
        tool_phase=stats("small", "tool_calls", (120, 15), 312),
        synthesis_phase=stats("small", "stop", (200, 40), 500.4),
        text="5",
    )
    done.synthesis_phase.retries = 2
    tool, synthesis, total = format_done(done).splitlines()
    assert tool.split()[:2] == ["tool", "phase"]
    for part in (
        "model small",
        "finish tool_calls",
        "120 prompt / 15 completion tokens",
        "312 ms",
        "retries 0",
    ):
        assert part in tool
    for part in ("finish stop", "200 prompt / 40 completion tokens", "500 ms", "retries 2"):
        assert part in synthesis
    assert total.startswith("total")
    for part in ("320 prompt / 55 completion tokens", "812 ms", "retries 2"):
        assert part in total
    assert "partial" not in total


def test_done_usage_not_reported() -> None:
    done = pb.Done(
        tool_phase=stats("m", "tool_calls", None, 10), synthesis_phase=stats("m", "stop", (9, 3), 5)
    )
    tool, synthesis, total = format_done(done).splitlines()
    assert "usage not reported" in tool
    assert "9 prompt / 3 completion tokens" in synthesis
    assert "9 prompt / 3 completion tokens (partial)" in total

    nothing = format_done(pb.Done(tool_phase=stats("m", "stop", None, 1)))
    assert [line.split()[0] for line in nothing.splitlines()] == ["tool", "total"]
    assert all("usage not reported" in line for line in nothing.splitlines())


def test_done_tools_only_has_no_synthesis_row() -> None:
    lines = format_done(pb.Done(tool_phase=stats("m", "", (1, 1), 1))).splitlines()
    assert len(lines) == 2 and "synthesis" not in format_done(pb.Done(tool_phase=stats()))
    assert "finish ?" in lines[0]  # the backend never said


def test_format_cancel() -> None:
    text = format_cancel(pb.Cancel(reason=pb.CANCEL_REASON_CANCEL_STAGE, message="stopped by CancelStage"))
    assert text == "cancelled (CancelStage): stopped by CancelStage"
    assert format_cancel(pb.Cancel(reason=pb.CANCEL_REASON_DEADLINE)) == "cancelled (deadline)"
    assert "server shutdown" in format_cancel(pb.Cancel(reason=pb.CANCEL_REASON_SHUTDOWN))


def test_format_error_retryable() -> None:
    error = pb.StageError(
        code=grpc.StatusCode.UNAVAILABLE.value[0],
        message="the backend is unreachable",
        phase=pb.PHASE_SYNTHESIS,
        retryable=True,
        reason="BACKEND_UNAVAILABLE",
        retry_delay=ms(1500),
    )
    first, second = format_error(error).splitlines()
    assert first == "error UNAVAILABLE [BACKEND_UNAVAILABLE] in synthesis phase: the backend is unreachable"
    assert second == "retryable: yes, retry after 1.5 s"


def test_format_error_not_retryable_with_violations() -> None:
    error = pb.StageError(code=3, message="invalid request", reason="INVALID_REQUEST")
    lines = format_error(error, [("stage.user_prompt", "must not be empty")]).splitlines()
    assert lines == [
        "error INVALID_ARGUMENT [INVALID_REQUEST]: invalid request",
        "retryable: no",
        "  stage.user_prompt: must not be empty",
    ]


@pytest.mark.parametrize(
    ("code", "name"),
    [(0, "OK"), (1, "CANCELLED"), (4, "DEADLINE_EXCEEDED"), (13, "INTERNAL"), (99, "CODE_99")],
)
def test_status_code_names(code: int, name: str) -> None:
    assert status_code_name(code) == name


def test_format_tools() -> None:
    table = format_tools(
        [
            pb.Tool(
                name="calculator",
                description="Evaluate arithmetic.",
                timeout=duration_pb2.Duration(seconds=10),
            ),
            pb.Tool(
                name="get_weather",
                description="Weather " * 40,
                timeout=duration_pb2.Duration(seconds=2, nanos=500_000_000),
            ),
        ]
    )
    header, calculator, weather = table.splitlines()
    assert header.split() == ["name", "timeout", "description"]
    assert calculator.split(maxsplit=3) == ["calculator", "10", "s", "Evaluate arithmetic."]
    assert "2.5 s" in weather and weather.endswith("…")
    assert format_tools([]) == "no tools"


# --- JSON -----------------------------------------------------------------------------------


def test_event_to_json_is_one_line_with_proto_names() -> None:
    event = pb.StageEvent(
        stage_id="s-1",
        sequence=7,
        tool_summary=pb.ToolSummary(
            results=[result("calculator", pb.TOOL_OUTCOME_OK, output={"result": 5}, duration_ms=2)]
        ),
    )
    text = event_to_json(event)
    assert "\n" not in text
    data = json.loads(text)
    assert data["stage_id"] == "s-1" and data["sequence"] == 7  # uint32: a JSON number, not a string
    first = data["tool_summary"]["results"][0]
    assert first["tool_name"] == "calculator" and first["outcome"] == "TOOL_OUTCOME_OK"
    assert json_format.Parse(text, pb.StageEvent()) == event


# --- errors ---------------------------------------------------------------------------------


def test_error_details_from_aio_error() -> None:
    trailer = rich_trailer(
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid request",
        error_details_pb2.ErrorInfo(reason="INVALID_REQUEST", domain="toolchain.v1"),
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="stage.user_prompt", description="empty"),
                error_details_pb2.BadRequest.FieldViolation(field="stage.model", description="too long"),
            ]
        ),
    )
    err = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*trailer),
        "invalid request",
        None,
    )
    details = error_details(err)
    assert details == ErrorDetails(
        code=grpc.StatusCode.INVALID_ARGUMENT,
        message="invalid request",
        reason="INVALID_REQUEST",
        field_violations=[("stage.user_prompt", "empty"), ("stage.model", "too long")],
        retry_delay=None,
    )
    assert not details.retryable
    rendered = format_error(details.to_event(), details.field_violations)
    assert rendered.splitlines()[0] == "error INVALID_ARGUMENT [INVALID_REQUEST]: invalid request"
    assert "  stage.model: too long" in rendered


def test_error_details_retry_info() -> None:
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(2500)
    trailer = rich_trailer(
        grpc.StatusCode.UNAVAILABLE,
        "backend overloaded",
        error_details_pb2.ErrorInfo(reason="BACKEND_OVERLOADED", domain="toolchain.v1"),
        retry,
    )
    err = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*trailer),
        "backend overloaded",
        None,
    )
    details = error_details(err)
    assert (details.code, details.reason, details.retry_delay) == (
        grpc.StatusCode.UNAVAILABLE,
        "BACKEND_OVERLOADED",
        2.5,
    )
    assert details.retryable
    event = details.to_event()
    assert event.code == 14 and event.retryable and event.retry_delay.ToMilliseconds() == 2500
    assert "retry after 2.5 s" in format_error(event)


class _SyncCallError(grpc.RpcError, grpc.Call):
    """What a blocking call raises: an RpcError that is also a grpc.Call."""

    def __init__(self, code: grpc.StatusCode, message: str, trailer: Any) -> None:
        self._code, self._message, self._trailer = code, message, trailer

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def initial_metadata(self) -> Any:
        return ()

    def trailing_metadata(self) -> Any:
        return self._trailer

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def test_error_details_from_sync_error() -> None:
    trailer = rich_trailer(
        grpc.StatusCode.NOT_FOUND,
        "no backend named 'x'",
        error_details_pb2.ErrorInfo(reason="NOT_FOUND", domain="toolchain.v1"),
    )
    details = error_details(_SyncCallError(grpc.StatusCode.NOT_FOUND, "no backend named 'x'", trailer))
    assert (details.code, details.message, details.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "no backend named 'x'",
        "NOT_FOUND",
    )
    # a trailer whose code disagrees with the call's makes from_call raise: the trailer wins
    details = error_details(_SyncCallError(grpc.StatusCode.UNKNOWN, "other", trailer))
    assert details.code == grpc.StatusCode.NOT_FOUND and details.reason == "NOT_FOUND"


def test_error_details_without_trailer() -> None:
    err = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "failed to connect", None
    )
    details = error_details(err)
    assert details == ErrorDetails(grpc.StatusCode.UNAVAILABLE, "failed to connect")
    assert details.retryable  # UNAVAILABLE without RetryInfo still invites a retry
    assert format_error(details.to_event()).splitlines()[0] == "error UNAVAILABLE: failed to connect"

    bare = error_details(grpc.RpcError("no call behind it"))
    assert bare.code == grpc.StatusCode.UNKNOWN and bare.reason == ""


# --- redaction, logging -----------------------------------------------------------------------


def test_redact_secret_keys() -> None:
    settings: dict[str, Any] = {
        "address": "127.0.0.1:50051",
        "tool_phase": {"max_tokens": 256, "temperature": 0.0},
        "max_tokens_ceiling": 8192,
        "backends": {
            "vllm": {
                "api_key_env": "VLLM_API_KEY",
                "extra_body": {"api_key": "sk-123", "Access-Token": "t", "nested": [{"password": "p"}]},
                "client_secret": "s",
                "SessionToken": "x",
                "ssh_key": "",
            }
        },
    }
    out = redact(settings)
    assert out["address"] == "127.0.0.1:50051"
    assert out["tool_phase"] == {"max_tokens": 256, "temperature": 0.0}
    assert out["max_tokens_ceiling"] == 8192
    backend = out["backends"]["vllm"]
    assert backend["api_key_env"] == "VLLM_API_KEY"
    assert backend["extra_body"] == {
        "api_key": "<redacted>",
        "Access-Token": "<redacted>",
        "nested": [{"password": "<redacted>"}],
    }
    assert backend["client_secret"] == "<redacted>" and backend["SessionToken"] == "<redacted>"
    assert backend["ssh_key"] == ""  # empty stays visible: nothing to hide
    assert settings["backends"]["vllm"]["client_secret"] == "s"  # a copy, the input is untouched


# --- CLI without a server -----------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("TOOLCHAIN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TOOLCHAIN_CONFIG_FILE", "")  # restored (removed) after the test
    return monkeypatch


def test_cli_print_config(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "toolchain.toml"
    config.write_text(
        'default_backend = "remote"\n'
        "[backends.remote]\n"
        'base_url = "http://127.0.0.1:9/v1"\n'
        'api_key_env = "REMOTE_KEY"\n'
        'extra_body = { secret_token = "hunter2" }\n'
    )
    code = main(["serve", "--config", str(config), "--address", "127.0.0.1:6000", "--print-config"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["address"] == "127.0.0.1:6000"
    assert printed["default_backend"] == "remote"
    remote = printed["backends"]["remote"]
    assert remote["api_key_env"] == "REMOTE_KEY"
    assert remote["extra_body"] == {"secret_token": "<redacted>"}
    assert printed["tool_phase"]["max_tokens"] == 256


def test_cli_config_error_exits_2(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--config", str(tmp_path / "missing.toml"), "--print-config"]) == 2
    assert "no such file" in capsys.readouterr().err

    clean_env.setenv("TOOLCHAIN_CONFIG_FILE", "")
    clean_env.setenv("TOOLCHAIN_MAX_CONCURRENT_STAGES", "0")
    assert main(["serve", "--print-config"]) == 2
    assert "max_concurrent_stages" in capsys.readouterr().err


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["run", "   "]) == 2
    assert "empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--timeout", "-1", "hi"])
    assert exit_info.value.code == 2


def test_stream_printer_shows_tool_calls_once_per_index() -> None:
    out = io.StringIO()
    printer = cli._StreamPrinter(out, dim=False)
    tool = pb.PHASE_TOOL
    printer.chunk(pb.Chunk(phase=tool, tool_calls=[pb.ToolCallDelta(index=0, id="c0", name="calculator")]))
    for fragment in ('{"expression"', ': "2+3"}'):
        printer.chunk(
            pb.Chunk(phase=tool, tool_calls=[pb.ToolCallDelta(index=0, arguments_fragment=fragment)])
        )
    printer.chunk(
        pb.Chunk(
            phase=tool, tool_calls=[pb.ToolCallDelta(index=1, name="current_time", arguments_fragment="{}")]
        )
    )
    printer.chunk(pb.Chunk(phase=pb.PHASE_SYNTHESIS, content="The answer "))
    printer.chunk(pb.Chunk(phase=pb.PHASE_SYNTHESIS, content="is 5."))
    printer.end_line()
    assert out.getvalue().splitlines() == [
        "── tool phase ──",
        '→ calculator({"expression": "2+3"})',
        "→ current_time({})",
        "── synthesis ──",
        "The answer is 5.",
    ]
