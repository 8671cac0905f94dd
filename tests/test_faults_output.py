"""Malformed model output never crashes a stage and never runs a tool on something that
failed validation: bytes that are not JSON or not UTF-8 end the call INTERNAL
(BACKEND_PROTOCOL_ERROR); odd but valid shapes are understood; malformed tool calls end
as outcomes in the summary, never executed; an answer cut by max_tokens says so."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from toolchain_proto.v1 import toolchain_pb2 as pb

from tests.conftest import stage
from tests.fakes.openai_backend import (
    JSONReply,
    RawEvent,
    RawReply,
    SSEReply,
    call,
    completion,
    text_chunks,
    tool_call_chunks,
)
from tests.fault_checks import Faults, assert_failed, run

MODES = ["unary", "stream"]
INTERNAL = grpc.StatusCode.INTERNAL
PROTOCOL = "BACKEND_PROTOCOL_ERROR"


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def tool_delta(index: int, *, id: str = "", name: str = "", arguments: str = "") -> dict[str, Any]:
    delta: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if id:
        delta["id"] = id
    if name:
        delta["function"]["name"] = name
    return chunk({"tool_calls": [delta]})


# -- not the wire format ----------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [b"this is not json", b'{"choices": [', b"[1, 2, 3]", b'"just a string"'],
    ids=["prose", "truncated", "array", "string"],
)
async def test_sse_event_that_is_not_a_json_object_is_a_protocol_error(faults: Faults, event: bytes) -> None:
    h = await faults.start()
    h.fake.script(SSEReply([text_chunks("fine")[1], event]))
    outcome = await run(h, "stream")
    assert_failed(outcome, INTERNAL, PROTOCOL, retryable=False, message="JSON")


@pytest.mark.parametrize(
    "body",
    [b"<html>502 Bad Gateway</html>", b"", b"null", b'{"object": "chat.completion"}'],
    ids=["html", "empty", "null", "no-choices"],
)
async def test_json_body_that_is_not_a_completion_is_a_protocol_error(faults: Faults, body: bytes) -> None:
    h = await faults.start()
    h.fake.script(RawReply(body))
    outcome = await run(h, "unary")
    assert_failed(outcome, INTERNAL, PROTOCOL, retryable=False)


async def test_non_utf8_bytes_in_an_sse_event_are_a_protocol_error_and_nothing_runs(faults: Faults) -> None:
    h = await faults.start()
    arguments = b'{\\"text\\": \\"caf\xe9\\"}'  # Latin-1, not UTF-8
    h.fake.script(
        SSEReply(
            [
                json.dumps(tool_delta(0, id="c1", name="echo")).encode(),
                b'{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": '
                b'{"arguments": "' + arguments + b'"}}]}, "finish_reason": "tool_calls"}]}',
            ]
        )
    )
    outcome = await run(h, "stream")
    assert_failed(outcome, INTERNAL, PROTOCOL, retryable=False, message="not valid UTF-8")
    assert h.echo.calls == []


async def test_non_utf8_bytes_in_a_json_body_are_a_protocol_error(faults: Faults) -> None:
    h = await faults.start()
    h.fake.script(RawReply(b'{"choices": [{"message": {"content": "\xff\xfe"}, "finish_reason": "stop"}]}'))
    outcome = await run(h, "unary")
    assert_failed(outcome, INTERNAL, PROTOCOL, retryable=False, message="not valid UTF-8")


@pytest.mark.parametrize(
    "bad",
    [
        {"choices": "all of them"},
        {"choices": [{"delta": "text"}]},
        {"choices": [{"delta": {"content": 42}}]},
        {"choices": [{"delta": {"tool_calls": {"index": 0}}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": -1}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": ["echo"]}]}}]},
    ],
    ids=["choices", "delta", "content", "tool-calls", "index", "function"],
)
async def test_chunk_with_fields_of_the_wrong_type_is_a_protocol_error(
    faults: Faults, bad: dict[str, Any]
) -> None:
    h = await faults.start()
    h.fake.script(SSEReply([bad]))
    outcome = await run(h, "stream")
    assert_failed(outcome, INTERNAL, PROTOCOL, retryable=False)
    assert h.echo.calls == []


# -- odd but valid ------------------------------------------------------------------------


async def test_chunks_missing_optional_fields_still_make_an_answer(faults: Faults) -> None:
    h = await faults.start()
    h.fake.script(
        SSEReply(
            [
                {"id": "no-choices-at-all"},
                {"choices": []},
                {"choices": [{}]},
                {"choices": [{"delta": None}]},
                chunk({"role": "assistant"}),
                chunk({"content": None}),
                chunk({"content": "still "}),
                chunk({"content": "fine"}, "stop"),
            ]
        )
    )
    outcome = await run(h, "stream")
    assert outcome.code == grpc.StatusCode.OK
    assert outcome.done.text == "still fine" and outcome.done.tool_phase.finish_reason == "stop"


async def test_sse_framing_variants_are_understood(faults: Faults) -> None:
    h = await faults.start()
    h.fake.script(
        SSEReply(
            [
                RawEvent(b": keep-alive comment\r\n\r\n"),
                RawEvent(
                    b"event: message\r\nid: 1\r\ndata: " + json.dumps(chunk({"content": "crlf "})).encode()
                ),
                RawEvent(b"\r\n\r\n"),
                RawEvent(b"data:" + json.dumps(chunk({"content": "cr "})).encode() + b"\r\r"),
                RawEvent(b"data: " + json.dumps(chunk({"content": "lf"}, "stop")).encode() + b"\n\n"),
            ]
        )
    )
    outcome = await run(h, "stream")
    assert outcome.code == grpc.StatusCode.OK
    assert outcome.done.text == "crlf cr lf"


@pytest.mark.parametrize("mode", MODES)
async def test_lone_surrogate_escapes_become_replacement_characters(faults: Faults, mode: str) -> None:
    h = await faults.start()
    text = '{"choices": [{"index": 0, "%s": {"content": "half \\ud83d emoji"}, "finish_reason": "stop"}]}'
    if mode == "unary":
        h.fake.script(RawReply((text % "message").encode()))
    else:
        h.fake.script(SSEReply([text % "delta"]))
    outcome = await run(h, mode)
    assert outcome.code == grpc.StatusCode.OK
    answer = outcome.response.text if mode == "unary" else outcome.done.text
    assert answer == "half \ufffd emoji"


async def test_lone_surrogate_in_a_tool_name_written_as_content_is_reported_not_crashed(
    faults: Faults,
) -> None:
    h = await faults.start()
    # In <tool_call> markup: bare JSON naming no offered tool is an answer, not a call.
    content = '<tool_call>{"name": "ech\\udc00", "arguments": {"text": "x"}}</tool_call>'
    h.fake.script(JSONReply(completion(content=content)))
    outcome = await run(h, "unary")
    (result,) = outcome.summary()
    assert (result.tool_name, result.outcome) == ("ech\ufffd", pb.TOOL_OUTCOME_UNKNOWN_TOOL)
    assert h.echo.calls == []


# -- malformed tool calls ---------------------------------------------------------------


async def test_tool_call_deltas_out_of_order_assemble_by_index(faults: Faults) -> None:
    h = await faults.start()
    h.fake.script(
        SSEReply(
            [
                tool_delta(1, id="second", name="echo", arguments='{"text": '),
                tool_delta(0, id="first", name="echo", arguments='{"text": "one"}'),
                tool_delta(1, arguments='"two"}'),
                chunk({}, "tool_calls"),
            ]
        )
    )
    outcome = await run(h, "stream")
    assert [(r.call_id, r.outcome) for r in outcome.summary()] == [
        ("first", pb.TOOL_OUTCOME_OK),
        ("second", pb.TOOL_OUTCOME_OK),
    ]
    assert sorted(h.echo.calls) == ["one", "two"]


@pytest.mark.parametrize(
    ("second", "problem"),
    [({"id": "other"}, "conflicting ids"), ({"name": "calculator"}, "conflicting names")],
    ids=["ids", "names"],
)
async def test_conflicting_deltas_for_one_call_are_invalid_and_never_run(
    faults: Faults, second: dict[str, str], problem: str
) -> None:
    h = await faults.start()
    h.fake.script(
        SSEReply(
            [
                tool_delta(0, id="c1", name="echo", arguments='{"text": '),
                tool_delta(0, arguments='"x"}', **second),
                chunk({}, "tool_calls"),
            ]
        )
    )
    outcome = await run(h, "stream")
    (result,) = outcome.summary()
    assert result.outcome == pb.TOOL_OUTCOME_INVALID_ARGUMENTS and problem in result.error
    assert h.echo.calls == []


async def test_tool_call_without_a_name_is_invalid_and_never_runs(faults: Faults) -> None:
    h = await faults.start()
    h.fake.script(SSEReply([tool_delta(0, id="c1", arguments='{"text": "x"}'), chunk({}, "tool_calls")]))
    outcome = await run(h, "stream")
    (result,) = outcome.summary()
    assert result.outcome == pb.TOOL_OUTCOME_INVALID_ARGUMENTS and "without a name" in result.error
    assert h.echo.calls == []


@pytest.mark.parametrize("mode", MODES)
async def test_arguments_cut_by_max_tokens_say_so_and_never_run(faults: Faults, mode: str) -> None:
    h = await faults.start()
    cut = '{"text": "a long text the model could not fin'
    if mode == "unary":
        h.fake.script(JSONReply(completion(tool_calls=[call("echo", cut)], finish_reason="length")))
    else:
        h.fake.script(SSEReply(tool_call_chunks([("echo", cut)], finish_reason="length")))
    outcome = await run(h, mode, stage(tool_phase=pb.PhaseOptions(max_tokens=12)))
    (result,) = outcome.summary()
    assert result.outcome == pb.TOOL_OUTCOME_INVALID_ARGUMENTS
    assert "cut by max_tokens (12)" in result.error and "raise tool_phase.max_tokens" in result.error
    assert result.arguments == cut
    assert h.echo.calls == []


@pytest.mark.parametrize("mode", MODES)
async def test_arguments_that_are_not_json_in_a_finished_answer_are_invalid_and_never_run(
    faults: Faults, mode: str
) -> None:
    h = await faults.start()
    broken = "{'text': 'python, not JSON'}"
    if mode == "unary":
        h.fake.script(JSONReply(completion(tool_calls=[call("echo", broken)])))
    else:
        h.fake.script(SSEReply(tool_call_chunks([("echo", broken)])))
    outcome = await run(h, mode)
    (result,) = outcome.summary()
    assert result.outcome == pb.TOOL_OUTCOME_INVALID_ARGUMENTS
    assert "not valid JSON" in result.error and "max_tokens" not in result.error
    assert h.echo.calls == []


async def test_only_the_cut_call_of_an_answer_stopped_by_max_tokens_is_invalid(faults: Faults) -> None:
    h = await faults.start()
    calls: list[tuple[str, str | dict[str, Any]]] = [("echo", {"text": "whole"}), ("echo", '{"te')]
    h.fake.script(SSEReply(tool_call_chunks(calls, finish_reason="length")))
    outcome = await run(h, "stream")
    assert [r.outcome for r in outcome.summary()] == [pb.TOOL_OUTCOME_OK, pb.TOOL_OUTCOME_INVALID_ARGUMENTS]
    assert h.echo.calls == ["whole"]


async def test_hermes_block_cut_by_max_tokens_says_so(faults: Faults) -> None:
    h = await faults.start()
    content = '<tool_call>\n{"name": "echo", "arguments": {"text": "unfin'
    h.fake.script(JSONReply(completion(content=content, finish_reason="length")))
    outcome = await run(h, "unary")
    (result,) = outcome.summary()
    assert result.outcome == pb.TOOL_OUTCOME_INVALID_ARGUMENTS and "max_tokens" in result.error
    assert h.echo.calls == []


@pytest.mark.parametrize("mode", MODES)
async def test_hundreds_of_tool_calls_run_up_to_the_limit_and_skip_the_rest(
    faults: Faults, mode: str
) -> None:
    h = await faults.start()
    calls: list[tuple[str, str | dict[str, Any]]] = [("echo", {"text": str(i)}) for i in range(300)]
    if mode == "unary":
        h.fake.script(JSONReply(completion(tool_calls=[call(n, a) for n, a in calls])))
    else:
        h.fake.script(SSEReply(tool_call_chunks(calls, split=1)))
    outcome = await run(h, mode)
    results = outcome.summary()
    limit = h.server.settings.tools.max_calls_per_stage
    assert len(results) == 300
    assert [r.outcome for r in results[:limit]] == [pb.TOOL_OUTCOME_OK] * limit
    assert {r.outcome for r in results[limit:]} == {pb.TOOL_OUTCOME_SKIPPED}
    assert f"more than {limit} tool calls" in results[-1].error
    assert sorted(h.echo.calls, key=int) == [str(i) for i in range(limit)]
