"""The live service the Go, TypeScript and Java clients' tests run against.

    python -m tests.interop.serve -- <command ...>
    python -m tests.interop.serve            # no command: print the environment, serve until Ctrl-C

Starts a fake OpenAI backend (real HTTP, aiohttp) and three real toolchain servers wired to
it, then runs the command with these environment variables and exits with its status:

    TOOLCHAIN_ADDR             plaintext, no auth
    TOOLCHAIN_AUTH_ADDR        plaintext, bearer auth: TOOLCHAIN_TOKEN is the accepted token
    TOOLCHAIN_TLS_ADDR         mutual TLS (server certificate for localhost and 127.0.0.1):
                               TOOLCHAIN_TLS_CA, TOOLCHAIN_TLS_CLIENT_CERT, TOOLCHAIN_TLS_CLIENT_KEY
    TOOLCHAIN_FAKE_URL         the fake backend's control endpoint:
                               GET /interop/closed?tag=T&timeout=S -> {"closed": true|false}

The fake answers by markers in the user prompt (clients/*/ tests rely on exactly these):

    [calc] or none   tool phase: calculator({"expression": "6*7"}), call id "call_calc";
                     synthesis: "The answer is 42." in chunks; usage on both
    [text]           no tool call: "Hello from the fake model."
    [hang tag=T]     one text chunk ("thinking"), then nothing until the server closes the
                     request; /interop/closed?tag=T reports when it did
    [unavailable]    HTTP 503 with Retry-After: 3
    [ratelimited]    HTTP 429 with Retry-After: 2
    [rounds3]        one calculator call per tool round, as many rounds as it is asked:
                     "1+1" (id call_r1), then "2*3" (call_r2), then "6*7" (call_r3);
                     asked again with tools offered after three results, or without
                     tools (synthesis): "After three rounds: 42."

After the command, the harness checks that every server is idle (no stage left running) and
fails otherwise, so a client that leaks calls is caught too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from toolchain_service.config import AuthSettings, BackendSettings, Settings, TLSSettings, ToolSettings
from toolchain_service.transport.server import RunningServer, start_server

from tests.fakes.openai_backend import FAKE_MODEL, call, completion, text_chunks, tool_call_chunks
from tests.fakes.pki import make_pki

TOKEN = "interop-token-3b7e"
CALC_ARGS = '{"expression": "6*7"}'
ANSWER = "The answer is 42."
TEXT = "Hello from the fake model."
ROUND_CALLS = ('{"expression": "1+1"}', '{"expression": "2*3"}', '{"expression": "6*7"}')
ROUNDS_ANSWER = "After three rounds: 42."
_HANG = re.compile(r"\[hang tag=([^\]\s]+)\]")
_SSE = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


class InteropBackend:
    """An OpenAI chat-completions fake that answers by the markers of the user prompt."""

    def __init__(self) -> None:
        self.closed: dict[str, asyncio.Event] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/interop/closed", self._closed)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _event(self, tag: str) -> asyncio.Event:
        return self.closed.setdefault(tag, asyncio.Event())

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": FAKE_MODEL, "object": "model"}]})

    async def _closed(self, request: web.Request) -> web.Response:
        tag = request.query.get("tag", "")
        timeout = float(request.query.get("timeout", "10"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event(tag).wait(), timeout)
        return web.json_response({"closed": self._event(tag).is_set()})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        messages = body.get("messages") or []
        prompt = next((m.get("content") or "" for m in messages if m.get("role") == "user"), "")
        synthesis = any(m.get("role") == "tool" for m in messages) or not body.get("tools")
        stream = bool(body.get("stream"))
        if "[unavailable]" in prompt:
            return _error(503, "the fake is unavailable", "3")
        if "[ratelimited]" in prompt:
            return _error(429, "the fake is rate limited", "2")
        hang = _HANG.search(prompt)
        if hang:
            return await self._hang(request, hang.group(1), stream)
        if "[rounds3]" in prompt:
            return await self._rounds(request, messages, not body.get("tools"), stream)
        if "[text]" in prompt or synthesis:
            text, usage = (TEXT, (20, 6)) if "[text]" in prompt else (ANSWER, (40, 5))
            if not stream:
                return web.json_response(completion(text, usage=usage))
            return await _sse(request, text_chunks(text, pieces=4, usage=usage))
        if not stream:
            return web.json_response(
                completion(tool_calls=[call("calculator", CALC_ARGS, id="call_calc")], usage=(30, 8))
            )
        return await _sse(
            request, tool_call_chunks([("calculator", CALC_ARGS)], ids=["call_calc"], usage=(30, 8))
        )

    async def _rounds(
        self, request: web.Request, messages: list[dict[str, Any]], synthesis: bool, stream: bool
    ) -> web.StreamResponse:
        done = sum(1 for m in messages if m.get("role") == "tool")
        if synthesis or done >= len(ROUND_CALLS):
            if not stream:
                return web.json_response(completion(ROUNDS_ANSWER, usage=(90, 7)))
            return await _sse(request, text_chunks(ROUNDS_ANSWER, pieces=3, usage=(90, 7)))
        args, call_id = ROUND_CALLS[done], f"call_r{done + 1}"
        if not stream:
            return web.json_response(
                completion(tool_calls=[call("calculator", args, id=call_id)], usage=(50, 9))
            )
        return await _sse(request, tool_call_chunks([("calculator", args)], ids=[call_id], usage=(50, 9)))

    async def _hang(self, request: web.Request, tag: str, stream: bool) -> web.StreamResponse:
        closed = self._event(tag)
        closed.clear()
        response = web.StreamResponse(headers=_SSE if stream else {"Content-Type": "application/json"})
        try:
            await response.prepare(request)
            if stream:
                _role, first, *_ = text_chunks("thinking", pieces=1)  # the first chunk carries the role only
                first["choices"][0]["finish_reason"] = None
                await response.write(b"data: " + json.dumps(first).encode() + b"\n\n")
            await asyncio.Event().wait()  # until the server closes the request
        finally:
            closed.set()
        return response


def _error(status: int, message: str, retry_after: str) -> web.Response:
    body = {"error": {"message": message, "type": "server_error", "code": None}}
    return web.json_response(body, status=status, headers={"Retry-After": retry_after})


async def _sse(request: web.Request, events: list[dict[str, Any]]) -> web.StreamResponse:
    response = web.StreamResponse(headers=_SSE)
    await response.prepare(request)
    for event in events:
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _settings(backend: InteropBackend, **overrides: Any) -> Settings:
    return Settings(
        address="127.0.0.1:0",
        default_backend="fake",
        backends={
            # one chunk per backend delta, so that every client shows it assembles many
            "fake": BackendSettings(
                base_url=f"{backend.url}/v1",
                default_model=FAKE_MODEL,
                max_retries=0,
                read_timeout=60.0,
                merge_deltas=False,
            )
        },
        tools=ToolSettings(weather_url=f"{backend.url}/weather-unused"),
        shutdown_grace=1.0,
        **overrides,
    )


@contextlib.asynccontextmanager
async def running() -> AsyncIterator[tuple[dict[str, str], list[RunningServer]]]:
    """The fake backend and the three servers; yields the environment for the clients."""
    backend = InteropBackend()
    await backend.start()
    servers: list[RunningServer] = []
    with tempfile.TemporaryDirectory(prefix="toolchain-interop-") as tmp:
        pki = make_pki(Path(tmp))
        tokens = Path(tmp) / "tokens"
        tokens.write_text(f"{TOKEN}\n")
        try:
            plain = await start_server(_settings(backend))
            servers.append(plain)
            authed = await start_server(_settings(backend, auth=AuthSettings(bearer_file=str(tokens))))
            servers.append(authed)
            tls = TLSSettings(
                cert_file=str(pki.server.cert_file),
                key_file=str(pki.server.key_file),
                client_ca_file=str(pki.ca_file),
            )
            mutual = await start_server(_settings(backend, tls=tls))
            servers.append(mutual)
            yield (
                {
                    "TOOLCHAIN_ADDR": plain.address,
                    "TOOLCHAIN_AUTH_ADDR": authed.address,
                    "TOOLCHAIN_TOKEN": TOKEN,
                    "TOOLCHAIN_TLS_ADDR": mutual.address,
                    "TOOLCHAIN_TLS_CA": str(pki.ca_file),
                    "TOOLCHAIN_TLS_CLIENT_CERT": str(pki.client.cert_file),
                    "TOOLCHAIN_TLS_CLIENT_KEY": str(pki.client.key_file),
                    "TOOLCHAIN_FAKE_URL": backend.url,
                },
                servers,
            )
        finally:
            for server in servers:
                await server.stop(0)
            await backend.stop()


async def _busy(servers: list[RunningServer], timeout: float = 10.0) -> int:
    """How many servers still run a stage `timeout` seconds after the command ended."""
    idle = await asyncio.gather(*(s.stages.wait_idle(timeout) for s in servers))
    return idle.count(False)


async def _main(command: list[str]) -> int:
    async with running() as (env, servers):
        if not command:
            print("\n".join(f"export {k}={v}" for k, v in env.items()), flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            return 0
        process = await asyncio.create_subprocess_exec(*command, env={**os.environ, **env})
        code = await process.wait()
        busy = await _busy(servers)
        if busy:
            print(f"interop: {busy} server(s) still run a stage after the command ended", file=sys.stderr)
            return code or 1
        return code


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    opts = parser.parse_args()
    command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    return asyncio.run(_main(command))


if __name__ == "__main__":
    sys.exit(main())
