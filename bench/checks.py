"""Checks of every stage response the load generator receives (service and ceiling rows).

A stream must be: tool-phase chunks (the call's id and name once, the argument fragments
that join to the scenario's arguments, a finish chunk; the service may merge fragments that
arrived together, so at most the scenario's count), exactly one tool summary with one
``calculator`` call whose outcome is OK and whose result is ``{"expression": "2+3",
"result": 5}``, synthesis chunks that join to the expected text (synthesis RPCs), then
``done`` last, with sequence numbers 0..n-1 and one stage id. A unary response must carry
the same tool result and final text. Any deviation raises `CheckFailed`.
"""

from __future__ import annotations

from collections.abc import Sequence

from toolchain_proto.v1 import toolchain_pb2 as pb

from bench import scenario
from bench.scenario import Expected


class CheckFailed(Exception):
    """A response that is not what the scenario must produce."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def check_tool_results(results: Sequence[pb.ToolCallResult], call_id: str = scenario.CALL_ID) -> None:
    _require(len(results) == 1, f"expected 1 tool result, got {len(results)}")
    r = results[0]
    _require(
        r.outcome == pb.TOOL_OUTCOME_OK,
        f"tool outcome {pb.ToolOutcome.Name(r.outcome)}: {r.error[:200]!r}",
    )
    _require(r.tool_name == scenario.TOOL_NAME, f"tool name {r.tool_name!r}")
    _require(r.call_id == call_id, f"call id {r.call_id!r}")
    _require(r.arguments == scenario.TOOL_ARGUMENTS, f"tool arguments {r.arguments!r}")
    fields = r.result.struct_value.fields
    _require(
        fields["expression"].string_value == scenario.TOOL_RESULT["expression"]
        and fields["result"].number_value == scenario.TOOL_RESULT["result"]
        and len(fields) == len(scenario.TOOL_RESULT),
        f"tool result {r.result}",
    )


class Counts:
    """Events of the streams checked since the last `reset` (a row's events per stage)."""

    events = 0
    streams = 0

    @classmethod
    def reset(cls) -> None:
        cls.events = cls.streams = 0

    @classmethod
    def per_stream(cls) -> float:
        return cls.events / cls.streams if cls.streams else 0.0


def check_events(events: Sequence[pb.StageEvent], exp: Expected) -> None:
    """One streamed stage, event by event. Deltas that reached the service together may
    come as one chunk, so a stream has at most the scenario's events and chunks."""
    Counts.events += len(events)
    Counts.streams += 1
    _require(len(events) <= exp.events, f"expected at most {exp.events} events, got {len(events)}")
    stage_id = events[0].stage_id
    _require(bool(stage_id), "empty stage_id")
    arguments: list[str] = []
    text: list[str] = []
    summaries = 0
    tool_chunks = synthesis_chunks = 0
    heads = 0
    for position, event in enumerate(events):
        _require(event.sequence == position, f"event {position} has sequence {event.sequence}")
        _require(event.stage_id == stage_id, f"event {position} has stage_id {event.stage_id!r}")
        kind = event.WhichOneof("event")
        last = position == len(events) - 1
        if kind == "chunk":
            chunk = event.chunk
            if summaries == 0:
                _require(chunk.phase == pb.PHASE_TOOL, f"event {position}: chunk before summary not TOOL")
                tool_chunks += 1
                for delta in chunk.tool_calls:
                    _require(delta.index == 0, f"event {position}: tool call index {delta.index}")
                    if delta.id or delta.name:
                        heads += 1
                        _require(
                            delta.id == scenario.CALL_ID and delta.name == scenario.TOOL_NAME,
                            f"event {position}: call head {delta.id!r} {delta.name!r}",
                        )
                    arguments.append(delta.arguments_fragment)
                _require(not chunk.content, f"event {position}: tool phase content {chunk.content!r}")
            else:
                _require(exp.synthesis, f"event {position}: chunk after the summary in {exp.rpc}")
                _require(chunk.phase == pb.PHASE_SYNTHESIS, f"event {position}: synthesis chunk phase")
                synthesis_chunks += 1
                text.append(chunk.content)
        elif kind == "tool_summary":
            summaries += 1
            _require(summaries == 1, f"event {position}: a second tool summary")
            check_tool_results(event.tool_summary.results)
        elif kind == "done":
            _require(last, f"event {position}: done is not the last event")
        else:
            detail = event.error.message if kind == "error" else str(getattr(event, kind or "chunk"))
            raise CheckFailed(f"event {position}: unexpected {kind}: {detail[:300]}")
    _require(summaries == 1, "no tool summary")
    _require(events[-1].WhichOneof("event") == "done", "the last event is not done")
    _require(heads == 1, f"the call's id and name came {heads} times")
    _require("".join(arguments) == scenario.TOOL_ARGUMENTS, f"arguments {''.join(arguments)!r}")
    _require(
        1 <= tool_chunks <= exp.tool_chunks, f"{tool_chunks} tool chunks, expected 1 to {exp.tool_chunks}"
    )
    if exp.synthesis:
        _require(
            1 <= synthesis_chunks <= exp.synthesis_chunks,
            f"{synthesis_chunks} synthesis chunks, expected 1 to {exp.synthesis_chunks}",
        )
        _require("".join(text) == exp.text, f"streamed text {''.join(text)!r}")
    done = events[-1].done
    _require(done.text == exp.text, f"done.text {done.text[:200]!r}, expected {exp.text[:200]!r}")
    _require(done.tool_phase.finish_reason == "tool_calls", f"tool finish {done.tool_phase.finish_reason!r}")
    if exp.synthesis:
        _require(done.synthesis_phase.finish_reason == "stop", "synthesis finish reason")


def check_tools_response(response: pb.RunToolsResponse, exp: Expected) -> None:
    _require(bool(response.stage_id), "empty stage_id")
    check_tool_results(response.tool_results)
    _require(response.text == exp.text, f"text {response.text[:200]!r}")
    _require(response.tool_phase.finish_reason == "tool_calls", "tool finish reason")


def check_synthesis_response(response: pb.RunSynthesisResponse, exp: Expected) -> None:
    _require(bool(response.stage_id), "empty stage_id")
    check_tool_results(response.tool_results)
    _require(response.text == exp.text, f"text {response.text[:200]!r}, expected {exp.text[:200]!r}")
    _require(response.tool_phase.finish_reason == "tool_calls", "tool finish reason")
    _require(response.synthesis_phase.finish_reason == "stop", "synthesis finish reason")
