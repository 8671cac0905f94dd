"""Transient backend failures (5xx, refused or closed connections, 429) are retried with
jittered backoff, only while nothing of the phase has reached the caller and only within
the caller's deadline; the retries show in Done (PhaseStats.retries), in the error when
the phase gives up, and in the toolchain_backend_retries metric."""

from __future__ import annotations

import time

import grpc
import pytest
from toolchain_proto.v1 import toolchain_pb2 as pb

from tests.conftest import Harness, stage
from tests.fakes.openai_backend import (
    CloseReply,
    ErrorReply,
    JSONReply,
    RawReply,
    Reply,
    SSEReply,
    call,
    completion,
    text_chunks,
    tool_call_chunks,
)
from tests.fault_checks import Faults, Outcome, assert_failed, run
from tests.test_faults_backend import closed_port

MODES = ["unary", "stream"]
RETRYING = {"backend": {"max_retries": 2}}


def retries_metric(h: Harness, phase: str) -> float:
    value = h.server.observer.metrics.registry.get_sample_value(
        "toolchain_backend_retries_total", {"phase": phase}
    )
    return value or 0.0


def answer(mode: str, text: str = "fine after all") -> Reply:
    return JSONReply(completion(text)) if mode == "unary" else SSEReply(text_chunks(text))


def done(outcome: Outcome) -> pb.Done | pb.RunToolsResponse | pb.RunSynthesisResponse:
    """What carries the phase stats: the unary response or the stream's Done event."""
    return outcome.response if outcome.response is not None else outcome.done


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "failure",
    [ErrorReply(503), ErrorReply(502), CloseReply(), CloseReply(abort=True), ErrorReply(429)],
    ids=["503", "502", "closed", "reset", "429"],
)
async def test_transient_failure_is_retried_and_counted(faults: Faults, mode: str, failure: Reply) -> None:
    h = await faults.start(**RETRYING)
    h.fake.script(failure, answer(mode))
    outcome = await run(h, mode)
    assert outcome.code == grpc.StatusCode.OK
    assert done(outcome).tool_phase.retries == 1
    assert h.fake.request_count == 2
    assert retries_metric(h, "tool") == 1


async def test_retry_honours_the_backends_retry_after(faults: Faults) -> None:
    h = await faults.start(**RETRYING)
    h.fake.script(ErrorReply(503, headers={"Retry-After": "0.5"}), answer("unary"))
    started = time.monotonic()
    outcome = await run(h, "unary")
    assert outcome.code == grpc.StatusCode.OK and outcome.response.tool_phase.retries == 1
    assert time.monotonic() - started >= 0.5  # waited as asked, not the 0.1-0.2 s backoff


async def test_retry_after_longer_than_a_retry_may_wait_goes_to_the_caller(faults: Faults) -> None:
    h = await faults.start(**RETRYING)
    h.fake.script(ErrorReply(429, headers={"Retry-After": "30"}), answer("unary"))
    outcome = await run(h, "unary")
    assert_failed(
        outcome, grpc.StatusCode.UNAVAILABLE, "BACKEND_RATE_LIMITED", retryable=True, retry_delay=30
    )
    assert h.fake.request_count == 1 and h.fake.pending == 1


@pytest.mark.parametrize("mode", MODES)
async def test_giving_up_after_the_last_retry_says_how_many(faults: Faults, mode: str) -> None:
    h = await faults.start(backend={"max_retries": 2, "base_url": f"http://127.0.0.1:{closed_port()}/v1"})
    outcome = await run(h, mode)
    assert_failed(
        outcome,
        grpc.StatusCode.UNAVAILABLE,
        "BACKEND_UNAVAILABLE",
        retryable=True,
        message="connection refused (gave up after 2 retries)",
    )
    assert retries_metric(h, "tool") == 2


async def test_stream_failing_after_output_reached_the_caller_is_not_retried(faults: Faults) -> None:
    h = await faults.start(**RETRYING)
    h.fake.script(SSEReply(text_chunks("one two three"), cut_after=3), answer("stream", "never sent"))
    outcome = await run(h, "stream")
    assert_failed(outcome, grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True)
    assert "gave up" not in outcome.message
    assert "".join(e.chunk.content for e in outcome.events[:-1]) == "one two"
    assert h.fake.request_count == 1 and h.fake.pending == 1
    assert retries_metric(h, "tool") == 0


async def test_attempt_that_failed_before_any_output_leaves_nothing_behind(faults: Faults) -> None:
    h = await faults.start(**RETRYING)
    phantom = {
        "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 5, "function": {"arguments": ""}}]}}]
    }
    h.fake.script(SSEReply([phantom], cut_after=1), SSEReply(tool_call_chunks([("echo", {"text": "once"})])))
    outcome = await run(h, "stream")
    assert outcome.done.tool_phase.retries == 1
    assert [r.tool_name for r in outcome.summary()] == ["echo"]  # no call left over from attempt 1
    assert h.echo.calls == ["once"]


@pytest.mark.parametrize("mode", MODES)
async def test_synthesis_is_retried_without_running_the_tools_again(faults: Faults, mode: str) -> None:
    h = await faults.start(**RETRYING)
    if mode == "unary":
        h.fake.script(JSONReply(completion(tool_calls=[call("echo", {"text": "x"})])))
    else:
        h.fake.script(SSEReply(tool_call_chunks([("echo", {"text": "x"})])))
    h.fake.script(ErrorReply(503), answer(mode, "the answer"))
    outcome = await run(h, mode, synthesis=True)
    assert outcome.code == grpc.StatusCode.OK
    finished = done(outcome)
    assert isinstance(finished, pb.Done | pb.RunSynthesisResponse)
    assert (finished.tool_phase.retries, finished.synthesis_phase.retries) == (0, 1)
    assert finished.text == "the answer"
    assert h.echo.calls == ["x"]
    assert retries_metric(h, "synthesis") == 1


@pytest.mark.parametrize(
    "failure",
    [ErrorReply(400), ErrorReply(401), ErrorReply(404), RawReply(b"not json")],
    ids=["400", "401", "404", "protocol"],
)
async def test_failures_a_retry_cannot_fix_are_not_retried(faults: Faults, failure: Reply) -> None:
    h = await faults.start(**RETRYING)
    h.fake.script(failure, answer("unary"))
    outcome = await run(h, "unary")
    assert outcome.code != grpc.StatusCode.OK
    assert h.fake.request_count == 1 and h.fake.pending == 1


@pytest.mark.parametrize("mode", MODES)
async def test_retries_stop_at_the_callers_deadline(faults: Faults, mode: str) -> None:
    h = await faults.start(backend={"max_retries": 10})
    h.fake.default = ErrorReply(503)
    outcome = await run(h, mode, stage(), timeout=2.0)
    assert outcome.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    if outcome.code == grpc.StatusCode.UNAVAILABLE:
        assert_failed(outcome, grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True)
        assert "gave up after" in outcome.message
    # 10 retries would take ~10 s of backoff; the deadline allowed only a few.
    assert 2 <= h.fake.request_count < 10
    await faults.settled(h)  # no retry loop left waiting to send another request
