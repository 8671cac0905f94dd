"""A misbehaving tool ends as an outcome of its own call: it never stops the other calls,
the summary or the synthesis, never leaks a traceback, and never keeps running after its
timeout or after the call ends. Results reach the caller only as JSON the response can
carry."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from toolchain_proto.v1 import toolchain_pb2 as pb

from tests.fakes.openai_backend import JSONReply, SSEReply, call, completion, text_chunks, tool_call_chunks
from tests.fault_checks import Faults, assert_clean_text, run

MODES = ["unary", "stream"]


def script_calls(
    h: Any, mode: str, calls: list[tuple[str, dict[str, Any]]], *, synthesis: bool = False
) -> None:
    if mode == "unary":
        h.fake.script(JSONReply(completion(tool_calls=[call(n, a) for n, a in calls])))
        if synthesis:
            h.fake.script(JSONReply(completion("summary of what the tools did")))
    else:
        h.fake.script(SSEReply(tool_call_chunks(calls)))
        if synthesis:
            h.fake.script(SSEReply(text_chunks("summary of what the tools did")))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("behaviour", "outcome", "error"),
    [
        ("raise", pb.TOOL_OUTCOME_FAILED, "tool failed unexpectedly: the tool broke"),
        ("fail", pb.TOOL_OUTCOME_FAILED, "the tool could not do it"),
        ("hang", pb.TOOL_OUTCOME_TIMED_OUT, "did not finish within 0.5 s"),
        ("unserialisable", pb.TOOL_OUTCOME_FAILED, "not JSON-serialisable"),
        ("nan", pb.TOOL_OUTCOME_FAILED, "not JSON-serialisable"),
        ("surrogate", pb.TOOL_OUTCOME_FAILED, "not JSON-serialisable"),
        ("deep", pb.TOOL_OUTCOME_FAILED, "not JSON-serialisable"),
    ],
)
async def test_misbehaving_tool_is_an_outcome_and_the_stage_finishes(
    faults: Faults, mode: str, behaviour: str, outcome: int, error: str
) -> None:
    h = await faults.start()
    script_calls(h, mode, [("misbehave", {"mode": behaviour}), ("echo", {"text": "unharmed"})])
    result = await run(h, mode)
    assert result.code == grpc.StatusCode.OK
    misbehaved, echoed = result.summary()
    assert misbehaved.outcome == outcome and error in misbehaved.error
    assert not misbehaved.HasField("result")
    assert_clean_text(misbehaved.error, "tool error")
    assert echoed.outcome == pb.TOOL_OUTCOME_OK and h.echo.calls == ["unharmed"]
    await faults.settled(h)
    assert h.misbehave.running == 0


async def test_result_that_is_json_only_after_conversion_is_normalised(faults: Faults) -> None:
    h = await faults.start()
    script_calls(h, "unary", [("misbehave", {"mode": "int_keys"})])
    result = await run(h, "unary")
    (normalised,) = result.summary()
    assert normalised.outcome == pb.TOOL_OUTCOME_OK
    assert json_format.MessageToDict(normalised.result) == {"1": "one", "pair": [2, 3]}


async def test_hanging_tool_is_cancelled_at_its_timeout_and_nothing_of_it_remains(faults: Faults) -> None:
    h = await faults.start()
    script_calls(h, "stream", [("misbehave", {"mode": "hang"}), ("misbehave", {"mode": "hang"})])
    result = await run(h, "stream")
    assert [r.outcome for r in result.summary()] == [pb.TOOL_OUTCOME_TIMED_OUT] * 2
    assert (h.misbehave.started, h.misbehave.cancelled, h.misbehave.finished) == (2, 2, 0)
    await faults.settled(h)


@pytest.mark.parametrize("mode", MODES)
async def test_every_kind_of_misbehaviour_at_once_still_reaches_the_synthesis(
    faults: Faults, mode: str
) -> None:
    h = await faults.start()
    behaviours = ["raise", "fail", "hang", "unserialisable", "huge", "nan", "surrogate"]
    calls = [("misbehave", {"mode": b}) for b in behaviours] + [("echo", {"text": "fine"})]
    script_calls(h, mode, calls, synthesis=True)
    result = await run(h, mode, synthesis=True)
    assert result.code == grpc.StatusCode.OK
    outcomes = [r.outcome for r in result.summary()]
    # huge: truncated, not failed (tests/test_tool_results.py)
    assert outcomes.count(pb.TOOL_OUTCOME_OK) == 2 and outcomes[-1] == pb.TOOL_OUTCOME_OK
    assert [r.truncated for r in result.summary()].count(True) == 1
    assert outcomes.count(pb.TOOL_OUTCOME_TIMED_OUT) == 1
    text = result.response.text if mode == "unary" else result.done.text
    assert text == "summary of what the tools did"

    # The model learned what failed, with the same clean messages, one message per call.
    tool_messages = [m for m in h.fake.requests[1]["messages"] if m["role"] == "tool"]
    assert len(tool_messages) == len(calls)
    failed = json.loads(tool_messages[0]["content"])
    assert failed == {"error": "tool failed unexpectedly: the tool broke", "outcome": "failed"}
    assert json.loads(tool_messages[-1]["content"]) == {"text": "fine"}
    await faults.settled(h)
    assert h.misbehave.running == 0


async def test_invalid_call_to_a_misbehaving_tool_is_never_executed(faults: Faults) -> None:
    h = await faults.start()
    script_calls(h, "unary", [("misbehave", {"mode": "hang", "seconds": 99}), ("misbehave", {"mode": 1})])
    result = await run(h, "unary")
    assert [r.outcome for r in result.summary()] == [pb.TOOL_OUTCOME_INVALID_ARGUMENTS] * 2
    assert h.misbehave.started == 0


async def test_tool_failures_are_logged_as_one_clean_line(faults: Faults) -> None:
    h = await faults.start()
    script_calls(h, "unary", [("misbehave", {"mode": "raise"})])
    await run(h, "unary")
    lines = [r.getMessage() for r in faults.caplog.records if r.name.endswith("tools.registry")]
    assert lines == ["tool misbehave failed unexpectedly: the tool broke"]
    # the `faults` fixture checks every record for tracebacks when the test ends


async def test_slow_tools_run_concurrently_not_one_after_another(faults: Faults) -> None:
    h = await faults.start()
    script_calls(h, "unary", [("misbehave", {"mode": "ok", "seconds": 0.3})] * 3)
    task = asyncio.ensure_future(run(h, "unary"))
    async with asyncio.timeout(5):  # all three at once, each under its own timeout
        while h.misbehave.running < 3:  # noqa: ASYNC110 - tool state has no event for "all running"
            await asyncio.sleep(0.005)
    result = await task
    assert [r.outcome for r in result.summary()] == [pb.TOOL_OUTCOME_OK] * 3
