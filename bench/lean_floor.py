"""The lean floor (its own process): the stage's two phases with the leanest HTTP client
there is, one connection pool, `json.loads` and dict access, no SDK, no pydantic, no gRPC.

    python -m bench.lean_floor --backend-url http://127.0.0.1:PORT/v1 --rpc StreamSynthesis -c 50 -n 2000
    python -m bench.lean_floor --backend-url ... --client httpx2      # another client

It answers "what does the service cost beyond the unavoidable": per RPC it sends exactly
the request bodies the service's runner sends (serialised once per call with `json.dumps`,
as the service does; the benchmark compares their canonical digests at the backend and
fails the row on a mismatch), parses the responses with `json.loads` (SSE split by hand),
assembles the tool call, checks the arguments by hand (a JSON object with a string
`expression`) and runs the calculator's own evaluator, then the synthesis phase. What it
leaves out is what the service adds: gRPC, events, validation against schemas,
metrics, logging, retries. The HTTP client is the leanest that `bench.http_clients`
measured among those the registries offer (`CLIENTS`; the default is `DEFAULT_CLIENT`);
`raw` is a hand-written asyncio-streams HTTP/1.1 client (keep-alive pool, chunked
decoding), kept as a reference for what any library costs on top.

The same `bench.driver` harness and calibration as `bench.floor` (the typed-SDK loop), so
the rows compare: `harness_cpu_ms` is the harness's own cost per stage, which the parent
subtracts from this process's CPU to get the floor's work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from bench import common, scenario
from bench.driver import Harness, Stage, harness_cpu_ms
from bench.floor import FloorCheckFailed, FloorResult, check, valid_result

#: The default client of the lean floor: the leanest registry client `bench.http_clients`
#: measured (see bench/README.md).
DEFAULT_CLIENT: Final = "aiohttp"
_DONE: Final = b"[DONE]"


class LeanHTTPError(Exception):
    """An HTTP status other than 200, or a response the lean client cannot read."""


class Client(Protocol):
    """POST a JSON body to /chat/completions: the whole response body, or its chunks."""

    async def post(self, body: bytes) -> bytes: ...

    def stream(self, body: bytes) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class _Target:
    """What every client needs: the URL parts, the headers, the pool size, the timeouts."""

    def __init__(self, base_url: str, max_connections: int | None) -> None:
        settings = scenario.service_settings(base_url, max_connections)
        backend = settings.backends["fake"]
        self.url = backend.base_url.rstrip("/") + "/chat/completions"
        parts = urlsplit(self.url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"the lean floor speaks plain http only: {self.url}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.netloc = parts.netloc
        self.path = parts.path
        self.headers = {
            "Authorization": f"Bearer {backend.api_key()}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        self.max_connections = backend.max_connections
        self.connect_timeout = backend.connect_timeout
        self.read_timeout = backend.read_timeout
        self.request_timeout = backend.request_timeout


class AiohttpClient:
    """aiohttp: one `ClientSession` (one `TCPConnector` pool), its C HTTP parser."""

    def __init__(self, target: _Target) -> None:
        import aiohttp
        import yarl

        self._url = yarl.URL(target.url)
        self._session = aiohttp.ClientSession(
            headers=target.headers,
            connector=aiohttp.TCPConnector(limit=target.max_connections, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(
                total=target.request_timeout,
                # sock_connect, not connect: aiohttp's `connect` also counts the wait for a
                # free pool slot, which 1,000 streams on a 256-connection pool must do
                sock_connect=target.connect_timeout,
                sock_read=target.read_timeout,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )

    async def post(self, body: bytes) -> bytes:
        async with self._session.post(self._url, data=body) as response:
            data = await response.read()
            if response.status != 200:
                raise LeanHTTPError(f"HTTP {response.status}: {data[:200]!r}")
            return data

    async def stream(self, body: bytes) -> AsyncIterator[bytes]:
        async with self._session.post(self._url, data=body) as response:
            if response.status != 200:
                raise LeanHTTPError(f"HTTP {response.status}")
            async for chunk in response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        await self._session.close()


class Httpx2Client:
    """httpx2 as the service uses it: `build_request` + `send(stream=True)`, raw bytes."""

    def __init__(self, target: _Target) -> None:
        import httpx2

        self._client = httpx2.AsyncClient(
            headers=target.headers,
            timeout=httpx2.Timeout(
                target.request_timeout, connect=target.connect_timeout, read=target.read_timeout
            ),
            limits=httpx2.Limits(
                max_connections=target.max_connections,
                max_keepalive_connections=target.max_connections,
            ),
        )
        self._url = httpx2.URL(target.url)

    async def post(self, body: bytes) -> bytes:
        response = await self._client.send(self._client.build_request("POST", self._url, content=body))
        if response.status_code != 200:
            raise LeanHTTPError(f"HTTP {response.status_code}: {response.content[:200]!r}")
        return response.content

    async def stream(self, body: bytes) -> AsyncIterator[bytes]:
        request = self._client.build_request("POST", self._url, content=body)
        response = await self._client.send(request, stream=True)
        try:
            if response.status_code != 200:
                raise LeanHTTPError(f"HTTP {response.status_code}")
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()


class Httpcore2Client:
    """httpcore2, the transport under httpx2, used directly: its connection pool alone."""

    def __init__(self, target: _Target) -> None:
        import httpcore2

        self._pool = httpcore2.AsyncConnectionPool(
            max_connections=target.max_connections, max_keepalive_connections=target.max_connections
        )
        self._url = httpcore2.URL(target.url)
        self._headers = [(k.encode(), v.encode()) for k, v in target.headers.items()]
        self._extensions = {
            "timeout": {
                "connect": target.connect_timeout,
                "read": target.read_timeout,
                "write": target.request_timeout,
                "pool": target.request_timeout,
            }
        }

    async def post(self, body: bytes) -> bytes:
        response = await self._pool.request(
            b"POST", self._url, headers=self._headers, content=body, extensions=self._extensions
        )
        if response.status != 200:
            raise LeanHTTPError(f"HTTP {response.status}: {response.content[:200]!r}")
        return response.content

    async def stream(self, body: bytes) -> AsyncIterator[bytes]:
        async with self._pool.stream(
            b"POST", self._url, headers=self._headers, content=body, extensions=self._extensions
        ) as response:
            if response.status != 200:
                raise LeanHTTPError(f"HTTP {response.status}")
            async for chunk in response.aiter_stream():
                yield chunk

    async def aclose(self) -> None:
        await self._pool.aclose()


class PyreqwestClient:
    """pyreqwest (Rust reqwest on its own tokio threads): measured when installed, not a
    project dependency. Its threads' CPU counts: the process's CPU is what is measured."""

    def __init__(self, target: _Target) -> None:
        from datetime import timedelta

        client: Any = importlib.import_module("pyreqwest.client")
        self._client: Any = (
            client.ClientBuilder()
            .max_connections(target.max_connections)
            .default_headers(target.headers)
            .connect_timeout(timedelta(seconds=target.connect_timeout))
            .read_timeout(timedelta(seconds=target.read_timeout))
            .timeout(timedelta(seconds=target.request_timeout))
            .gzip(False)
            .http1_only()
            .build()
        )
        self._url = target.url

    async def post(self, body: bytes) -> bytes:
        response = await self._client.post(self._url).body_bytes(body).build().send()
        data = bytes(await response.bytes())
        if response.status != 200:
            raise LeanHTTPError(f"HTTP {response.status}: {data[:200]!r}")
        return data

    async def stream(self, body: bytes) -> AsyncIterator[bytes]:
        async with self._client.post(self._url).body_bytes(body).build_streamed() as response:
            if response.status != 200:
                raise LeanHTTPError(f"HTTP {response.status}")
            reader = response.body_reader
            while (chunk := await reader.read_chunk()) is not None:
                yield bytes(chunk)

    async def aclose(self) -> None:
        await self._client.close()


class AiosonicClient:
    """aiosonic: measured when installed, not a project dependency."""

    def __init__(self, target: _Target) -> None:
        aiosonic: Any = importlib.import_module("aiosonic")
        pools: Any = importlib.import_module("aiosonic.pools")
        timeouts = aiosonic.Timeouts(
            sock_connect=target.connect_timeout,
            sock_read=target.read_timeout,
            request_timeout=target.request_timeout,
        )
        connector = aiosonic.TCPConnector(
            pool_configs={":default": pools.PoolConfig(size=target.max_connections)}, timeouts=timeouts
        )
        self._client: Any = aiosonic.HTTPClient(connector=connector)
        self._url = target.url
        self._headers = target.headers

    async def post(self, body: bytes) -> bytes:
        response = await self._client.post(self._url, data=body, headers=self._headers)
        data: bytes = await response.content()
        if response.status_code != 200:
            raise LeanHTTPError(f"HTTP {response.status_code}: {data[:200]!r}")
        return data

    async def stream(self, body: bytes) -> AsyncIterator[bytes]:
        response = await self._client.post(self._url, data=body, headers=self._headers)
        if response.status_code != 200:
            raise LeanHTTPError(f"HTTP {response.status_code}")
        async for chunk in response.read_chunks():
            yield chunk

    async def aclose(self) -> None:
        await self._client.connector.cleanup()


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class RawClient:
    """A hand-written HTTP/1.1 client on asyncio streams: a keep-alive pool of at most
    `max_connections`, Content-Length and chunked bodies, `Connection: close` honoured,
    a connection dropped on any error. No TLS, proxies, redirects or compression: the
    least any HTTP/1.1 client must do for these requests."""

    def __init__(self, target: _Target) -> None:
        self._host, self._port = target.host, target.port
        head = f"POST {target.path} HTTP/1.1\r\nHost: {target.netloc}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
        self._head = head.encode("latin-1")
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(target.max_connections)
        self._connect_timeout = target.connect_timeout
        self._timeout = target.request_timeout

    async def _acquire(self) -> _Connection:
        await self._slots.acquire()
        if self._idle:
            return self._idle.pop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await asyncio.open_connection(self._host, self._port)
        except BaseException:
            self._slots.release()
            raise

    def _release(self, connection: _Connection, reusable: bool) -> None:
        if reusable:
            self._idle.append(connection)
        else:
            connection[1].close()
        self._slots.release()

    async def _request(self, connection: _Connection, body: bytes) -> tuple[int, int, bool]:
        """Send; read the response head: (status, content length or -1 if chunked, keep-alive)."""
        reader, writer = connection
        writer.write(b"%sContent-Length: %d\r\n\r\n%s" % (self._head, len(body), body))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise LeanHTTPError(f"not an HTTP/1.x response: {lines[0][:100]!r}")
        status = int(status_line[1])
        length, keep_alive = -2, status_line[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    raise LeanHTTPError(f"unsupported transfer-encoding {value.strip()!r}")
                length = -1
            elif name == b"connection":
                keep_alive = value.strip().lower() == b"keep-alive"
        if length == -2:  # delimited by the connection's end
            raise LeanHTTPError("a response without Content-Length or chunked encoding")
        return status, length, keep_alive

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]

    async def post(self, body: bytes) -> bytes:
        connection = await self._acquire()
        reusable = False
        try:
            async with asyncio.timeout(self._timeout):
                status, length, keep_alive = await self._request(connection, body)
                if length >= 0:
                    data = await connection[0].readexactly(length)
                else:
                    data = b"".join([chunk async for chunk in self._chunks(connection[0])])
            reusable = keep_alive
        finally:
            self._release(connection, reusable)
        if status != 200:
            raise LeanHTTPError(f"HTTP {status}: {data[:200]!r}")
        return data

    async def stream(self, body: bytes) -> AsyncIterator[bytes]:
        connection = await self._acquire()
        reusable = False
        try:
            async with asyncio.timeout(self._timeout):
                status, length, keep_alive = await self._request(connection, body)
                if status != 200:
                    raise LeanHTTPError(f"HTTP {status}")
                if length >= 0:
                    yield await connection[0].readexactly(length)
                else:
                    async for chunk in self._chunks(connection[0]):
                        yield chunk
            reusable = keep_alive
        finally:
            self._release(connection, reusable)

    async def aclose(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


CLIENTS: Final[dict[str, Callable[[_Target], Client]]] = {
    "aiohttp": AiohttpClient,
    "httpx2": Httpx2Client,
    "httpcore2": Httpcore2Client,
    "raw": RawClient,
    # Not project dependencies: measured by bench.http_clients when importable.
    "pyreqwest": PyreqwestClient,
    "aiosonic": AiosonicClient,
}
#: The clients whose package is not a project dependency, by the module they need.
OPTIONAL: Final = {"pyreqwest": "pyreqwest", "aiosonic": "aiosonic"}


def available(name: str) -> bool:
    module = OPTIONAL.get(name)
    return module is None or importlib.util.find_spec(module) is not None


def make_client(name: str, base_url: str, max_connections: int | None) -> Client:
    return CLIENTS[name](_Target(base_url, max_connections))


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete SSE events' `data` payloads in `buffer` (LF-framed, as OpenAI-compatible
    servers send them), and what is left for the next chunk."""
    payloads: list[bytes] = []
    start = 0
    while True:
        end = buffer.find(b"\n\n", start)
        if end < 0:
            return payloads, buffer[start:]
        event = buffer[start:end]
        start = end + 2
        if event.startswith(b"data: ") and b"\n" not in event:  # the usual one-line event
            payloads.append(event[6:])
            continue
        data = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        if data:
            payloads.append(b"\n".join(data))


class Lean:
    """The lean loop, set up once: the service's system prompt and tool specs (computed once,
    as the service's registry caches them), one client."""

    def __init__(self, client: Client, backend_url: str, max_connections: int | None) -> None:
        from toolchain_service.tools.builtin import builtin_tools
        from toolchain_service.tools.calculator import evaluate
        from toolchain_service.tools.registry import ToolRegistry

        settings = scenario.service_settings(backend_url, max_connections)
        registry = ToolRegistry(builtin_tools(settings.tools), settings.tools)
        enabled = registry.names()
        self.client = client
        self.system = registry.instructions(enabled).strip()
        self.tools: list[Any] = registry.specs(enabled)
        self.tool_phase = settings.tool_phase
        self.synthesis_phase = settings.synthesis_phase
        self.evaluate = evaluate

    def _messages(self) -> list[Any]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": scenario.USER_PROMPT}]

    def _tool_body(self, messages: list[Any], stream: bool) -> bytes:
        body: dict[str, Any] = {
            "model": scenario.MODEL,
            "messages": messages,
            "max_tokens": self.tool_phase.max_tokens,
            "temperature": self.tool_phase.temperature,
            "stream": stream,
            "tools": self.tools,
            "tool_choice": "auto",
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    def _synthesis_body(self, messages: list[Any], result: FloorResult, stream: bool) -> bytes:
        body: dict[str, Any] = {
            "model": scenario.MODEL,
            "messages": [
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
            ],
            "max_tokens": self.synthesis_phase.max_tokens,
            "temperature": self.synthesis_phase.temperature,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    def _run_tool(self, result: FloorResult) -> None:
        if result.tool_name != scenario.TOOL_NAME:
            raise FloorCheckFailed(f"the model called {result.tool_name!r}")
        args = json.loads(result.arguments)
        expression = args.get("expression") if isinstance(args, dict) else None
        if not isinstance(expression, str) or len(args) != 1:
            raise FloorCheckFailed(f"calculator arguments {result.arguments!r}")
        result.tool_result = {"expression": expression, "result": self.evaluate(expression)}

    async def unary(self, synthesis: bool) -> FloorResult:
        result = FloorResult()
        messages = self._messages()
        choice = json.loads(await self.client.post(self._tool_body(messages, False)))["choices"][0]
        result.tool_finish = choice.get("finish_reason") or ""
        for call in choice["message"].get("tool_calls") or ():
            function = call["function"]
            result.call_id, result.tool_name = call["id"], function["name"]
            result.arguments = function["arguments"]
        self._run_tool(result)
        if not synthesis:
            return result
        body = self._synthesis_body(messages, result, False)
        choice = json.loads(await self.client.post(body))["choices"][0]
        result.synthesis_finish = choice.get("finish_reason") or ""
        result.text = choice["message"].get("content") or ""
        return result

    async def streamed(self, synthesis: bool) -> FloorResult:
        result = FloorResult()
        messages = self._messages()
        arguments: list[str] = []
        buffer = b""
        done = False
        async for chunk in self.client.stream(self._tool_body(messages, True)):
            payloads, buffer = split_events(buffer + chunk if buffer else chunk)
            for payload in payloads:
                if payload == _DONE:
                    done = True
                    continue
                choices = json.loads(payload).get("choices")
                if not choices:
                    continue  # the usage chunk
                choice = choices[0]
                delta = choice.get("delta") or {}
                emitted = False
                for tc in delta.get("tool_calls") or ():
                    if tc.get("id") and not result.call_id:
                        result.call_id = tc["id"]
                    function = tc.get("function")
                    if function:
                        if function.get("name") and not result.tool_name:
                            result.tool_name = function["name"]
                        if function.get("arguments"):
                            arguments.append(function["arguments"])
                    emitted = True
                if delta.get("content"):
                    emitted = True
                finish = choice.get("finish_reason")
                if finish:
                    result.tool_finish = finish
                    emitted = True
                if emitted:
                    result.tool_events += 1
                    if not result.first:
                        result.first = time.perf_counter()
        if not done:
            raise FloorCheckFailed("the tool phase's stream ended without [DONE]")
        result.arguments = "".join(arguments)
        self._run_tool(result)
        if not synthesis:
            return result
        text: list[str] = []
        buffer = b""
        done = False
        async for chunk in self.client.stream(self._synthesis_body(messages, result, True)):
            payloads, buffer = split_events(buffer + chunk if buffer else chunk)
            for payload in payloads:
                if payload == _DONE:
                    done = True
                    continue
                choices = json.loads(payload).get("choices")
                if not choices:
                    continue
                choice = choices[0]
                content = (choice.get("delta") or {}).get("content")
                finish = choice.get("finish_reason")
                if content:
                    text.append(content)
                if content or finish:
                    result.synthesis_events += 1
                if finish:
                    result.synthesis_finish = finish
        if not done:
            raise FloorCheckFailed("the synthesis phase's stream ended without [DONE]")
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


async def _drive(args: argparse.Namespace) -> int:
    client = make_client(args.client, args.backend_url, args.max_connections)
    lean = Lean(client, args.backend_url, args.max_connections)
    exp = scenario.expected(args.rpc, args.chunks)
    valid = valid_result(exp)
    calibration = await harness_cpu_ms(args.concurrency, args.calibrate, lambda: check(valid, exp))
    harness = Harness(lean.stage(args.rpc, args.chunks), args.concurrency, args.requests, args.warmup)
    harness.report.extra["harness_cpu_ms"] = calibration
    harness.report.extra["client"] = args.client
    await harness.run()
    await client.aclose()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lean_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--backend-url", required=True)
    parser.add_argument("--rpc", choices=scenario.RPCS, default="StreamSynthesis")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=scenario.DEFAULT_CHUNKS)
    parser.add_argument("--max-connections", type=int, default=None)
    parser.add_argument("--calibrate", type=int, default=5000, help="no-op stages for the harness share")
    parser.add_argument("--client", choices=sorted(CLIENTS), default=DEFAULT_CLIENT, help="HTTP client")
    return common.run(_drive(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
