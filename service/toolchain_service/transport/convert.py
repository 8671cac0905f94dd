"""Domain events to toolchain.v1 messages, and streams folded into unary responses."""

from __future__ import annotations

from typing import Any

from google.protobuf import duration_pb2, struct_pb2
from google.rpc import error_details_pb2
from toolchain_proto.v1 import toolchain_pb2 as pb

from toolchain_service.errors import InvalidRequest, StageError
from toolchain_service.events import (
    CancelEvent,
    ChunkEvent,
    DoneEvent,
    ErrorEvent,
    Phase,
    PhaseStats,
    StageEvent,
    ToolCallResult,
    ToolSummaryEvent,
    Usage,
)


def duration(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))


def value(obj: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    if obj is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        out.bool_value = obj
    elif isinstance(obj, int | float):
        out.number_value = obj
    elif isinstance(obj, str):
        out.string_value = obj
    elif isinstance(obj, dict):
        out.struct_value.update(obj)
    else:
        out.list_value.extend(obj)
    return out


def tool_result(result: ToolCallResult) -> pb.ToolCallResult:
    message = pb.ToolCallResult(
        call_id=result.call.id,
        tool_name=result.call.name,
        arguments=result.call.arguments,
        outcome=result.outcome.value,  # type: ignore[arg-type]
        error=result.error,
        duration=duration(result.duration),
        round=result.round,
        truncated=result.truncated,
    )
    if result.outcome.name == "OK":
        message.result.CopyFrom(value(result.result))
    return message


def usage(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens
    )


def phase_stats(stats: PhaseStats) -> pb.PhaseStats:
    message = pb.PhaseStats(
        finish_reason=stats.finish_reason,
        duration=duration(stats.duration),
        retries=stats.retries,
        model=stats.model,
        round=stats.round,
    )
    if stats.usage is not None:
        message.usage.CopyFrom(usage(stats.usage))
    return message


def phase_name(phase: Phase) -> str:
    """The contract's name of a phase ("PHASE_TOOL"), as ErrorInfo metadata carries it."""
    return pb.Phase.Name(phase.value)  # type: ignore[arg-type]


def field_violations(err: StageError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    if not isinstance(err, InvalidRequest):
        return []
    return [
        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
        for v in err.violations
    ]


def error(err: StageError) -> pb.StageError:
    """The stream's error event; it says what transport/status.py puts in the status."""
    message = pb.StageError(
        code=int(err.code),
        message=err.message,
        phase=err.phase.value,  # type: ignore[arg-type]
        retryable=err.retryable,
        reason=err.reason,
        field_violations=field_violations(err),
    )
    delay = err.retry_delay
    if delay is not None:
        message.retry_delay.CopyFrom(duration(delay))
    return message


def fill_event(out: pb.StageEvent, stage_id: str, sequence: int, event: StageEvent) -> None:
    """Write `event` into `out` in place (a streamed response's `event` field, so the
    hot path builds each message once instead of building and copying it)."""
    out.stage_id = stage_id
    out.sequence = sequence
    if isinstance(event, ChunkEvent):
        chunk = out.chunk
        chunk.phase = event.phase.value  # type: ignore[assignment]
        chunk.round = event.round
        if event.content:
            chunk.content = event.content
        if event.finish_reason:
            chunk.finish_reason = event.finish_reason
        for d in event.tool_calls:
            chunk.tool_calls.add(index=d.index, id=d.id, name=d.name, arguments_fragment=d.arguments)
    elif isinstance(event, ToolSummaryEvent):
        out.tool_summary.round = event.round
        out.tool_summary.results.extend(tool_result(r) for r in event.results)
    elif isinstance(event, DoneEvent):
        done = out.done
        done.text = event.text
        done.tool_phase.CopyFrom(phase_stats(event.tool_phase))
        if event.synthesis_phase is not None:
            done.synthesis_phase.CopyFrom(phase_stats(event.synthesis_phase))
        done.tool_rounds.extend(phase_stats(r) for r in event.tool_rounds)
        done.rounds_exhausted = event.rounds_exhausted
        total = event.total_usage
        if total is not None:
            done.total_usage.CopyFrom(usage(total))
    elif isinstance(event, CancelEvent):
        out.cancel.reason = event.reason.value  # type: ignore[assignment]
        out.cancel.message = event.message
    elif isinstance(event, ErrorEvent):
        out.error.CopyFrom(error(event.error))


class Fold:
    """Collects a stage's events into what a unary response needs."""

    __slots__ = ("done", "results", "stage_id")

    def __init__(self, stage_id: str) -> None:
        self.stage_id = stage_id
        self.results: tuple[ToolCallResult, ...] = ()
        self.done: DoneEvent | None = None

    def add(self, event: StageEvent) -> None:
        if isinstance(event, ToolSummaryEvent):
            self.results += event.results
        elif isinstance(event, DoneEvent):
            self.done = event

    def tools_response(self) -> pb.RunToolsResponse:
        done = self.done
        assert done is not None
        response = pb.RunToolsResponse(
            stage_id=self.stage_id,
            tool_results=[tool_result(r) for r in self.results],
            text=done.text,
            tool_phase=phase_stats(done.tool_phase),
            tool_rounds=[phase_stats(r) for r in done.tool_rounds],
            rounds_exhausted=done.rounds_exhausted,
        )
        total = done.total_usage
        if total is not None:
            response.total_usage.CopyFrom(usage(total))
        return response

    def synthesis_response(self) -> pb.RunSynthesisResponse:
        done = self.done
        assert done is not None
        response = pb.RunSynthesisResponse(
            stage_id=self.stage_id,
            text=done.text,
            tool_results=[tool_result(r) for r in self.results],
            tool_phase=phase_stats(done.tool_phase),
            tool_rounds=[phase_stats(r) for r in done.tool_rounds],
            rounds_exhausted=done.rounds_exhausted,
        )
        if done.synthesis_phase is not None:
            response.synthesis_phase.CopyFrom(phase_stats(done.synthesis_phase))
        total = done.total_usage
        if total is not None:
            response.total_usage.CopyFrom(usage(total))
        return response
