"""The four stage RPCs through the service's ordinary OpenAI HTTP backend, against a real
llama.cpp server (`python -m llama_cpp.server`, llama-cpp-python's OpenAI-compatible
server) serving the bundled SmolLM2-135M-Instruct with `--chat_format
chatml-function-calling`.

Why the backend is configured with `streams_tool_calls=False`: llama.cpp's
chatml-function-calling handler cannot stream an automatically chosen tool call. With
`stream: true`, `tools` and `tool_choice: "auto"`, once the model picks a function the
handler raises ValueError("Automatic streaming tool choice is not supported"). Measured on
llama-cpp-python 0.3.36, the server does NOT answer that with an HTTP error status: the
SSE response has already begun, so the client gets HTTP 200 and an event stream that ends
at once with no event at all (no chunk, no finish reason, no `data: [DONE]`), the
traceback goes to the server's log, and the connection is dropped. (When the model picks
"message:" instead, the same request streams text normally.) `test_streamed_auto_tool_choice_
is_refused` shows this with the openai client directly; `test_streamed_tool_phase_would_fail`
shows what the service would report with the flag wrongly set to True (an UNAVAILABLE error,
never a silent empty success). With the flag False the runner asks for the tool phase
unstreamed and replays it as a chunk, and streams only the synthesis phase.

A known limitation of this server's chat format (not of the service): its template renders
no `tool` messages, so the synthesis prompt that reaches the model through this server lacks
the tool results. (The in-process local backend rewrites them as user messages; the HTTP
backend sends standard OpenAI messages.) Hence nothing here asserts on what the synthesis
text says, only that there is one.

Everything runs at temperature 0; the server is started once for the module and must exit
when terminated.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import pytest_asyncio
from google.protobuf.json_format import MessageToDict
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc
from toolchain_service.backends.local_llama import bundled_model_path
from toolchain_service.config import BackendSettings, Settings, ToolSettings
from toolchain_service.tools.calculator import evaluate
from toolchain_service.transport.server import RunningServer, start_server

from tests.conftest import collect, kinds

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]

PROMPT = "What is 12*7? Use the calculator."
REFUSAL = "Automatic streaming tool choice is not supported"
STARTUP_TIMEOUT = 90.0


@dataclass
class LlamaServer:
    process: subprocess.Popen[bytes]
    base_url: str
    model: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_serving(process: subprocess.Popen[bytes], base_url: str, log: Path) -> str:
    """The id of the server's model, once GET /v1/models answers."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            pytest.fail(f"llama_cpp.server exited with {process.returncode} while starting:\n{tail}")
        try:
            response = httpx.get(f"{base_url}/models", timeout=2.0)
        except httpx.TransportError:
            time.sleep(0.2)
            continue
        response.raise_for_status()
        models = response.json()["data"]
        assert models, response.text
        model: str = models[0]["id"]
        return model
    pytest.fail(f"llama_cpp.server did not answer within {STARTUP_TIMEOUT:.0f}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    port = _free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(bundled_model_path()),
        "--chat_format",
        "chatml-function-calling",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        model = _wait_until_serving(process, base_url, log)
        yield LlamaServer(process, base_url, model, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
                pytest.fail("llama_cpp.server ignored SIGTERM for 20 s and had to be killed")
    assert process.returncode is not None, "llama_cpp.server is still running"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(llama_server: LlamaServer) -> AsyncIterator[RunningServer]:
    def backend(streams_tool_calls: bool, max_retries: int) -> BackendSettings:
        return BackendSettings(
            kind="openai",
            base_url=llama_server.base_url,
            default_model=llama_server.model,
            streams_tool_calls=streams_tool_calls,
            tool_results_as_user=True,  # its template renders no tool messages (measured)
            max_retries=max_retries,
            read_timeout=60.0,
        )

    settings = Settings(
        address="127.0.0.1:0",
        default_backend="llama",
        backends={
            # The measured capability: see the module docstring.
            "llama": backend(streams_tool_calls=False, max_retries=2),
            # The same server with the flag wrongly set, to show what it would cost.
            "llama-streaming-tools": backend(streams_tool_calls=True, max_retries=0),
        },
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


def _stage(backend: str = "") -> pb.StageRequest:
    return pb.StageRequest(
        user_prompt=PROMPT,
        backend=backend,
        tools=["calculator"],
        tool_phase=pb.PhaseOptions(max_tokens=64, temperature=0.0),
        synthesis_phase=pb.PhaseOptions(max_tokens=48, temperature=0.0),
    )


def _assert_tool_summary(results: Any) -> None:
    """The model's calls, each validated; executed ones carry the calculator's own value."""
    assert len(results) >= 1, "the model made no tool call"
    for result in results:
        assert result.call_id
        assert result.outcome != pb.TOOL_OUTCOME_UNSPECIFIED
        if result.outcome == pb.TOOL_OUTCOME_OK:
            assert result.tool_name == "calculator"
            expression = json.loads(result.arguments)["expression"]
            assert MessageToDict(result.result)["result"] == evaluate(expression)
        else:  # an honest outcome: said why, and nothing ran unless it was executed
            assert result.error
    # The prompt was chosen so that the model writes a valid call (12*7).
    assert any(r.outcome == pb.TOOL_OUTCOME_OK for r in results), [(r.arguments, r.error) for r in results]


def _assert_tool_phase(stats: pb.PhaseStats, model: str) -> None:
    assert stats.finish_reason == "tool_calls"
    assert stats.retries == 0  # no transient failure was papered over
    assert stats.model == model
    assert stats.HasField("usage") and stats.usage.completion_tokens > 0


async def test_stream_synthesis(stub: pb_grpc.ToolchainServiceAsyncStub, llama_server: LlamaServer) -> None:
    events, code = await collect(stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=_stage())))
    assert code == grpc.StatusCode.OK, events[-1:] if events else "no events"
    names = kinds(events)
    assert names[-1] == "done" and names.count("tool_summary") == 1
    summary_at = names.index("tool_summary")
    # The tool phase was asked for unstreamed and replayed as one chunk.
    tool_chunks = [e.chunk for e in events[:summary_at]]
    assert len(tool_chunks) == 1 and tool_chunks[0].phase == pb.PHASE_TOOL
    assert tool_chunks[0].finish_reason == "tool_calls"
    _assert_tool_summary(events[summary_at].tool_summary.results)
    synthesis = [e.chunk for e in events[summary_at + 1 : -1]]
    assert synthesis and all(c.phase == pb.PHASE_SYNTHESIS for c in synthesis)
    assert len([c for c in synthesis if c.content]) >= 2  # streamed, not replayed
    done = events[-1].done
    assert done.text.strip()
    assert done.text == "".join(c.content for c in synthesis)
    _assert_tool_phase(done.tool_phase, llama_server.model)
    assert done.synthesis_phase.finish_reason in ("stop", "length")
    assert done.synthesis_phase.retries == 0


async def test_run_synthesis(stub: pb_grpc.ToolchainServiceAsyncStub, llama_server: LlamaServer) -> None:
    response = await stub.RunSynthesis(pb.RunSynthesisRequest(stage=_stage()), timeout=120)
    _assert_tool_summary(response.tool_results)
    assert response.text.strip()
    _assert_tool_phase(response.tool_phase, llama_server.model)
    assert response.synthesis_phase.finish_reason in ("stop", "length")
    assert response.synthesis_phase.HasField("usage")  # unstreamed answers carry usage


async def test_stream_tools(stub: pb_grpc.ToolchainServiceAsyncStub, llama_server: LlamaServer) -> None:
    events, code = await collect(stub.StreamTools(pb.StreamToolsRequest(stage=_stage())))
    assert code == grpc.StatusCode.OK, events[-1:] if events else "no events"
    assert kinds(events) == ["chunk", "tool_summary", "done"]
    assert events[0].chunk.phase == pb.PHASE_TOOL
    assert [d.name for d in events[0].chunk.tool_calls if d.name] == ["calculator"]
    _assert_tool_summary(events[1].tool_summary.results)
    _assert_tool_phase(events[2].done.tool_phase, llama_server.model)
    assert not events[2].done.HasField("synthesis_phase")


async def test_run_tools(stub: pb_grpc.ToolchainServiceAsyncStub, llama_server: LlamaServer) -> None:
    response = await stub.RunTools(pb.RunToolsRequest(stage=_stage()), timeout=120)
    _assert_tool_summary(response.tool_results)
    _assert_tool_phase(response.tool_phase, llama_server.model)


# -- the evidence behind streams_tool_calls=False ----------------------------------------


def _calculator_tool() -> Any:  # Any: the openai client types its tools as TypedDicts
    return {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    }


async def test_streamed_auto_tool_choice_is_refused(llama_server: LlamaServer) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You can call the calculator tool."},
        {"role": "user", "content": PROMPT},
    ]
    # A fresh client per request: the server drops the connection after the refusal.
    async with openai.AsyncOpenAI(base_url=llama_server.base_url, api_key="unused", max_retries=0) as client:
        plain = await client.chat.completions.create(
            model=llama_server.model,
            messages=messages,
            tools=[_calculator_tool()],
            tool_choice="auto",
            temperature=0.0,
        )
    # Unstreamed, the model picks the function: the request is one it can answer.
    assert plain.choices[0].finish_reason == "tool_calls"
    calls = plain.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls if c.type == "function"] == ["calculator"]

    log_before = len(llama_server.log_text())
    client = openai.AsyncOpenAI(base_url=llama_server.base_url, api_key="unused", max_retries=0)
    async with (
        client,
        client.chat.completions.with_streaming_response.create(
            model=llama_server.model,
            messages=messages,
            tools=[_calculator_tool()],
            tool_choice="auto",
            temperature=0.0,
            stream=True,
        ) as response,
    ):
        status = response.status_code
        lines = [line async for line in response.iter_lines() if line.strip()]
    # The refusal: HTTP 200 (the SSE response had begun), then nothing at all.
    assert status == 200
    assert lines == [], lines
    async with asyncio.timeout(10):
        while REFUSAL not in llama_server.log_text()[log_before:]:  # noqa: ASYNC110 - a log file
            await asyncio.sleep(0.1)


async def test_streamed_tool_phase_would_fail(stub: pb_grpc.ToolchainServiceAsyncStub) -> None:
    stage = _stage(backend="llama-streaming-tools")
    events, code = await collect(stub.StreamTools(pb.StreamToolsRequest(stage=stage)))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert kinds(events) == ["error"]
    error = events[0].error
    assert error.phase == pb.PHASE_TOOL
    assert error.retryable
    assert "closed the stream before it finished" in error.message
