"""Graceful drain of the real `toolchain serve` process on SIGTERM and SIGINT."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from tests.conftest import collect, kinds, stage
from tests.fakes.openai_backend import FakeBackend, SSEReply, text_chunks
from tests.fakes.server_process import serve_env, start_serve

GRACE = 1.0
SERVICE = "toolchain.v1.ToolchainService"


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    status: int = response.status
    return status


async def wait_health(watch: Any, want: int, timeout: float = 5.0) -> None:
    """Read a health Watch (opened before the drain began) until it reports `want`."""
    async with asyncio.timeout(timeout):
        while (response := await watch.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            if response.status == want:
                return
    raise AssertionError(f"health never became {want}")


def assert_clean_exit(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "tasks still running at exit" not in stderr, stderr
    assert "Task was destroyed but it is pending" not in stderr, stderr


async def test_sigterm_drains_running_stream_with_shutdown_cancel_event(fake: FakeBackend) -> None:
    server = await start_serve(serve_env(fake, shutdown_grace=str(GRACE)))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.ToolchainServiceStub(channel)
            assert await health_of(channel) == health_pb2.HealthCheckResponse.SERVING
            assert await health_of(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING

            fake.script(SSEReply(text_chunks("this answer never ends"), stall_after=2))
            stream = stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id="long")), timeout=20)
            first = await stream.read()
            assert isinstance(first, pb.StreamSynthesisResponse) and first.event.HasField("chunk")
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            await wait_health(watch, health_pb2.HealthCheckResponse.SERVING)

            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await wait_health(watch, health_pb2.HealthCheckResponse.NOT_SERVING)

            # The port is closed and the connection told (GOAWAY): a new call is refused
            # before it reaches the server, so a proxy or a client sends it elsewhere.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RunTools(pb.RunToolsRequest(stage=stage()), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert fake.request_count == 1  # only the running stage's
            with pytest.raises(grpc.aio.AioRpcError) as unhealthy:
                await health_of(grpc.aio.insecure_channel(server.address))
            assert unhealthy.value.code() == grpc.StatusCode.UNAVAILABLE

            events, code = await collect(stream)
            waited = time.monotonic() - signalled
            assert code == grpc.StatusCode.CANCELLED
            assert kinds(events)[-1] == "cancel" and kinds(events).count("cancel") == 1
            assert events[-1].cancel.reason == pb.CANCEL_REASON_SHUTDOWN
            assert GRACE * 0.8 <= waited < GRACE + 3.0, waited
            await fake.wait_disconnect(5.0)

        assert await server.wait(10.0) == 0
        assert_clean_exit(server.stderr_text)
    finally:
        await server.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_idle_server_exits_0_promptly_on_signal(fake: FakeBackend, sig: signal.Signals) -> None:
    server = await start_serve(serve_env(fake, shutdown_grace="30"))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            assert await health_of(channel) == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        server.process.send_signal(sig)
        assert await server.wait(10.0) == 0
        assert time.monotonic() - started < 5.0  # no running stage: the grace is not waited out
        assert_clean_exit(server.stderr_text)
    finally:
        await server.close()


async def test_a_stage_that_finishes_within_the_grace_completes_normally(fake: FakeBackend) -> None:
    server = await start_serve(serve_env(fake, shutdown_grace="10"))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.ToolchainServiceStub(channel)
            fake.script(SSEReply(text_chunks("slow but finishing answer"), delay=0.15))
            stream = stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage()), timeout=20)
            await stream.read()
            server.process.send_signal(signal.SIGTERM)
            events, code = await collect(stream)
            assert code == grpc.StatusCode.OK
            assert kinds(events)[-1] == "done"
        assert await server.wait(10.0) == 0
        assert_clean_exit(server.stderr_text)
    finally:
        await server.close()
