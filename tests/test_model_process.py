"""The embedded model's process dies, and the service does not.

The model (llama-server on the bundled SmolLM2) runs as a supervised child. These tests
kill it the ways it can die, mid-stream, with four stages running at once on it:

* SIGKILL (an OOM kill) and SIGSEGV (a native fault, as a CPU's advertised-but-disabled
  instruction causes): the four stages end with an UNAVAILABLE error event and status
  that say how the process died and carry a retry delay; health reports the embedded
  backend NOT_SERVING while a fifth stage on another backend finishes OK; the process is
  restarted, health turns SERVING again, and a stage on it finishes OK;
* SIGSTOP (a hang): the watchdog finds /health silent, kills the process and restarts it;
  the stage that was waiting on it ends UNAVAILABLE instead of hanging.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2, status_pb2
from toolchain_proto.v1 import toolchain_pb2 as pb

from tests.conftest import collect, detail, kinds
from tests.fakes.openai_backend import FakeBackend, SSEReply, text_chunks
from tests.fakes.server_process import serve_env, start_serve
from tests.model_support import (
    NOT_SERVING,
    SERVING,
    Embedded,
    embedded_server,
    health_status,
    wait_health,
)

pytestmark = [pytest.mark.model]

LONG = "Write a very long story about a dragon who learns to count."


@pytest_asyncio.fixture
async def model(fake: FakeBackend) -> AsyncIterator[Embedded]:
    from toolchain_service.config import BackendSettings

    other = BackendSettings(base_url=fake.base_url, default_model="fake-model", max_retries=0)
    # A restart waits 3 s first, so that "during the outage" is a window a test can use.
    async with embedded_server(
        {"fake": other}, parallel=4, restart_initial_backoff=3.0, watchdog_timeout=1.0, max_retries=0
    ) as embedded:
        yield embedded


def _long_stage(stage_id: str) -> pb.StreamSynthesisRequest:
    return pb.StreamSynthesisRequest(
        stage=pb.StageRequest(
            stage_id=stage_id,
            user_prompt=LONG,
            tools=[],  # every tool: the model may answer in text, which streams as it is written
            tool_phase=pb.PhaseOptions(max_tokens=400, temperature=0.0),
            synthesis_phase=pb.PhaseOptions(max_tokens=400, temperature=0.0),
        )
    )


async def _read_until_first_chunk(call: Call) -> list[pb.StageEvent]:
    events: list[pb.StageEvent] = []
    while (response := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]  # grpc-stubs lag
        events.append(response.event)
        if response.event.HasField("chunk"):
            return events
        assert not response.event.HasField("done"), "the stage ended before the process was killed"
    raise AssertionError(f"the stream ended without a chunk: {kinds(events)}")


Call = Any  # grpc.aio.UnaryStreamCall: grpc-stubs' generic does not fit the generated stub


async def _rest(call: Call, before: list[pb.StageEvent]) -> tuple[list[pb.StageEvent], grpc.StatusCode]:
    events, code = await collect(call)
    return before + events, code


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
async def test_a_dead_model_process_fails_its_stages_and_nothing_else(
    model: Embedded, fake: FakeBackend, sig: signal.Signals
) -> None:
    assert await health_status(model.channel, "toolchain.v1.ToolchainService/backend/local") == SERVING
    calls = [model.stub.StreamSynthesis(_long_stage(f"victim-{i}")) for i in range(4)]
    async with asyncio.timeout(120):
        firsts = await asyncio.gather(*(_read_until_first_chunk(c) for c in calls))
    pid = model.backend.process.pid
    assert pid is not None
    os.kill(pid, sig)

    ended = await asyncio.gather(*(_rest(c, f) for c, f in zip(calls, firsts, strict=True)))
    for events, code in ended:
        assert code == grpc.StatusCode.UNAVAILABLE, kinds(events)
        assert kinds(events).count("error") == 1 and kinds(events)[-1] == "error"
        error = events[-1].error
        assert error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert f"killed by {sig.name}" in error.message, error.message
        assert "restarted" in error.message
        assert [e.sequence for e in events] == list(range(len(events)))
    for call in calls:
        status = await _rich_status_of(call)
        assert detail(status, error_details_pb2.ErrorInfo).reason == "LOCAL_MODEL_CRASHED"
        assert detail(status, error_details_pb2.RetryInfo).retry_delay.ToTimedelta().total_seconds() > 0

    # The outage: the embedded backend is NOT_SERVING, the server and the other backend serve.
    await wait_health(model.channel, "local", NOT_SERVING, timeout=10)
    assert await health_status(model.channel, "") == SERVING
    fake.script(SSEReply(text_chunks("Fine, thanks.")))
    other = model.stub.StreamSynthesis(
        pb.StreamSynthesisRequest(stage=pb.StageRequest(user_prompt="Hello?", backend="fake"))
    )
    events, code = await collect(other)
    assert code == grpc.StatusCode.OK and events[-1].done.text == "Fine, thanks."
    assert not model.backend.is_ready(), "the model was back before the other backend's stage ended"
    # A stage on the embedded model meanwhile fails at once, retryably.
    refused = model.stub.StreamTools(pb.StreamToolsRequest(stage=pb.StageRequest(user_prompt="Hi")))
    events, code = await collect(refused)
    if code != grpc.StatusCode.OK:  # (unless the restart won the race)
        assert code == grpc.StatusCode.UNAVAILABLE and "restarted" in events[-1].error.message

    # Back: SERVING again, and the embedded model serves a stage.
    await wait_health(model.channel, "local", SERVING, timeout=120)
    assert model.backend.process.pid != pid
    assert model.backend.process.restarts == 1
    after = await model.stub.RunSynthesis(
        pb.RunSynthesisRequest(
            stage=pb.StageRequest(
                user_prompt="Say hello.",
                tools=["calculator"],
                tool_phase=pb.PhaseOptions(max_tokens=24, temperature=0.0),
                synthesis_phase=pb.PhaseOptions(max_tokens=24, temperature=0.0),
            )
        ),
        timeout=120,
    )
    assert after.stage_id


async def test_a_hung_model_process_is_killed_by_the_watchdog_and_restarted(model: Embedded) -> None:
    call = model.stub.StreamSynthesis(_long_stage("hung"))
    async with asyncio.timeout(120):
        first = await _read_until_first_chunk(call)
    pid = model.backend.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # alive, silent: only the watchdog can tell

    async with asyncio.timeout(60):
        events, code = await _rest(call, first)
    assert code == grpc.StatusCode.UNAVAILABLE, kinds(events)
    assert "killed by SIGKILL" in events[-1].error.message, events[-1].error.message
    await wait_health(model.channel, "local", SERVING, timeout=120)
    assert model.backend.process.pid != pid


async def _rich_status_of(call: Call) -> status_pb2.Status:
    for key, value in await call.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no google.rpc.Status in the trailers")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads children from Linux /proc")
async def test_the_model_process_dies_with_a_killed_service() -> None:
    server = await start_serve(serve_env(), timeout=120)
    try:
        children = _children(server.pid)
        assert len(children) == 1, children
        model = children[0]
        assert "llama-server" in _cmdline(model)
        os.kill(server.pid, signal.SIGKILL)
        assert await server.wait(timeout=20) == -signal.SIGKILL
        async with asyncio.timeout(20):
            while _state(model) != "Z":  # noqa: ASYNC110 - /proc has no notification
                await asyncio.sleep(0.05)
    finally:
        await server.close()


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")


def _state(pid: int) -> str:
    """The process state letter; "Z" also when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
