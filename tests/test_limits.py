"""Server limits: concurrent stages, request size, prompt length, max_tokens ceiling, and
the default and maximum deadline, which reach the backend's HTTP request."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from toolchain_proto.v1 import toolchain_pb2 as pb

from tests.conftest import Harness, collect, detail, kinds, rich_status, stage, start_harness, stop_harness
from tests.fakes.openai_backend import FakeBackend, HangReply, JSONReply, SSEReply, completion, text_chunks
from tests.fault_checks import wait_for


async def failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def assert_overloaded(h: Harness) -> str:
    """A unary and a streamed stage are both refused, SERVER_OVERLOADED with RetryInfo 1 s
    (the stream: one error event); the unary status's message."""
    err = await failure(h.stub.RunTools(pb.RunToolsRequest(stage=stage()), timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rich_status(err)
    assert detail(status, error_details_pb2.ErrorInfo).reason == "SERVER_OVERLOADED"
    assert detail(status, error_details_pb2.RetryInfo).retry_delay.seconds == 1

    events, code = await collect(h.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage())))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert kinds(events) == ["error"] and events[0].error.reason == "SERVER_OVERLOADED"
    assert events[0].error.retryable
    return err.details() or ""


async def test_a_stage_beyond_max_concurrent_stages_is_resource_exhausted(fake: FakeBackend) -> None:
    h = await start_harness(fake, max_concurrent_stages=1)
    try:
        fake.script(SSEReply(text_chunks("holds the only slot"), stall_after=2))
        running = h.stub.StreamTools(pb.StreamToolsRequest(stage=stage(stage_id="first")))
        await running.read()

        details = await assert_overloaded(h)
        assert details == "the server is running its maximum of 1 stages; retry shortly"

        running.cancel()
        await fake.wait_disconnect(5.0)
        fake.script(JSONReply(completion(content="a slot again")))
        response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage()), timeout=5)
        assert response.text == "a slot again"
    finally:
        await stop_harness(h)


class LoopBurner:
    """Keeps the event loop's thread on the CPU: bursts of 20 ms of busy-waiting on the
    thread's own CPU clock (so a shared machine stretches them, it cannot shorten them),
    with a turn of the loop between them for everything else."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def _burn(self) -> None:
        while True:
            until = time.thread_time() + 0.02
            while time.thread_time() < until:
                pass
            await asyncio.sleep(0)

    def __enter__(self) -> LoopBurner:
        self._task = asyncio.get_running_loop().create_task(self._burn())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_adaptive_admission_refuses_new_stages_while_the_loop_is_at_its_limit(
    fake: FakeBackend,
) -> None:
    h = await start_harness(fake, admission_max_loop_busy=0.3)
    load = h.server.stages.load
    try:
        # With no stage running, a busy loop refuses nothing: the load is not the stages'.
        with LoopBurner():
            await wait_for(lambda: load.busy >= 0.3, "the loop is 30% busy", 30.0)
            fake.script(JSONReply(completion(content="alone, admitted")))
            response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage()), timeout=30)
            assert response.text == "alone, admitted"

        fake.script(SSEReply(text_chunks("keeps running"), stall_after=2))
        running = h.stub.StreamTools(pb.StreamToolsRequest(stage=stage(stage_id="running")))
        await running.read()
        with LoopBurner():
            await wait_for(lambda: load.busy >= 0.3, "the loop is 30% busy", 30.0)
            requests_before = fake.request_count
            details = await assert_overloaded(h)
            assert "at its load limit" in details and "limit 30%" in details
            assert fake.request_count == requests_before  # refused before any backend work

        await wait_for(lambda: load.busy < 0.3, "the loop is under 30% busy", 30.0)
        fake.script(JSONReply(completion(content="admitted again")))
        response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage()), timeout=30)
        assert response.text == "admitted again"
        running.cancel()
        await fake.wait_disconnect(5.0)
    finally:
        await stop_harness(h)


async def test_a_request_larger_than_max_request_bytes_is_resource_exhausted(fake: FakeBackend) -> None:
    h = await start_harness(fake, max_request_bytes=4096)
    try:
        err = await failure(h.stub.RunTools(pb.RunToolsRequest(stage=stage("x" * 5000)), timeout=5))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (err.details() or "")
        assert fake.request_count == 0

        fake.script(JSONReply(completion(content="fits")))
        response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage("x" * 3000)), timeout=5)
        assert response.text == "fits"
    finally:
        await stop_harness(h)


async def test_a_prompt_longer_than_max_prompt_chars_is_invalid_argument(fake: FakeBackend) -> None:
    h = await start_harness(fake, max_prompt_chars=100)
    try:
        request = pb.RunToolsRequest(stage=stage("y" * 101, system_prompt="z" * 150))
        err = await failure(h.stub.RunTools(request, timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = {
            v.field: v.description
            for v in detail(rich_status(err), error_details_pb2.BadRequest).field_violations
        }
        assert violations == {
            "stage.user_prompt": "is 101 characters; at most 100",
            "stage.system_prompt": "is 150 characters; at most 100",
        }
        assert fake.request_count == 0
    finally:
        await stop_harness(h)


async def test_max_tokens_above_the_ceiling_is_invalid_argument(fake: FakeBackend) -> None:
    h = await start_harness(fake, max_tokens_ceiling=64)
    try:
        request = pb.RunSynthesisRequest(
            stage=stage(
                tool_phase=pb.PhaseOptions(max_tokens=65), synthesis_phase=pb.PhaseOptions(max_tokens=0)
            )
        )
        err = await failure(h.stub.RunSynthesis(request, timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields = [v.field for v in detail(rich_status(err), error_details_pb2.BadRequest).field_violations]
        assert fields == ["stage.tool_phase.max_tokens", "stage.synthesis_phase.max_tokens"]
        assert "must be between 1 and 64, got 65" in (err.details() or "")

        fake.script(JSONReply(completion(content="ok")))
        within = pb.RunToolsRequest(stage=stage(tool_phase=pb.PhaseOptions(max_tokens=64)))
        assert (await h.stub.RunTools(within, timeout=5)).text == "ok"
        assert fake.requests[-1]["max_tokens"] == 64
    finally:
        await stop_harness(h)


async def test_the_callers_deadline_reaches_the_backend_request(h: Harness) -> None:
    h.fake.script(HangReply())
    started = time.monotonic()
    err = await failure(h.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage()), timeout=0.5))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await h.fake.wait_disconnect(2.0)
    assert time.monotonic() - started < 2.0  # not the backend's 10 s read timeout
    assert len(h.server.stages) == 0


async def test_the_default_deadline_applies_when_the_caller_sets_none(fake: FakeBackend) -> None:
    h = await start_harness(fake, default_deadline_seconds=0.4)
    try:
        fake.script(SSEReply(text_chunks("never finishes"), stall_after=2))
        started = time.monotonic()
        events, code = await collect(h.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage())))
        elapsed = time.monotonic() - started
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert kinds(events)[-1] == "cancel" and events[-1].cancel.reason == pb.CANCEL_REASON_DEADLINE
        assert 0.3 <= elapsed < 2.0, elapsed
        await fake.wait_disconnect(2.0)
    finally:
        await stop_harness(h)


async def test_the_maximum_deadline_cuts_a_longer_caller_deadline(fake: FakeBackend) -> None:
    h = await start_harness(fake, max_deadline_seconds=0.4)
    try:
        fake.script(HangReply())
        started = time.monotonic()
        err = await failure(h.stub.RunTools(pb.RunToolsRequest(stage=stage()), timeout=30))
        elapsed = time.monotonic() - started
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.3 <= elapsed < 2.0, elapsed
        await fake.wait_disconnect(2.0)
    finally:
        await stop_harness(h)


async def test_a_caller_deadline_shorter_than_the_maximum_is_kept(fake: FakeBackend) -> None:
    h = await start_harness(fake, max_deadline_seconds=30, default_deadline_seconds=30)
    try:
        fake.script(JSONReply(completion(content="quick"), delay=0.2))
        response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage()), timeout=5)
        assert response.text == "quick"
    finally:
        await stop_harness(h)
