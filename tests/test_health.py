"""grpc.health.v1: SERVING while a backend is ready, NOT_SERVING otherwise and while
draining, for the server ("") and for toolchain.v1.ToolchainService."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_service.backends.base import (
    BackendInfo,
    Capabilities,
    ChatBackend,
    ChatRequest,
    Completion,
    ModelDelta,
    RetryPolicy,
)
from toolchain_service.backends.registry import BackendRegistry
from toolchain_service.transport.server import RunningServer, start_server

from tests.conftest import Harness, collect, kinds, make_settings, stage
from tests.fakes.openai_backend import FakeBackend, SSEReply, text_chunks

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "toolchain.v1.ToolchainService")


class SwitchableBackend(ChatBackend):
    """A backend whose readiness the test sets; it is never asked for completions."""

    def __init__(self, ready: bool) -> None:
        super().__init__(BackendInfo("switch", "test", "m"), Capabilities(), RetryPolicy())
        self.ready = ready

    def is_ready(self) -> bool:
        return self.ready

    async def complete(self, request: ChatRequest) -> Completion:
        raise AssertionError("not called")

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ModelDelta, None]:
        raise AssertionError("not called")
        yield ModelDelta()  # pragma: no cover


async def check(channel: grpc.aio.Channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    status: int = response.status
    return status


async def watch_until(channel: grpc.aio.Channel, want: int, timeout: float = 5.0) -> list[int]:
    """The statuses a Watch stream reports until it reports `want`."""
    seen: list[int] = []
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    try:
        async with asyncio.timeout(timeout):
            async for response in call:
                seen.append(response.status)
                if response.status == want:
                    return seen
    finally:
        call.cancel()
    raise AssertionError(f"Watch ended before {want}; saw {seen}")


@pytest_asyncio.fixture
async def switchable(fake: FakeBackend) -> AsyncIterator[tuple[RunningServer, SwitchableBackend]]:
    backend = SwitchableBackend(ready=False)
    settings = make_settings(
        fake,
        default_backend="switch",
        backends={"switch": {"base_url": fake.base_url}},
        health_interval=0.05,
    )
    server = await start_server(settings, backends=BackendRegistry({"switch": backend}, "switch"))
    yield server, backend
    await server.stop(0)


async def test_health_is_serving_for_the_server_and_the_service_when_a_backend_is_ready(h: Harness) -> None:
    for service in SERVICES:
        assert await check(h.channel, service) == SERVING


async def test_health_of_an_unknown_service_is_not_found(h: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(h.channel, "no.such.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_is_not_serving_until_a_backend_becomes_ready_and_follows_it(
    switchable: tuple[RunningServer, SwitchableBackend],
) -> None:
    server, backend = switchable
    async with grpc.aio.insecure_channel(server.address) as channel:
        for service in SERVICES:
            assert await check(channel, service) == NOT_SERVING
        backend.ready = True
        assert await watch_until(channel, SERVING) == [NOT_SERVING, SERVING]
        assert await check(channel, SERVICES[1]) == SERVING
        backend.ready = False
        assert (await watch_until(channel, NOT_SERVING))[-1] == NOT_SERVING


async def test_drain_turns_health_not_serving_and_refuses_new_stages(h: Harness) -> None:
    h.fake.script(SSEReply(text_chunks("stalls forever"), stall_after=2))
    stream = h.stub.StreamTools(pb.StreamToolsRequest(stage=stage(stage_id="running")))
    await stream.read()
    # Watches opened before the drain hear it; a draining server takes no new calls.
    watches = {
        service: health_pb2_grpc.HealthStub(h.channel).Watch(health_pb2.HealthCheckRequest(service=service))
        for service in SERVICES
    }
    for watch in watches.values():
        assert (await watch.read()).status == SERVING
    drain = asyncio.create_task(h.server.drain(grace=0.3))
    try:
        for service, watch in watches.items():
            assert (await watch.read()).status == NOT_SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await h.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage()), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert h.fake.request_count == 1  # refused before it reached the server
        events, code = await collect(stream)
        assert code == grpc.StatusCode.CANCELLED
        assert kinds(events)[-1] == "cancel" and events[-1].cancel.reason == pb.CANCEL_REASON_SHUTDOWN
    finally:
        async with asyncio.timeout(10):
            await drain
    assert len(h.server.stages) == 0


async def test_health_is_served_while_a_stage_runs_on_another_connection(h: Harness) -> None:
    h.fake.script(SSEReply(text_chunks("stalls here"), stall_after=2))
    stream = h.stub.StreamTools(pb.StreamToolsRequest(stage=stage(stage_id="busy")))
    await stream.read()
    async with grpc.aio.insecure_channel(h.server.address) as other:
        assert await check(other) == SERVING
    stream.cancel()
    await h.fake.wait_disconnect(5.0)
