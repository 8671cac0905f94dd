"""The four stage RPCs through the service's ordinary OpenAI HTTP backend, against a real
llama.cpp server: `llama-server --jinja` (the binary .ci/setup builds) serving the bundled
SmolLM2-135M-Instruct, started by this module as any operator would start one.

Measured on this build (llama.cpp of llama-cpp-python 0.3.36): SmolLM2's chat template
renders no tools, so the server answers `tools` + `tool_choice="auto"` with plain content,
streamed or not (no empty stream, no error: unlike llama-cpp-python's
chatml-function-calling server, a streamed auto tool choice works); the service's generic
instructions and its JSON-in-content reading are what turn that content into calls. Hence
the backend is configured with the kind's defaults (`streams_tool_calls` true) and nothing
here asserts on what the model chooses, only on what the service promises: one terminal
event, matching status, gap-free sequences, every call validated before it runs, usage.

The server is started once for the module; a test during which it died fails with its
exit status, and it must exit with status 0 on SIGTERM at the end.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc
from toolchain_service.backends.local_model import bundled_model_path, find_server_binary
from toolchain_service.backends.model_process import describe_exit, free_port
from toolchain_service.config import BackendSettings, Settings, ToolSettings
from toolchain_service.transport.server import RunningServer, start_server

from tests.conftest import collect, kinds

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]

PROMPT = "What is 12*7? Use the calculator."
STARTUP_TIMEOUT = 120.0
VALIDATED = (
    pb.TOOL_OUTCOME_OK,
    pb.TOOL_OUTCOME_INVALID_ARGUMENTS,
    pb.TOOL_OUTCOME_UNKNOWN_TOOL,
    pb.TOOL_OUTCOME_FAILED,
)


@dataclass
class LlamaServer:
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def died(self) -> str:
        code = self.process.poll()
        if code is None:
            return ""
        tail = self.log.read_text(errors="replace")[-2000:]
        return f"llama-server {describe_exit(code)}:\n{tail}"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    binary = find_server_binary()
    assert binary is not None, "llama-server is not built: run bash .ci/setup"
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [str(binary), "--model", str(bundled_model_path()), "--jinja", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--ctx-size", "4096", "--parallel", "2", "--no-webui"]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = LlamaServer(process, f"http://127.0.0.1:{port}/v1", log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if server.died():
                pytest.fail(f"while starting, {server.died()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server did not serve within {STARTUP_TIMEOUT:.0f} s")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
                pytest.fail("llama-server ignored SIGTERM for 20 s and had to be killed")
    if process.returncode != 0:
        pytest.fail(f"llama-server {describe_exit(process.returncode)} at the end (expected status 0)")


@pytest.fixture(autouse=True)
def _alive(llama_server: LlamaServer) -> Iterator[None]:
    yield
    if llama_server.died():
        pytest.fail(f"during this test {llama_server.died()}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(llama_server: LlamaServer) -> AsyncIterator[RunningServer]:
    settings = Settings(
        address="127.0.0.1:0",
        default_backend="llama",
        backends={"llama": BackendSettings(kind="openai", base_url=llama_server.base_url, read_timeout=60.0)},
        tools=ToolSettings(weather_url="http://127.0.0.1:9/none"),
        shutdown_grace=1.0,
    )
    server = await start_server(settings)
    try:
        yield server
    finally:
        await server.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stub(service: RunningServer) -> AsyncIterator[pb_grpc.ToolchainServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(service.address)
    try:
        yield pb_grpc.ToolchainServiceStub(channel)
    finally:
        await channel.close(None)


def _stage() -> pb.StageRequest:
    return pb.StageRequest(
        user_prompt=PROMPT,
        tools=["calculator"],
        tool_phase=pb.PhaseOptions(max_tokens=64, temperature=0.0),
        synthesis_phase=pb.PhaseOptions(max_tokens=48, temperature=0.0),
    )


def _assert_results(results: Any) -> None:
    for result in results:
        assert result.call_id
        assert result.outcome in VALIDATED, result
        if result.outcome == pb.TOOL_OUTCOME_OK:
            assert result.tool_name == "calculator"
            json.loads(result.arguments)


def _assert_usage(stats: pb.PhaseStats) -> None:
    assert stats.usage.prompt_tokens > 0 and stats.usage.completion_tokens > 0
    assert stats.finish_reason in ("stop", "length", "tool_calls")


async def test_stream_synthesis(stub: pb_grpc.ToolchainServiceAsyncStub) -> None:
    events, code = await collect(stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=_stage())))
    assert code == grpc.StatusCode.OK, events[-1]
    names = kinds(events)
    assert names[-1] == "done" and names.count("done") == 1 and names.count("tool_summary") == 1
    assert [e.sequence for e in events] == list(range(len(events)))
    summary_at = names.index("tool_summary")
    tool_chunks = [e.chunk for e in events[:summary_at]]
    assert len(tool_chunks) >= 2, "the tool phase did not stream"
    _assert_results(events[summary_at].tool_summary.results)
    done = events[-1].done
    _assert_usage(done.tool_phase)
    if events[summary_at].tool_summary.results:
        synthesis = [e.chunk for e in events[summary_at + 1 : -1]]
        assert done.text == "".join(c.content for c in synthesis) and done.text
        _assert_usage(done.synthesis_phase)
    else:
        assert done.text == "".join(c.content for c in tool_chunks)


async def test_run_synthesis(stub: pb_grpc.ToolchainServiceAsyncStub) -> None:
    response = await stub.RunSynthesis(pb.RunSynthesisRequest(stage=_stage()))
    assert response.stage_id and response.text
    _assert_results(response.tool_results)
    _assert_usage(response.tool_phase)


async def test_stream_tools(stub: pb_grpc.ToolchainServiceAsyncStub) -> None:
    events, code = await collect(stub.StreamTools(pb.StreamToolsRequest(stage=_stage())))
    assert code == grpc.StatusCode.OK
    assert kinds(events)[-2:] == ["tool_summary", "done"]
    _assert_results(events[-2].tool_summary.results)
    assert not events[-1].done.HasField("synthesis_phase")


async def test_run_tools(stub: pb_grpc.ToolchainServiceAsyncStub) -> None:
    response = await stub.RunTools(pb.RunToolsRequest(stage=_stage()))
    assert response.stage_id
    _assert_results(response.tool_results)
    _assert_usage(response.tool_phase)
