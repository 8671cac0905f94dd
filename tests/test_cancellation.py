"""Cancellation from every side closes the backend request and ends the call cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from tests.conftest import Harness, collect, kinds, stage
from tests.fakes.openai_backend import (
    HangReply,
    JSONReply,
    SSEReply,
    completion,
    text_chunks,
    tool_call_chunks,
)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polling server state a client cannot subscribe to
            await asyncio.sleep(0.01)


async def test_client_cancelling_a_stream_closes_the_backend_request(h: Harness) -> None:
    h.fake.script(SSEReply(text_chunks("never finishes"), stall_after=2))
    call_ = h.stub.StreamTools(pb.StreamToolsRequest(stage=stage(stage_id="c-1")))
    first = await call_.read()
    assert isinstance(first, pb.StreamToolsResponse) and first.event.HasField("chunk")
    call_.cancel()
    await h.fake.wait_disconnect(5.0)
    await wait_for(lambda: len(h.server.stages) == 0)
    assert await call_.code() == grpc.StatusCode.CANCELLED


async def test_deadline_closes_the_backend_request_and_fails_with_deadline_exceeded(h: Harness) -> None:
    h.fake.script(HangReply())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage()), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await h.fake.wait_disconnect(5.0)
    await wait_for(lambda: len(h.server.stages) == 0)


async def test_cancel_stage_ends_the_stream_with_a_cancel_event_and_closes_the_backend(h: Harness) -> None:
    h.fake.script(SSEReply(text_chunks("a b c d"), stall_after=2))
    call_ = h.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id="victim")))
    await call_.read()  # the stage is running

    async with grpc.aio.insecure_channel(h.server.address) as other:  # from another connection
        await pb_grpc.ToolchainServiceStub(other).CancelStage(pb.CancelStageRequest(stage_id="victim"))

    events, code = await collect(call_)
    assert code == grpc.StatusCode.CANCELLED
    assert kinds(events)[-1] == "cancel" and kinds(events).count("cancel") == 1
    assert events[-1].cancel.reason == pb.CANCEL_REASON_CANCEL_STAGE
    await h.fake.wait_disconnect(5.0)


async def test_cancel_stage_cancels_a_running_unary_call(h: Harness) -> None:
    h.fake.script(HangReply())
    task = asyncio.ensure_future(h.stub.RunTools(pb.RunToolsRequest(stage=stage(stage_id="unary-victim"))))
    await h.fake.wait_requests(1)
    await h.stub.CancelStage(pb.CancelStageRequest(stage_id="unary-victim"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await task
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    await h.fake.wait_disconnect(5.0)


async def test_cancel_stage_with_an_unknown_id_is_not_found(h: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.CancelStage(pb.CancelStageRequest(stage_id="nobody"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nobody" in (caught.value.details() or "")


async def test_cancelling_during_tool_execution_cancels_the_running_tools(h: Harness) -> None:
    h.fake.script(SSEReply(tool_call_chunks([("misbehave", {"mode": "ok", "seconds": 0.4})])))
    call_ = h.stub.StreamTools(pb.StreamToolsRequest(stage=stage(stage_id="in-tools")))
    async with asyncio.timeout(5):
        await h.misbehave.started_event.wait()
    await h.stub.CancelStage(pb.CancelStageRequest(stage_id="in-tools"))
    events, code = await collect(call_)
    assert code == grpc.StatusCode.CANCELLED
    assert kinds(events)[-1] == "cancel" and "tool_summary" not in kinds(events)
    assert h.misbehave.cancelled == 1 and h.misbehave.finished == 0


async def test_cancelling_mid_synthesis_closes_the_second_backend_request(h: Harness) -> None:
    h.fake.script(
        SSEReply(tool_call_chunks([("echo", {"text": "x"})])),
        SSEReply(text_chunks("one two three four"), stall_after=3),
    )
    call_ = h.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage()))
    seen = []
    async for response in call_:
        seen.append(response.event)
        if response.event.chunk.phase == pb.PHASE_SYNTHESIS:
            break
    call_.cancel()
    await h.fake.wait_disconnect(5.0)
    assert h.fake.request_count == 2
    await wait_for(lambda: len(h.server.stages) == 0)


async def test_a_finished_stage_id_can_be_reused(h: Harness) -> None:
    for _ in range(2):
        h.fake.script(JSONReply(completion(content="hi")))
        response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage(stage_id="again")))
        assert response.stage_id == "again"
