"""The typed-SDK loop (its own process; the `sdk` rows): the stage's two phases done
directly with ONE shared `openai.AsyncOpenAI` client and its normal typed API, no gRPC, no
service: what a user would write instead of calling the service. (The floor proper, the
leanest loop, is `bench.lean_floor`.)

    python -m bench.floor --backend-url http://127.0.0.1:PORT/v1 --rpc StreamSynthesis -c 50 -n 2000
    python -m bench.floor --backend-url ... --first-byte 300   # raw-socket backend first byte

Per RPC it sends exactly the requests the service's runner sends (same bodies: the
benchmark compares their canonical digests at the backend): phase 1 with the tool specs
and the tool instructions as system prompt, unstreamed for the unary RPCs and streamed
(with usage) for the streaming ones; it assembles the tool call, validates the arguments
with the calculator's own pydantic model and runs `toolchain_service.tools.calculator`,
then phase 2 with the assistant and tool messages, streamed or not. The client's pool and
timeouts are the service's (the same `BackendSettings`). The first event is the first
chunk the service would forward (tool-call delta, content or finish reason).

Load generation and work share this process; `harness_cpu_ms` measures what the harness
itself costs per stage (same workers, same checks, a stage that does nothing) so the
parent can report the floor's work CPU separately from its harness CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai

from bench import common, scenario
from bench.driver import Harness, Stage, Summary, harness_cpu_ms
from bench.scenario import Expected


class FloorCheckFailed(Exception):
    """A floor stage that did not produce what the scenario must."""


@dataclass
class FloorResult:
    call_id: str = ""
    tool_name: str = ""
    arguments: str = ""
    tool_result: Any = None
    text: str = ""
    tool_events: int = 0
    synthesis_events: int = 0
    tool_finish: str = ""
    synthesis_finish: str = ""
    first: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def check(result: FloorResult, exp: Expected) -> None:
    problems = []
    if result.tool_name != scenario.TOOL_NAME or result.call_id != scenario.CALL_ID:
        problems.append(f"tool call {result.call_id!r} {result.tool_name!r}")
    if result.arguments != scenario.TOOL_ARGUMENTS:
        problems.append(f"arguments {result.arguments!r}")
    if result.tool_result != scenario.TOOL_RESULT:
        problems.append(f"tool result {result.tool_result!r}")
    if result.text != exp.text:
        problems.append(f"text {result.text[:200]!r}, expected {exp.text[:200]!r}")
    if result.tool_finish != "tool_calls":
        problems.append(f"tool finish {result.tool_finish!r}")
    if exp.synthesis and result.synthesis_finish != "stop":
        problems.append(f"synthesis finish {result.synthesis_finish!r}")
    if exp.streamed:
        if result.tool_events != exp.tool_chunks:
            problems.append(f"{result.tool_events} tool chunks, expected {exp.tool_chunks}")
        if exp.synthesis and result.synthesis_events != exp.synthesis_chunks:
            problems.append(f"{result.synthesis_events} synthesis chunks, expected {exp.synthesis_chunks}")
    if problems:
        raise FloorCheckFailed("; ".join(problems))


def valid_result(exp: Expected) -> FloorResult:
    """A result that passes `check` (the calibration stage returns it)."""
    return FloorResult(
        call_id=scenario.CALL_ID,
        tool_name=scenario.TOOL_NAME,
        arguments=scenario.TOOL_ARGUMENTS,
        tool_result=dict(scenario.TOOL_RESULT),
        text=exp.text,
        tool_events=exp.tool_chunks,
        synthesis_events=exp.synthesis_chunks,
        tool_finish="tool_calls",
        synthesis_finish="stop",
    )


class Floor:
    """The bare in-process loop, set up once as the service sets itself up once."""

    def __init__(self, backend_url: str, max_connections: int | None) -> None:
        from toolchain_service.tools.builtin import builtin_tools
        from toolchain_service.tools.calculator import Calculator, CalculatorArgs
        from toolchain_service.tools.registry import ToolRegistry

        settings = scenario.service_settings(backend_url, max_connections)
        backend = settings.backends["fake"]
        timeout = httpx2.Timeout(
            backend.request_timeout, connect=backend.connect_timeout, read=backend.read_timeout
        )
        self.client = openai.AsyncOpenAI(
            base_url=backend.base_url,
            api_key=backend.api_key(),
            max_retries=0,
            timeout=timeout,
            http_client=openai.DefaultAsyncHttpxClient(
                timeout=timeout,
                limits=httpx2.Limits(
                    max_connections=backend.max_connections,
                    max_keepalive_connections=backend.max_connections,
                ),
            ),
        )
        # The service's system prompt and tool specs (the registry caches both, as here).
        registry = ToolRegistry(builtin_tools(settings.tools), settings.tools)
        enabled = registry.names()
        self.system = registry.instructions(enabled).strip()
        self.tools: list[Any] = registry.specs(enabled)
        self.tool_phase = settings.tool_phase
        self.synthesis_phase = settings.synthesis_phase
        self.calculator = Calculator()
        self.arguments_model = CalculatorArgs

    async def aclose(self) -> None:
        await self.client.close()

    def first_request(self, stream: bool) -> dict[str, Any]:
        """The body of phase 1, as the openai client sends it (for the raw first-byte probe)."""
        body: dict[str, Any] = {
            "model": scenario.MODEL,
            "messages": self._messages(),
            "max_tokens": self.tool_phase.max_tokens,
            "temperature": self.tool_phase.temperature,
            "stream": stream,
            "tools": self.tools,
            "tool_choice": "auto",
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _messages(self) -> list[Any]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": scenario.USER_PROMPT}]

    async def _run_tool(self, result: FloorResult) -> None:
        if result.tool_name != scenario.TOOL_NAME:
            raise FloorCheckFailed(f"the model called {result.tool_name!r}")
        args = self.arguments_model.model_validate_json(result.arguments)
        result.tool_result = await self.calculator.execute(args)

    def _followup(self, messages: list[Any], result: FloorResult) -> list[Any]:
        return [
            *messages,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": result.call_id,
                        "type": "function",
                        "function": {"name": result.tool_name, "arguments": result.arguments},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": result.call_id,
                "content": json.dumps(result.tool_result, ensure_ascii=False),
            },
        ]

    async def unary(self, synthesis: bool) -> FloorResult:
        result = FloorResult()
        messages = self._messages()
        completion = await self.client.chat.completions.create(
            model=scenario.MODEL,
            messages=messages,
            max_tokens=self.tool_phase.max_tokens,
            temperature=self.tool_phase.temperature,
            stream=False,
            tools=self.tools,
            tool_choice="auto",
        )
        choice = completion.choices[0]
        result.tool_finish = choice.finish_reason or ""
        for call in choice.message.tool_calls or ():
            if call.type == "function":
                result.call_id, result.tool_name = call.id, call.function.name
                result.arguments = call.function.arguments
        await self._run_tool(result)
        if not synthesis:
            return result
        completion = await self.client.chat.completions.create(
            model=scenario.MODEL,
            messages=self._followup(messages, result),
            max_tokens=self.synthesis_phase.max_tokens,
            temperature=self.synthesis_phase.temperature,
            stream=False,
        )
        choice = completion.choices[0]
        result.synthesis_finish = choice.finish_reason or ""
        result.text = choice.message.content or ""
        return result

    async def streamed(self, synthesis: bool) -> FloorResult:
        result = FloorResult()
        messages = self._messages()
        stream = await self.client.chat.completions.create(
            model=scenario.MODEL,
            messages=messages,
            max_tokens=self.tool_phase.max_tokens,
            temperature=self.tool_phase.temperature,
            stream=True,
            stream_options={"include_usage": True},
            tools=self.tools,
            tool_choice="auto",
        )
        arguments: list[str] = []
        async for chunk in stream:
            if not chunk.choices:
                continue  # the usage chunk
            choice = chunk.choices[0]
            delta = choice.delta
            emitted = False
            for tc in delta.tool_calls or ():
                if tc.id and not result.call_id:
                    result.call_id = tc.id
                if tc.function is not None:
                    if tc.function.name and not result.tool_name:
                        result.tool_name = tc.function.name
                    if tc.function.arguments:
                        arguments.append(tc.function.arguments)
                emitted = True
            if delta.content:
                emitted = True
            if choice.finish_reason:
                result.tool_finish = choice.finish_reason
                emitted = True
            if emitted:
                result.tool_events += 1
                if not result.first:
                    result.first = time.perf_counter()
        result.arguments = "".join(arguments)
        await self._run_tool(result)
        if not synthesis:
            return result
        stream = await self.client.chat.completions.create(
            model=scenario.MODEL,
            messages=self._followup(messages, result),
            max_tokens=self.synthesis_phase.max_tokens,
            temperature=self.synthesis_phase.temperature,
            stream=True,
            stream_options={"include_usage": True},
        )
        text: list[str] = []
        async for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            content = choice.delta.content
            if content:
                text.append(content)
            if content or choice.finish_reason:
                result.synthesis_events += 1
            if choice.finish_reason:
                result.synthesis_finish = choice.finish_reason
        result.text = "".join(text)
        return result

    def stage(self, rpc: str, chunks: int) -> Stage:
        exp = scenario.expected(rpc, chunks)
        streamed, synthesis = exp.streamed, exp.synthesis

        async def run() -> tuple[float, float]:
            result = await (self.streamed(synthesis) if streamed else self.unary(synthesis))
            last = time.perf_counter()
            check(result, exp)
            return (result.first or last), last

        return run


async def first_byte(url: str, body: dict[str, Any], samples: int, warmup: int) -> dict[str, Any]:
    """Time from the request's last byte written to the response's first byte and to its
    first complete SSE event, with a raw keep-alive socket (no HTTP library), C=1."""
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    path = "/" + url.split("//", 1)[1].split("/", 1)[1].rstrip("/") + "/chat/completions"
    payload = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/json\r\n"
        f"Accept: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    reader, writer = await asyncio.open_connection(host, int(port))
    firsts: list[float] = []
    events: list[float] = []
    for i in range(warmup + samples):
        sent = time.perf_counter()
        writer.write(request)
        await writer.drain()
        buffer = b""
        got_first = got_event = 0.0
        while not buffer.endswith(b"0\r\n\r\n"):
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the backend closed the connection")
            now = time.perf_counter()
            got_first = got_first or now
            buffer += data
            if not got_event and b"\n\n" in buffer.split(b"\r\n\r\n", 1)[-1]:
                got_event = now
        if i >= warmup:
            firsts.append(got_first - sent)
            events.append(got_event - sent)
    writer.close()
    return {
        "first_byte": Summary.of(firsts).__dict__,
        "first_event": Summary.of(events).__dict__,
        "samples": samples,
    }


async def _drive(args: argparse.Namespace) -> int:
    floor = Floor(args.backend_url, args.max_connections)
    if args.first_byte:
        result = await first_byte(args.backend_url, floor.first_request(True), args.first_byte, 50)
        common.announce("RESULT " + json.dumps(result))
        await floor.aclose()
        return 0
    exp = scenario.expected(args.rpc, args.chunks)
    valid = valid_result(exp)
    calibration = await harness_cpu_ms(args.concurrency, args.calibrate, lambda: check(valid, exp))
    harness = Harness(floor.stage(args.rpc, args.chunks), args.concurrency, args.requests, args.warmup)
    harness.report.extra["harness_cpu_ms"] = calibration
    await harness.run()
    await floor.aclose()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--backend-url", required=True)
    parser.add_argument("--rpc", choices=scenario.RPCS, default="StreamSynthesis")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=scenario.DEFAULT_CHUNKS)
    parser.add_argument("--max-connections", type=int, default=None)
    parser.add_argument("--calibrate", type=int, default=5000, help="no-op stages for the harness share")
    parser.add_argument("--first-byte", type=int, default=0, help="measure the backend's first byte N times")
    return common.run(_drive(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
