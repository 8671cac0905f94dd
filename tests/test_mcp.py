"""Tools of MCP servers: real MCP servers (tests/mcp_servers/calc.py, on the SDK's server
API) over stdio (a child of the service) and over streamable HTTP (uvicorn in a process
the test starts), called through a real grpc.aio server when the fake model asks for
them. Each server logs what it saw to a file (MCP_TEST_LOG), which the tests read."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_service.config import McpServerSettings

from tests.conftest import Harness, collect, kinds, stage, start_harness, stop_harness
from tests.fakes.openai_backend import FakeBackend, JSONReply, SSEReply, call, completion, tool_call_chunks
from tests.fakes.server_process import run_serve, serve_env

ROOT = Path(__file__).resolve().parents[1]
CALC = ("-m", "tests.mcp_servers.calc")
TOKEN = "mcp-test-token-0123"
HEALTH = "toolchain.v1.ToolchainService/mcp/"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class McpLog:
    """What the test's MCP server processes saw, one JSON object per line."""

    path: Path
    killed: set[int] = field(default_factory=set)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def calls(self, tool: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["event"] == "call" and r["tool"] == tool]

    async def wait_for(
        self, matches: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        """The first record that matches, waiting for it up to `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    found = [r for r in self.records() if matches(r)]
                    if found:
                        return found[0]
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"no such record within {timeout}s: {self.records()}") from None


@pytest.fixture
def mcp_log(tmp_path: Path) -> Iterator[McpLog]:
    """The log, and at the end the check of how every MCP server process ended: each one
    that started exited by itself (the service closed it), except those the test killed."""
    log = McpLog(tmp_path / "mcp.jsonl")
    yield log
    records = log.records()
    started = {r["pid"] for r in records if r["event"] == "started"}
    exited = {r["pid"] for r in records if r["event"] == "exit"}
    assert started - exited - log.killed == set(), records


def stdio_server(log: McpLog, *args: str, **settings: Any) -> McpServerSettings:
    return McpServerSettings(
        command=sys.executable,
        args=(*CALC, *args),
        env={"MCP_TEST_LOG": str(log.path)},
        cwd=str(ROOT),
        **settings,
    )


@pytest_asyncio.fixture
async def http_url(mcp_log: McpLog) -> AsyncIterator[str]:
    """The calc server over streamable HTTP in a process of its own (it wants TOKEN in
    X-Test-Token); at the end it must stop cleanly on SIGTERM."""
    env = {**os.environ, "MCP_TEST_LOG": str(mcp_log.path), "MCP_TEST_TOKEN": TOKEN}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *CALC,
        "--http",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = asyncio.create_task(process.stderr.read())
    try:
        async with asyncio.timeout(30):
            port = int((await process.stdout.readline()).decode().strip() or "0")
        assert port, f"the HTTP MCP server did not start: {(await stderr).decode(errors='replace')}"
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(15):
                code = await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError("the HTTP MCP server did not stop on SIGTERM") from None
        errors = (await stderr).decode(errors="replace")
    assert code == 0, errors
    assert "Traceback" not in errors, errors


@contextlib.asynccontextmanager
async def harness(fake: FakeBackend, **servers: McpServerSettings) -> AsyncIterator[Harness]:
    h = await start_harness(fake, mcp_servers=servers)
    try:
        yield h
    finally:
        await stop_harness(h)


def ask_for(h: Harness, name: str, arguments: dict[str, Any] | str, *, stream: bool = False) -> None:
    """The model's next answer: one call of `name`."""
    if stream:
        h.fake.script(SSEReply(tool_call_chunks([(name, arguments)])))
    else:
        h.fake.script(JSONReply(completion(tool_calls=[call(name, arguments)])))


async def run_tools(h: Harness, tools: tuple[str, ...] = ()) -> pb.ToolCallResult:
    response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage("use a tool", tools=tools)), timeout=60)
    (result,) = response.tool_results
    return result


async def health_of(h: Harness, name: str) -> int:
    response = await health_pb2_grpc.HealthStub(h.channel).Check(
        health_pb2.HealthCheckRequest(service=HEALTH + name), timeout=5
    )
    status: int = response.status
    return status


async def test_mcp_tools_are_listed_with_their_source_and_schema(fake: FakeBackend, mcp_log: McpLog) -> None:
    calc = stdio_server(mcp_log)
    prefixed = stdio_server(mcp_log, "--clash", tool_prefix="other_")  # its "calculator" renamed
    async with harness(fake, calc=calc, other=prefixed) as h:
        listed = {t.name: t for t in (await h.stub.ListTools(pb.ListToolsRequest(), timeout=10)).tools}
        assert listed["add"].source == "mcp:calc" and listed["other_add"].source == "mcp:other"
        assert listed["other_calculator"].source == "mcp:other"
        assert listed["calculator"].source == "builtin" and listed["echo"].source == "builtin"
        schema = json_format.MessageToDict(listed["add"].parameters_schema)
        assert schema["properties"] == {
            "a": {"title": "A", "type": "integer"},
            "b": {"title": "B", "type": "integer"},
        }
        assert schema["required"] == ["a", "b"]
        assert listed["add"].description == "Add two integers."
        assert listed["add"].timeout.seconds == 10  # tools.timeout: the server sets none
        assert await health_of(h, "calc") == SERVING and await health_of(h, "other") == SERVING


async def check_the_model_calls_an_mcp_tool(
    fake: FakeBackend, mcp_log: McpLog, server: McpServerSettings
) -> None:
    async with harness(fake, calc=server) as h:
        ask_for(h, "add", {"a": 2, "b": 3})
        result = await run_tools(h)
        assert result.outcome == pb.TOOL_OUTCOME_OK, result.error
        assert json_format.MessageToDict(result.result) == {"result": 5}
        (seen,) = mcp_log.calls("add")
        assert (seen["a"], seen["b"]) == (2, 3)
        # The model was offered the MCP tool with the server's own schema.
        specs = {t["function"]["name"]: t["function"] for t in fake.requests[0]["tools"]}
        assert specs["add"]["parameters"]["properties"]["a"] == {"title": "A", "type": "integer"}
        # A tool error of the server is the call's FAILED outcome with its message.
        ask_for(h, "fail", {"reason": "no luck today"})
        failed = await run_tools(h)
        assert failed.outcome == pb.TOOL_OUTCOME_FAILED and failed.error.endswith("no luck today")


async def test_the_model_calls_a_tool_of_a_stdio_mcp_server(fake: FakeBackend, mcp_log: McpLog) -> None:
    await check_the_model_calls_an_mcp_tool(fake, mcp_log, stdio_server(mcp_log))


async def test_the_model_calls_a_tool_of_a_streamable_http_mcp_server_with_headers_from_the_environment(
    fake: FakeBackend, mcp_log: McpLog, http_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_MCP_TOKEN", TOKEN)
    server = McpServerSettings(url=http_url, headers_env={"X-Test-Token": "TEST_MCP_TOKEN"})
    await check_the_model_calls_an_mcp_tool(fake, mcp_log, server)
    assert not [r for r in mcp_log.records() if r["event"] == "refused"]  # the header went with each request


async def test_invalid_arguments_never_reach_the_mcp_server(fake: FakeBackend, mcp_log: McpLog) -> None:
    async with harness(fake, calc=stdio_server(mcp_log)) as h:
        ask_for(h, "add", {"a": "two", "b": 3, "c": 1})
        invalid = await run_tools(h)
        assert invalid.outcome == pb.TOOL_OUTCOME_INVALID_ARGUMENTS
        assert invalid.error.startswith("arguments do not match the tool's schema: ")
        assert "a: 'two' is not of type 'integer'" in invalid.error
        ask_for(h, "add", "[1, 2]")
        assert (await run_tools(h)).outcome == pb.TOOL_OUTCOME_INVALID_ARGUMENTS
        # A valid call on the same connection after them: the server saw only that one.
        ask_for(h, "add", {"a": 1, "b": 1})
        assert (await run_tools(h)).outcome == pb.TOOL_OUTCOME_OK
        assert [(c["a"], c["b"]) for c in mcp_log.calls("add")] == [(1, 1)]


async def test_a_slow_mcp_tool_times_out_and_the_server_sees_the_cancellation(
    fake: FakeBackend, mcp_log: McpLog
) -> None:
    async with harness(fake, calc=stdio_server(mcp_log, timeout=1.0)) as h:
        ask_for(h, "slow", {"seconds": 60, "tag": "late"})
        result = await run_tools(h)
        assert result.outcome == pb.TOOL_OUTCOME_TIMED_OUT
        assert result.error == "tool did not finish within 1 s"
        await mcp_log.wait_for(lambda r: r["event"] == "cancelled" and r.get("tag") == "late")
        # The connection is still good after the cancelled request.
        ask_for(h, "add", {"a": 4, "b": 5})
        assert json_format.MessageToDict((await run_tools(h)).result) == {"result": 9}


async def test_cancelling_the_stage_cancels_the_mcp_request(fake: FakeBackend, mcp_log: McpLog) -> None:
    async with harness(fake, calc=stdio_server(mcp_log)) as h:
        ask_for(h, "slow", {"seconds": 60, "tag": "abandoned"}, stream=True)
        request = pb.StreamToolsRequest(stage=stage(stage_id="mcp-cancel"))
        streamed = asyncio.create_task(collect(h.stub.StreamTools(request)))
        await mcp_log.wait_for(lambda r: r["event"] == "call" and r.get("tag") == "abandoned")
        await h.stub.CancelStage(pb.CancelStageRequest(stage_id="mcp-cancel"), timeout=10)
        events, code = await asyncio.wait_for(streamed, 30)
        assert code == grpc.StatusCode.CANCELLED and kinds(events)[-1] == "cancel", kinds(events)
        await mcp_log.wait_for(lambda r: r["event"] == "cancelled" and r.get("tag") == "abandoned")


class HealthWatch:
    """Every status grpc.health.v1 Watch sends for one service, as a client sees them."""

    def __init__(self, h: Harness, service: str) -> None:
        self.statuses: list[int] = []
        self._changed = asyncio.Event()
        self._call = health_pb2_grpc.HealthStub(h.channel).Watch(
            health_pb2.HealthCheckRequest(service=service)
        )
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self._call:
            self.statuses.append(response.status)
            self._changed.set()

    async def wait_for(self, sequence: list[int], timeout: float = 30.0) -> None:
        """Until `sequence` appears, in order, among the statuses."""

        def seen() -> bool:
            rest = iter(self.statuses)
            return all(any(s == want for s in rest) for want in sequence)

        try:
            async with asyncio.timeout(timeout):
                while not seen():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"health went {self.statuses}, not through {sequence}") from None

    async def close(self) -> None:
        self._call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def test_killing_the_stdio_server_mid_stage_fails_that_call_and_it_comes_back(
    fake: FakeBackend, mcp_log: McpLog
) -> None:
    # A long first backoff keeps the server away long enough to call it meanwhile.
    server = stdio_server(mcp_log, reconnect_initial_backoff=4.0)
    async with harness(fake, calc=server) as h:
        watch = HealthWatch(h, HEALTH + "calc")
        try:
            await watch.wait_for([SERVING])
            ask_for(h, "slow", {"seconds": 60, "tag": "doomed"}, stream=True)
            streamed = asyncio.create_task(collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage()))))
            seen = await mcp_log.wait_for(lambda r: r["event"] == "call" and r.get("tag") == "doomed")
            mcp_log.killed.add(seen["pid"])
            os.kill(seen["pid"], signal.SIGKILL)

            events, code = await asyncio.wait_for(streamed, 30)
            assert code == grpc.StatusCode.OK and kinds(events)[-1] == "done", kinds(events)
            (summary,) = [e.tool_summary for e in events if e.HasField("tool_summary")]
            (doomed,) = summary.results
            assert doomed.outcome == pb.TOOL_OUTCOME_FAILED
            assert doomed.error.startswith("MCP server 'calc' went away during the call"), doomed.error

            await watch.wait_for([SERVING, NOT_SERVING])
            ask_for(h, "add", {"a": 1, "b": 2})
            meanwhile = await run_tools(h)
            assert meanwhile.outcome == pb.TOOL_OUTCOME_FAILED
            assert meanwhile.error.startswith("MCP server 'calc' is not connected: "), meanwhile.error
            assert meanwhile.error.endswith("; reconnecting")

            await watch.wait_for([SERVING, NOT_SERVING, SERVING])
            ask_for(h, "add", {"a": 1, "b": 2})
            again = await run_tools(h)
            assert again.outcome == pb.TOOL_OUTCOME_OK, again.error
            assert json_format.MessageToDict(again.result) == {"result": 3}
            (call_seen,) = mcp_log.calls("add")
            assert call_seen["pid"] != seen["pid"]  # a new server process answered
        finally:
            await watch.close()


async def test_serve_exits_2_naming_the_mcp_server_that_cannot_start(fake: FakeBackend) -> None:
    broken = {
        "command": sys.executable,
        "args": ["-c", "import sys; print('no such luck', file=sys.stderr); sys.exit(3)"],
    }
    code, out, err = await run_serve(serve_env(fake, MCP_SERVERS=json.dumps({"broken": broken})), timeout=60)
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mcp_servers.broken: the MCP server did not start: "), lines[0]
    assert lines[0].endswith("(its last stderr line: no such luck)"), lines[0]


async def test_serve_exits_2_when_an_mcp_tool_takes_a_built_in_name(
    fake: FakeBackend, tmp_path: Path
) -> None:
    clash = {"command": sys.executable, "args": [*CALC, "--clash"], "cwd": str(ROOT)}
    env = serve_env(fake, MCP_SERVERS=json.dumps({"clash": clash}))
    code, _, err = await run_serve(env, timeout=60)
    assert code == 2, err
    assert err.strip().splitlines() == [
        "invalid configuration: mcp_servers.clash: the tool 'calculator' of the MCP server 'clash' has the"
        " name of a tool of the built-in; set mcp_servers.clash.tool_prefix to keep them apart"
    ], err


async def test_tools_enabled_may_name_mcp_tools_and_unknown_names_stop_start_up(
    fake: FakeBackend, mcp_log: McpLog
) -> None:
    from toolchain_service.config import ConfigError, ToolSettings

    weather = f"{fake.base_url}/weather-unused"
    h = await start_harness(
        fake,
        tools=ToolSettings(enabled=("add", "calculator"), weather_url=weather),
        mcp_servers={"calc": stdio_server(mcp_log)},
    )
    try:
        listed = [t.name for t in (await h.stub.ListTools(pb.ListToolsRequest(), timeout=10)).tools]
        assert listed == ["add", "calculator"]
    finally:
        await stop_harness(h)
    with pytest.raises(ConfigError) as caught:
        await start_harness(
            fake,
            tools=ToolSettings(enabled=("add", "word_count"), weather_url=weather),
            mcp_servers={"calc": stdio_server(mcp_log)},
        )
    assert str(caught.value).startswith("invalid configuration: tools.enabled: unknown tools: word_count;")
