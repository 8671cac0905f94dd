"""The test harness: a real fake OpenAI backend over HTTP, a real grpc.aio server on
port 0 wired to it, and a real channel with generated stubs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from google.rpc import status_pb2
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc
from toolchain_service.config import BackendSettings, Settings, ToolSettings
from toolchain_service.tools.builtin import builtin_tools
from toolchain_service.transport.server import RunningServer, start_server

from tests.fakes.openai_backend import FakeBackend
from tests.fakes.tools import Echo, Misbehave

if TYPE_CHECKING:
    from tests.fault_checks import Faults

T = TypeVar("T", bound=Message)


@dataclass
class Harness:
    fake: FakeBackend
    server: RunningServer
    channel: grpc.aio.Channel
    stub: pb_grpc.ToolchainServiceAsyncStub
    echo: Echo
    misbehave: Misbehave


def make_settings(fake: FakeBackend, **overrides: Any) -> Settings:
    backend: dict[str, Any] = {
        "base_url": fake.base_url,
        "default_model": "fake-model",
        "max_retries": 0,
        "read_timeout": 10.0,
    }
    backend.update(overrides.pop("backend", {}))
    values: dict[str, Any] = {
        "address": "127.0.0.1:0",
        "default_backend": "fake",
        "backends": {"fake": BackendSettings(**backend)},
        "tools": ToolSettings(weather_url=f"{fake.base_url}/weather-unused"),
        "shutdown_grace": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


async def start_harness(fake: FakeBackend, **overrides: Any) -> Harness:
    settings = make_settings(fake, **overrides)
    echo, misbehave = Echo(), Misbehave()
    server = await start_server(settings, tools=[*builtin_tools(settings.tools), echo, misbehave])
    channel = grpc.aio.insecure_channel(server.address)
    return Harness(fake, server, channel, pb_grpc.ToolchainServiceStub(channel), echo, misbehave)


async def stop_harness(h: Harness) -> None:
    await h.channel.close(None)
    await h.server.stop(0)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeBackend]:
    async with FakeBackend() as backend:
        yield backend


@pytest_asyncio.fixture
async def h(fake: FakeBackend) -> AsyncIterator[Harness]:
    harness = await start_harness(fake)
    yield harness
    await stop_harness(harness)


@pytest_asyncio.fixture
async def faults(
    fake: FakeBackend, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Faults]:
    """Harnesses for fault scenarios; checks at the end that nothing is left running and
    that no log record leaks internals (tests/fault_checks.py)."""
    from tests.fault_checks import open_faults  # it imports this module

    async with open_faults(fake, caplog, monkeypatch) as checked:
        yield checked


def stage(prompt: str = "What is 2+3?", **fields: Any) -> pb.StageRequest:
    return pb.StageRequest(user_prompt=prompt, **fields)


async def collect(call: Any) -> tuple[list[pb.StageEvent], grpc.StatusCode]:
    """Every event of a streaming call and the call's final status."""
    events: list[pb.StageEvent] = []
    try:
        while (response := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]  # grpc-stubs lag
            events.append(response.event)
    except grpc.aio.AioRpcError as err:
        return events, err.code()
    return events, await call.code()


def kinds(events: list[pb.StageEvent]) -> list[str]:
    return [e.WhichOneof("event") or "" for e in events]


def rich_status(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status a client decodes from the error's trailers."""
    trailers: Any = err.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            return status_pb2.Status.FromString(value)
    raise AssertionError("no google.rpc.Status in the trailers")


def detail(status: status_pb2.Status, kind: type[T]) -> T:
    for packed in status.details:
        message = kind()
        if packed.Unpack(message):
            return message
    raise AssertionError(f"no {kind.__name__} in the status details")
