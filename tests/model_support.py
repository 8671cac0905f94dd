"""What the tests on the embedded model share: settings, a server whose model process is
checked at the end, health watching, and the llama-server's own view of its slots."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc
from toolchain_service.backends.local_model import LocalModelBackend
from toolchain_service.config import BackendSettings, Settings, ToolSettings
from toolchain_service.transport.server import BACKEND_HEALTH_PREFIX, RunningServer, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Embedded:
    server: RunningServer
    backend: LocalModelBackend
    channel: grpc.aio.Channel
    stub: pb_grpc.ToolchainServiceAsyncStub

    def crashes(self) -> str:
        """'' while the model process never died unexpectedly, else how it died."""
        exit_ = self.backend.process.last_exit
        if self.backend.process.restarts and exit_ is not None:
            return f"the model process {exit_.how} (restarts: {self.backend.process.restarts})"
        return ""


def local_settings(**fields: Any) -> BackendSettings:
    return BackendSettings(kind="local", **fields)


@asynccontextmanager
async def embedded_server(
    backends: dict[str, BackendSettings] | None = None, default: str = "local", **local: Any
) -> AsyncIterator[Embedded]:
    """A server whose default backend is the embedded model. At the end its model process
    must have stopped cleanly (exit status 0 on SIGTERM): a crash fails the test."""
    settings = Settings(
        address="127.0.0.1:0",
        default_backend=default,
        backends={"local": local_settings(**local), **(backends or {})},
        # get_weather points nowhere: no test reaches the network.
        tools=ToolSettings(weather_url="http://127.0.0.1:9/none"),
        shutdown_grace=1.0,
    )
    server = await start_server(settings)
    backend = server.backends.resolve("local")
    assert isinstance(backend, LocalModelBackend)
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield Embedded(server, backend, channel, pb_grpc.ToolchainServiceStub(channel))
    finally:
        await channel.close(None)
        await server.stop(0)
    exit_ = backend.process.last_exit
    assert exit_ is not None, "the model process was never seen to exit"
    if exit_.returncode != 0:
        pytest.fail(f"the model process {exit_.how} when it was stopped (expected exit status 0)")


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10
    )
    status: int = response.status
    return status


async def wait_health(channel: grpc.aio.Channel, backend: str, want: int, timeout: float = 60.0) -> None:
    """Until health of `backend` reports `want`, through a Watch stream."""
    call = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=BACKEND_HEALTH_PREFIX + backend)
    )
    seen: list[int] = []
    try:
        async with asyncio.timeout(timeout):
            async for response in call:
                seen.append(response.status)
                if response.status == want:
                    return
    except TimeoutError:
        raise AssertionError(f"health of backend {backend!r} never became {want}; saw {seen}") from None
    finally:
        call.cancel()
    raise AssertionError(f"health Watch ended before {want}; saw {seen}")


async def slots(backend: LocalModelBackend) -> list[dict[str, Any]]:
    """llama-server's GET /slots: what each sequence slot is doing."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{backend.process.base_url}/slots")
    response.raise_for_status()
    data: list[dict[str, Any]] = response.json()
    return data


async def wait_slots_idle(backend: LocalModelBackend, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while any(s.get("is_processing") for s in await slots(backend)):  # noqa: ASYNC110 - server state
            await asyncio.sleep(0.05)
