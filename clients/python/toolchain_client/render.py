"""Render toolchain.v1 events for people (fixed-width text) and for programs (JSON).

Pure functions: messages in, strings out (no trailing newline, no colour).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from google.protobuf import duration_pb2, json_format, message, struct_pb2
from toolchain_proto.v1 import toolchain_pb2 as pb

from toolchain_client.aio import status_code_name

__all__ = [
    "OUTCOME_WORDS",
    "duration_ms",
    "event_to_json",
    "format_cancel",
    "format_done",
    "format_error",
    "format_tool_table",
    "format_tools",
    "message_to_json",
    "outcome_word",
    "truncate",
]

OUTCOME_WORDS: dict[int, str] = {
    pb.TOOL_OUTCOME_UNSPECIFIED: "unspecified",
    pb.TOOL_OUTCOME_OK: "ok",
    pb.TOOL_OUTCOME_INVALID_ARGUMENTS: "invalid arguments",
    pb.TOOL_OUTCOME_UNKNOWN_TOOL: "unknown tool",
    pb.TOOL_OUTCOME_FAILED: "failed",
    pb.TOOL_OUTCOME_TIMED_OUT: "timed out",
    pb.TOOL_OUTCOME_SKIPPED: "skipped",
}

_PHASE_WORDS: dict[int, str] = {
    pb.PHASE_UNSPECIFIED: "",
    pb.PHASE_TOOL: "tool phase",
    pb.PHASE_SYNTHESIS: "synthesis phase",
}

_CANCEL_WORDS: dict[int, str] = {
    pb.CANCEL_REASON_UNSPECIFIED: "unspecified",
    pb.CANCEL_REASON_CLIENT: "client",
    pb.CANCEL_REASON_CANCEL_STAGE: "CancelStage",
    pb.CANCEL_REASON_DEADLINE: "deadline",
    pb.CANCEL_REASON_SHUTDOWN: "server shutdown",
}

_SPACE = re.compile(r"\s+")


def outcome_word(outcome: int) -> str:
    """`ok`, `invalid arguments`, `unknown tool`, `failed`, `timed out`, `skipped`."""
    return OUTCOME_WORDS.get(outcome, f"outcome {outcome}")


def duration_ms(duration: duration_pb2.Duration) -> float:
    return duration.seconds * 1000 + duration.nanos / 1e6


def truncate(text: str, width: int) -> str:
    """One line of at most `width` characters; an ellipsis marks what was cut."""
    text = _SPACE.sub(" ", text).strip()
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _compact(data: object, *, sort_keys: bool = False) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)


def _compact_arguments(arguments: str) -> str:
    """The model's arguments as compact JSON when they are JSON, else as written."""
    try:
        return _compact(json.loads(arguments))
    except ValueError:
        return arguments


def _integral(data: object) -> object:
    """protobuf Values hold every number as a double: show 5.0 as 5."""
    if isinstance(data, float) and data.is_integer() and abs(data) < 2**53:
        return int(data)
    if isinstance(data, dict):
        return {key: _integral(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_integral(item) for item in data]
    return data


def _value_json(value: struct_pb2.Value) -> str:
    # a Struct's keys have no order on the wire: sort them so the same result reads the same
    return _compact(_integral(json.loads(json_format.MessageToJson(value, indent=None))), sort_keys=True)


def _table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell, two spaces apart; `right` columns align right.
    The last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if i == len(row) - 1 and i not in right:
                cells.append(cell)
            elif i in right:
                cells.append(cell.rjust(widths[i]))
            else:
                cells.append(cell.ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_tool_table(
    results: Sequence[pb.ToolCallResult], *, arguments_width: int = 40, result_width: int = 60
) -> str:
    """One row per tool call: #, tool, outcome, duration ms, arguments, result or error."""
    if not results:
        return "no tool calls"
    rows: list[list[str]] = [["#", "tool", "outcome", "ms", "arguments", "result / error"]]
    for number, result in enumerate(results, 1):
        if result.outcome == pb.TOOL_OUTCOME_OK and result.HasField("result"):
            shown = _value_json(result.result)
        else:
            shown = result.error
        rows.append(
            [
                str(number),
                truncate(result.tool_name, 32) or "?",
                outcome_word(result.outcome),
                f"{duration_ms(result.duration):.1f}",
                truncate(_compact_arguments(result.arguments), arguments_width),
                truncate(shown, result_width),
            ]
        )
    return _table(rows, right=(0, 3))


def _tokens(usage: pb.Usage) -> str:
    return f"{usage.prompt_tokens} prompt / {usage.completion_tokens} completion tokens"


def format_done(done: pb.Done) -> str:
    """Per phase: model, finish reason, tokens (or "usage not reported"), duration ms,
    retries; then the totals."""
    phases = [
        (name, stats)
        for name, stats, present in (
            ("tool phase", done.tool_phase, done.HasField("tool_phase")),
            ("synthesis", done.synthesis_phase, done.HasField("synthesis_phase")),
        )
        if present
    ]
    rows: list[list[str]] = []
    prompt = completion = retries = 0
    total_ms = 0.0
    reported = 0
    for name, stats in phases:
        if stats.HasField("usage"):
            tokens = _tokens(stats.usage)
            prompt += stats.usage.prompt_tokens
            completion += stats.usage.completion_tokens
            reported += 1
        else:
            tokens = "usage not reported"
        ms = duration_ms(stats.duration)
        total_ms += ms
        retries += stats.retries
        rows.append(
            [
                name,
                f"model {stats.model or '?'}",
                f"finish {stats.finish_reason or '?'}",
                tokens,
                f"{ms:.0f} ms",
                f"retries {stats.retries}",
            ]
        )
    if reported == 0:
        total_tokens = "usage not reported"
    else:
        total_tokens = _tokens(pb.Usage(prompt_tokens=prompt, completion_tokens=completion))
        if reported < len(phases):
            total_tokens += " (partial)"
    rows.append(["total", "", "", total_tokens, f"{total_ms:.0f} ms", f"retries {retries}"])
    return _table(rows, right=(4,))


def format_cancel(cancel: pb.Cancel) -> str:
    """`cancelled (CancelStage): <message>`."""
    reason = _CANCEL_WORDS.get(cancel.reason, f"reason {cancel.reason}")
    text = f"cancelled ({reason})"
    return f"{text}: {cancel.message}" if cancel.message else text


def format_error(error: pb.StageError, field_violations: Sequence[tuple[str, str]] = ()) -> str:
    """`error UNAVAILABLE [BACKEND_UNAVAILABLE] in tool phase: <message>`, then whether a
    retry can help (and when), then one line per invalid request field."""
    head = f"error {status_code_name(error.code)}"
    if error.reason:
        head += f" [{error.reason}]"
    phase = _PHASE_WORDS.get(error.phase, "")
    if phase:
        head += f" in {phase}"
    lines = [f"{head}: {error.message}" if error.message else head]
    if error.retryable:
        if error.HasField("retry_delay"):
            lines.append(f"retryable: yes, retry after {duration_ms(error.retry_delay) / 1000:g} s")
        else:
            lines.append("retryable: yes")
    else:
        lines.append("retryable: no")
    lines.extend(f"  {name}: {description}" for name, description in field_violations)
    return "\n".join(lines)


def format_tools(tools: Sequence[pb.Tool], *, description_width: int = 80) -> str:
    """One row per tool: name, timeout, description."""
    if not tools:
        return "no tools"
    rows = [["name", "timeout", "description"]]
    rows.extend(
        [
            tool.name,
            f"{tool.timeout.ToNanoseconds() / 1e9:g} s",
            truncate(tool.description, description_width),
        ]
        for tool in tools
    )
    return _table(rows, right=(1,))


def message_to_json(msg: message.Message) -> str:
    """One line of JSON with the proto field names."""
    return json_format.MessageToJson(msg, indent=None, preserving_proto_field_name=True)


def event_to_json(event: pb.StageEvent) -> str:
    """One event as one line of JSON with the proto field names."""
    return json_format.MessageToJson(event, indent=None, preserving_proto_field_name=True)
