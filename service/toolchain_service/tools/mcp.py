"""Tools of MCP servers, through the official `mcp` SDK (the only module that imports it).

    McpServer (one per `mcp_servers.<name>`), a supervisor task:

        connect (stdio child, or streamable HTTP) ─▶ list its tools ─▶ CONNECTED
             ▲                                                            │ the child exits, the
             │ wait (reconnect_initial_backoff, doubling                  │ stream ends, or a call
             │ up to reconnect_max_backoff)                               ▼ finds it closed
             └──────────────────────────────────────────────────── DISCONNECTED

    McpTool: one tool of a server, offered to the model under `tool_prefix + name`.

At start-up the first connection must succeed within `connect_timeout`, or the server
does not start (`ConfigError` naming `mcp_servers.<name>`). Its tools are listed then and
stay as listed for the process's life. Later, a server that goes away is reconnected with
backoff; meanwhile its tools answer FAILED ("MCP server 'x' is not connected: ...;
reconnecting") and `is_ready()` is False (health: `.../mcp/<name>` NOT_SERVING).

Arguments are validated against the tool's `inputSchema` (jsonschema) before anything is
sent. A call runs in the stage's task: its timeout or the stage's cancellation cancels the
awaiting task, and the SDK sends the server `notifications/cancelled` for the request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, TextIO

import anyio
import httpx2
from jsonschema import SchemaError  # type: ignore[import-untyped]  # no type information shipped
from jsonschema.validators import validator_for  # type: ignore[import-untyped]
from mcp import Client, ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp import types as mcp_types
from mcp.client import Transport
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage

from toolchain_service.config import ConfigError, McpServerSettings
from toolchain_service.tools.base import InvalidArguments, JSONValue, Tool, ToolFailure
from toolchain_service.utf8 import valid

log = logging.getLogger(__name__)

#: The names a model can call (the OpenAI function-name rule).
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CLIENT_INFO = mcp_types.Implementation(name="toolchain-grpc", version="0.1.0")
_MAX_PAGES = 100  # of a tools/list walk: a server whose cursor never ends cannot hang start-up
_READ_TIMEOUT = 300.0  # seconds an HTTP response stream may stay silent (the SDK's default)


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside the task-group wrappers anyio puts around it."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException, connect_timeout: float) -> str:
    exc = _leaf(exc)
    if isinstance(exc, TimeoutError):
        return f"no answer within {connect_timeout:g} s"
    if isinstance(exc, MCPError):
        return exc.message or "the connection failed"
    if isinstance(exc, FileNotFoundError):
        return f"no such command: {exc.filename or exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, httpx2.HTTPError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _EndWatch:
    """A transport's read stream that sets `ended` when it ends: a stdio child that exits
    (or an HTTP transport that closes) is noticed at once, not at the next call."""

    def __init__(self, inner: Any, ended: asyncio.Event) -> None:
        self._inner = inner
        self._ended = ended

    @property
    def last_context(self) -> Any:  # read by the SDK's dispatcher where the inner has one
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            item: SessionMessage | Exception = await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._ended.set()
            raise
        return item

    def __aiter__(self) -> _EndWatch:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _EndWatch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@contextlib.asynccontextmanager
async def _watched(transport: Transport, ended: asyncio.Event) -> AsyncIterator[tuple[Any, Any]]:
    """The transport, its read stream watched (a `Transport` for `Client`)."""
    async with transport as (read, write):
        yield _EndWatch(read, ended), write


class _StderrTail:
    """The stdio child's stderr: each line logged at DEBUG, the last ones kept for the
    message that says why the server went away."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.lines: collections.deque[str] = collections.deque(maxlen=20)
        self._read_fd, write_fd = os.pipe()
        self.file: TextIO = os.fdopen(write_fd, "w")  # given to the child as its stderr
        self._task = asyncio.get_running_loop().create_task(
            self._pump(), name=f"toolchain-mcp-{server}-stderr"
        )

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(self._read_fd, "rb", 0)
        )
        try:
            while line := await reader.readline():
                text = valid(line.decode("utf-8", errors="replace").rstrip())
                if text.strip():
                    self.lines.append(text)
                    log.debug("MCP server %s: %s", self.server, text)
        finally:
            transport.close()

    def spawned(self) -> None:
        """The child has its own copy of the pipe: the pump ends when the child does."""
        if not self.file.closed:
            self.file.close()

    def last_line(self) -> str:
        return self.lines[-1][:300] if self.lines else ""

    async def aclose(self) -> None:
        self.spawned()
        try:
            async with asyncio.timeout(2.0):  # a grandchild may hold the pipe open
                await self._task
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _content_value(block: mcp_types.ContentBlock) -> JSONValue:
    if isinstance(block, mcp_types.TextContent):
        return block.text
    return block.model_dump(mode="json", by_alias=True, exclude_none=True)


def _result_value(result: mcp_types.CallToolResult) -> JSONValue:
    """What the model is given: the structured result where there is one, else the text
    (one text block), else every block (text as strings, others as their JSON)."""
    if result.structured_content is not None:
        return result.structured_content
    if len(result.content) == 1 and isinstance(result.content[0], mcp_types.TextContent):
        return result.content[0].text
    return [_content_value(block) for block in result.content]


def _error_text(result: mcp_types.CallToolResult) -> str:
    texts = [b.text for b in result.content if isinstance(b, mcp_types.TextContent) and b.text.strip()]
    return valid(" ".join(texts)[:1000]) or "the tool reported an error"


class McpServer:
    """One configured MCP server: its connection, kept up by a supervisor task, and its
    tools. States are drawn in the module docstring."""

    def __init__(self, name: str, settings: McpServerSettings) -> None:
        self.name = name
        self.settings = settings
        self.key = f"mcp_servers.{name}"
        self.tools: list[McpTool] = []
        #: Called (on the event loop) when `is_ready()` may have changed.
        self.state_listeners: list[Callable[[], None]] = []
        self._session: ClientSession | None = None
        self._ended: asyncio.Event | None = None
        self._problem = "not connected yet"
        self._first: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._reconnecting = False
        self._stderr: _StderrTail | None = None

    # -- state ---------------------------------------------------------------------

    def is_ready(self) -> bool:
        return self._session is not None

    def _notify(self) -> None:
        for listener in list(self.state_listeners):
            listener()

    def _connected(self, session: ClientSession, ended: asyncio.Event) -> None:
        self._session, self._ended = session, ended
        # At start-up the server logs the tools once they all passed their checks.
        log.log(logging.INFO if self._reconnecting else logging.DEBUG, "MCP server %s: connected", self.name)
        self._reconnecting = True
        self._notify()

    def _disconnected(self, problem: str) -> None:
        self._problem = problem
        if self._session is not None:
            self._session = None
            if not self._closing:
                log.warning("MCP server %s went away: %s; reconnecting", self.name, problem)
            self._notify()

    def _with_stderr(self, problem: str) -> str:
        last = self._stderr.last_line() if self._stderr is not None else ""
        return f"{problem} (its last stderr line: {last})" if last else problem

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and list the tools, or raise ConfigError naming the server's key."""
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._supervise(), name=f"toolchain-mcp-{self.name}")
        try:
            await self._first
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._disconnected("the server is shutting down")

    async def _supervise(self) -> None:
        first = self._first
        delay = self.settings.reconnect_initial_backoff
        while True:
            was_connected = False
            try:
                was_connected = await self._connection()
                problem = "the connection closed"
            except asyncio.CancelledError:
                if self._closing:
                    raise
                # An SDK task group gave up on the connection and cancelled its host.
                problem = "the connection was cancelled"
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            except Exception as exc:
                problem = _describe(exc, self.settings.connect_timeout)
            problem = self._with_stderr(problem)
            if first is not None and not first.done():
                first.set_exception(ConfigError(f"{self.key}: the MCP server did not start: {problem}"))
                return
            self._disconnected(problem)
            if was_connected:
                delay = self.settings.reconnect_initial_backoff
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.reconnect_max_backoff)

    async def _connection(self) -> bool:
        """One connection, from connecting to its end; True once it was up."""
        ended = asyncio.Event()
        try:
            async with contextlib.AsyncExitStack() as stack:
                transport = await self._transport(stack)
                client = Client(_watched(transport, ended), client_info=_CLIENT_INFO, cache=None)
                try:
                    async with asyncio.timeout(self.settings.connect_timeout):
                        await stack.enter_async_context(client)
                        listed = await self._list_tools(client.session)
                finally:
                    if self._stderr is not None:
                        self._stderr.spawned()
                self._adopt(listed)
                if self._first is not None and not self._first.done():
                    self._first.set_result(None)
                self._connected(client.session, ended)
                try:
                    await ended.wait()
                finally:
                    self._disconnected(self._with_stderr("the connection closed"))
                return True
        finally:
            if self._stderr is not None:
                await self._stderr.aclose()

    async def _transport(self, stack: contextlib.AsyncExitStack) -> Transport:
        if self.settings.url:
            http = httpx2.AsyncClient(
                headers=self.settings.headers(),
                timeout=httpx2.Timeout(self.settings.connect_timeout, read=_READ_TIMEOUT),
            )
            await stack.enter_async_context(http)
            return streamable_http_client(self.settings.url, http_client=http)
        self._stderr = _StderrTail(self.name)
        params = StdioServerParameters(
            command=self.settings.command,
            args=list(self.settings.args),
            env=self.settings.child_env() or None,
            cwd=self.settings.cwd or None,
        )
        return stdio_client(params, errlog=self._stderr.file)

    async def _list_tools(self, session: ClientSession) -> list[mcp_types.Tool]:
        listed: list[mcp_types.Tool] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await session.list_tools(params=params)
            listed.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        return listed

    def _adopt(self, listed: list[mcp_types.Tool]) -> None:
        """The first listing makes the tools; later ones are only compared with it."""
        if self.tools:
            now = {t.name for t in listed}
            before = {t.remote_name for t in self.tools}
            if now != before:
                log.warning(
                    "MCP server %s now lists other tools (%s); the ones listed at start-up stay"
                    " offered until the service restarts",
                    self.name,
                    ", ".join(sorted(now ^ before)),
                )
            return
        for listed_tool in listed:
            name = self.settings.tool_prefix + listed_tool.name
            if not _FUNCTION_NAME.match(name):
                log.warning(
                    "MCP server %s: tool %r is not offered: a tool name is 1-64 letters, digits, '_' or '-'",
                    self.name,
                    name,
                )
                continue
            try:
                self.tools.append(McpTool(self, listed_tool))
            except SchemaError as exc:
                log.warning(
                    "MCP server %s: tool %r is not offered: its inputSchema is no JSON schema: %s",
                    self.name,
                    name,
                    str(exc).splitlines()[0],
                )

    # -- calls -----------------------------------------------------------------------

    async def call(self, tool: str, arguments: dict[str, Any]) -> JSONValue:
        """Call `tool` (the server's own name for it); ToolFailure when it fails."""
        session = self._session
        if session is None:
            raise ToolFailure(f"MCP server {self.name!r} is not connected: {self._problem}; reconnecting")
        try:
            result = await session.call_tool(tool, arguments)
        except MCPError as exc:
            if exc.code == mcp_types.CONNECTION_CLOSED:
                self._lost()
                raise ToolFailure(
                    f"MCP server {self.name!r} went away during the call ({exc.message}); reconnecting"
                ) from None
            message = valid(exc.message[:1000])
            raise ToolFailure(f"MCP server {self.name!r} refused the call: {message}") from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._lost()
            raise ToolFailure(f"MCP server {self.name!r} went away during the call; reconnecting") from None
        except (RuntimeError, ValueError) as exc:  # an answer the SDK could not use
            raise ToolFailure(f"MCP server {self.name!r} answered something unusable: {exc}") from None
        if result.is_error:
            raise ToolFailure(_error_text(result))
        return _result_value(result)

    def _lost(self) -> None:
        if self._ended is not None:
            self._ended.set()


class McpTool(Tool[dict[str, Any]]):
    """One tool of an MCP server."""

    def __init__(self, server: McpServer, listed: mcp_types.Tool) -> None:
        self.server = server
        self.remote_name = listed.name
        self.name = server.settings.tool_prefix + listed.name
        self.description = listed.description or listed.title or listed.name
        self.source = f"mcp:{server.name}"
        self.timeout = server.settings.timeout
        self._schema = dict(listed.input_schema)
        cls = validator_for(self._schema)
        cls.check_schema(self._schema)  # SchemaError: the tool is not offered
        self._validator = cls(self._schema)

    def parameters_schema(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._schema))  # type: ignore[no-any-return]  # a copy the caller may change

    def parse_arguments(self, text: str) -> dict[str, Any]:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise InvalidArguments("arguments must be a JSON object")
        errors = sorted(self._validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))
        if errors:
            parts = [
                f"{'.'.join(str(p) for p in error.absolute_path) or 'arguments'}: {error.message}"
                for error in errors[:5]
            ]
            raise InvalidArguments("arguments do not match the tool's schema: " + "; ".join(parts))
        return value

    async def execute(self, args: dict[str, Any]) -> JSONValue:
        return await self.server.call(self.remote_name, args)


async def start_mcp_servers(servers: dict[str, McpServerSettings]) -> list[McpServer]:
    """Connect to every configured server (at once), or close them all and raise the
    first ConfigError."""
    started = [McpServer(name, settings) for name, settings in servers.items()]
    results = await asyncio.gather(*(s.start() for s in started), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for server in started:
            await server.aclose()
        raise failed[0]
    return started
