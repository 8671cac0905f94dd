"""A small MCP server for the tests, on the `mcp` SDK's server API (MCPServer):

    python -m tests.mcp_servers.calc                  # stdio
    python -m tests.mcp_servers.calc --http           # streamable HTTP on 127.0.0.1, a free
                                                      # port, printed alone on the first line
    python -m tests.mcp_servers.calc --clash          # also a tool named "calculator"

Every process appends what happens to it, one JSON object per line, to the file named by
MCP_TEST_LOG: {"event": "started", "pid": ...}, {"event": "call", "tool": ..., ...},
{"event": "cancelled", ...}, {"event": "exit", ...}, so a test can see what the server
saw. With MCP_TEST_TOKEN set, HTTP requests without `X-Test-Token: <it>` get 401.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

_LOG = os.environ.get("MCP_TEST_LOG", "")


def note(event: str, **fields: Any) -> None:
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")


app = MCPServer("calc")


@app.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    note("call", tool="add", a=a, b=b)
    return a + b


@app.tool()
async def slow(seconds: float, tag: str = "") -> str:
    """Wait for `seconds`, then answer."""
    note("call", tool="slow", tag=tag)
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        note("cancelled", tool="slow", tag=tag)
        raise
    return f"slept {seconds:g} s"


@app.tool()
def fail(reason: str) -> str:
    """Always fails with `reason`."""
    note("call", tool="fail")
    raise ToolError(reason)


def _calculator(expression: str) -> str:
    """A tool whose name clashes with the built-in calculator."""
    return expression


Scope = MutableMapping[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def _require_token(inner: ASGI, token: str) -> ASGI:
    async def guarded(
        scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"x-test-token") != token.encode():
            note("refused", reason="no token")
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"no token"})
            return
        await inner(scope, receive, send)

    return guarded


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str]) -> None:
    if "--clash" in argv:
        app.add_tool(_calculator, name="calculator")
    note("started", http="--http" in argv)
    try:
        if "--http" in argv:
            import uvicorn

            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            print(sock.getsockname()[1], flush=True)
            asgi: Any = app.streamable_http_app()
            token = os.environ.get("MCP_TEST_TOKEN", "")
            if token:
                asgi = _require_token(asgi, token)
            # uvicorn shuts down on SIGTERM, then raises it again for the handler it found:
            # this one, so that the process ends by exiting (status 0), past `finally`.
            signal.signal(signal.SIGTERM, _exit_cleanly)
            uvicorn.Server(uvicorn.Config(asgi, log_level="warning")).run(sockets=[sock])
        else:
            app.run()
    finally:
        note("exit", at=time.time())


if __name__ == "__main__":
    main(sys.argv[1:])
