"""A real HTTP fake of an OpenAI-compatible chat-completions server (aiohttp.web).

It listens on a real TCP port, so clients exercise their whole HTTP stack (connection pool, keep-alive,
chunked SSE parsing, timeouts, cancellation). Tests script what it answers and inspect what it saw::

    async with FakeBackend() as fake:
        fake.script(JSONReply(completion(tool_calls=[call("calculator", {"expression": "2+3"})])))
        fake.script(SSEReply(text_chunks("The answer is 5.", usage=(12, 5))))
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
        ...
        assert fake.requests[0]["tools"]
        await fake.wait_disconnect(2.0)  # proves the client closed the upstream request

Replies are chosen per request in this order: the scripted queue (``script``), then ``handler`` (a callable
that gets the parsed request body), then ``default``. Payload bytes are serialised once per reply object
and cached, so a reply reused across requests costs no JSON encoding (the benchmark scenario relies on it).

It also runs as its own process for benchmarks::

    python -m tests.fakes.openai_backend --port 0 --scenario stage --chunk-delay 0.002 --chunks 20

which prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import json
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import TracebackType
from typing import Any, Final, Literal, NoReturn, Self, TypeAlias

from aiohttp import web

__all__ = [
    "FAKE_MODEL",
    "CloseReply",
    "ErrorReply",
    "FakeBackend",
    "HangReply",
    "JSONReply",
    "RawEvent",
    "RawReply",
    "Reply",
    "ReplyHandler",
    "SSEReply",
    "call",
    "completion",
    "main",
    "stage_handler",
    "text_chunks",
    "tool_call_chunks",
    "usage_dict",
]

FAKE_MODEL: Final = "fake-model"

JSONObject: TypeAlias = dict[str, Any]
Usage: TypeAlias = tuple[int, int]

_JSON_CT: Final = "application/json"
_SSE_HEADERS: Final[Mapping[str, str]] = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
}
_DONE_FRAME: Final = b"data: [DONE]\n\n"
_ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
_ERROR_CODES: Final[Mapping[int, str]] = {
    401: "invalid_api_key",
    404: "model_not_found",
    429: "rate_limit_exceeded",
}

_ids = itertools.count(1)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _merge_headers(base: Mapping[str, str], extra: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(base)
    if extra:
        # Case-insensitive override so that e.g. "content-type" replaces "Content-Type".
        lowered = {k.lower(): k for k in merged}
        for key, value in extra.items():
            existing = lowered.get(key.lower())
            if existing is not None:
                del merged[existing]
            merged[key] = value
    return merged


# --- Reply types ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class JSONReply:
    """A complete (non-streamed) response. ``bytes``/``str`` bodies are sent as-is (e.g. invalid JSON)."""

    body: JSONObject | list[Any] | str | bytes
    status: int = 200
    headers: Mapping[str, str] | None = None
    delay: float = 0.0  # seconds before the status line is sent

    @cached_property
    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return _dumps(self.body)

    @cached_property
    def response_headers(self) -> dict[str, str]:
        return _merge_headers({"Content-Type": _JSON_CT}, self.headers)


@dataclass(frozen=True, eq=False)
class RawEvent:
    """An SSE frame written verbatim: no ``data: `` prefix, no blank line added (comments, broken framing)."""

    data: bytes


SSEEvent: TypeAlias = JSONObject | str | bytes | RawEvent


@dataclass(frozen=True, eq=False)
class SSEReply:
    """A streamed (``text/event-stream``, chunked) response.

    Each event is sent as ``data: <json>\\n\\n`` (``str``/``bytes`` events go raw after ``data: ``;
    :class:`RawEvent` goes fully raw), then ``data: [DONE]\\n\\n`` when ``done``.

    * ``delay``: seconds between frames; ``first_byte_delay``: seconds before the status line.
    * ``stall_after=n``: send n events, then keep the response open forever (until the client goes away;
      that counts as a disconnect). ``stall_after=0`` sends only the headers.
    * ``cut_after=n``: send n events, then abort the TCP connection (no chunked terminator, no [DONE]).
      A server-side cut is *not* counted in ``FakeBackend.disconnects``.
    """

    events: Sequence[SSEEvent]
    done: bool = True
    delay: float = 0.0
    first_byte_delay: float = 0.0
    stall_after: int | None = None
    cut_after: int | None = None
    status: int = 200
    headers: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.stall_after is not None and self.cut_after is not None:
            raise ValueError("SSEReply: stall_after and cut_after are mutually exclusive")
        for name, value in (("stall_after", self.stall_after), ("cut_after", self.cut_after)):
            if value is not None and value < 0:
                raise ValueError(f"SSEReply: {name} must be >= 0")

    @cached_property
    def frames(self) -> tuple[bytes, ...]:
        """The event frames, without the ``[DONE]`` frame."""
        out: list[bytes] = []
        for event in self.events:
            if isinstance(event, RawEvent):
                out.append(event.data)
            elif isinstance(event, bytes):
                out.append(b"data: " + event + b"\n\n")
            elif isinstance(event, str):
                out.append(b"data: " + event.encode() + b"\n\n")
            else:
                out.append(b"data: " + _dumps(event) + b"\n\n")
        return tuple(out)

    @cached_property
    def all_frames(self) -> tuple[bytes, ...]:
        """What a complete (not stalled, not cut) response sends, ``[DONE]`` included when ``done``."""
        return (*self.frames, _DONE_FRAME) if self.done else self.frames

    @cached_property
    def body(self) -> bytes:
        return b"".join(self.all_frames)

    @cached_property
    def response_headers(self) -> dict[str, str]:
        return _merge_headers(_SSE_HEADERS, self.headers)


@dataclass(frozen=True, eq=False)
class ErrorReply:
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}``.

    ``type``/``code`` default from the status (429 -> rate_limit_error/rate_limit_exceeded, 401 ->
    invalid_api_key, 5xx -> server_error). Put e.g. ``{"Retry-After": "1"}`` in ``headers``.
    """

    status: int
    message: str = "fake error"
    headers: Mapping[str, str] | None = None
    type: str | None = None
    code: str | None = None
    delay: float = 0.0

    @cached_property
    def body(self) -> JSONObject:
        default_type = _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "api_error")
        return {
            "error": {
                "message": self.message,
                "type": self.type or default_type,
                "param": None,
                "code": self.code if self.code is not None else _ERROR_CODES.get(self.status),
            }
        }

    @cached_property
    def payload(self) -> bytes:
        return _dumps(self.body)

    @cached_property
    def response_headers(self) -> dict[str, str]:
        return _merge_headers({"Content-Type": _JSON_CT}, self.headers)


@dataclass(frozen=True, eq=False)
class HangReply:
    """Never answers; the handler sleeps until the client goes away (counted in ``disconnects``).

    With ``send_headers=True`` the status line and ``headers`` are sent first, then nothing (a response
    whose body never arrives).
    """

    send_headers: bool = False
    status: int = 200
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, eq=False)
class CloseReply:
    """Closes the connection without sending any response (``abort=True``: abort instead of a clean FIN)."""

    abort: bool = False


@dataclass(frozen=True, eq=False)
class RawReply:
    """Arbitrary body bytes (non-UTF-8, huge, truncated JSON...) with the given status and content type."""

    data: bytes
    status: int = 200
    content_type: str = _JSON_CT
    headers: Mapping[str, str] | None = None

    @cached_property
    def response_headers(self) -> dict[str, str]:
        return _merge_headers({"Content-Type": self.content_type}, self.headers)


Reply: TypeAlias = JSONReply | SSEReply | ErrorReply | HangReply | CloseReply | RawReply
ReplyHandler: TypeAlias = Callable[[JSONObject], "Reply | Awaitable[Reply]"]


def _prime(reply: Reply) -> Reply:
    """Serialise a reply's payload now rather than on its first request."""
    if isinstance(reply, JSONReply | ErrorReply):
        _ = reply.payload, reply.response_headers
    elif isinstance(reply, SSEReply):
        _ = reply.body, reply.response_headers
    elif isinstance(reply, RawReply):
        _ = reply.response_headers
    return reply


# --- Payload builders (shapes as OpenAI sends them; vLLM / llama.cpp are compatible supersets or subsets) ---


def usage_dict(prompt_tokens: int, completion_tokens: int) -> JSONObject:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _completion_id() -> str:
    return f"chatcmpl-fake{next(_ids)}"


def call(name: str, arguments: JSONObject | str, id: str | None = None) -> JSONObject:
    """A ``tool_calls`` entry of a non-streamed message. A dict ``arguments`` is JSON-encoded."""
    return {
        "id": id if id is not None else f"call_{next(_ids)}",
        "type": "function",
        "function": {
            "name": name,
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
        },
    }


def completion(
    content: str | None = None,
    tool_calls: Sequence[JSONObject] | None = None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    model: str = FAKE_MODEL,
    *,
    id: str | None = None,
) -> JSONObject:
    """A ``chat.completion`` object with one choice.

    ``finish_reason`` defaults to ``"tool_calls"`` when ``tool_calls`` is non-empty, else ``"stop"``.
    ``usage=None`` leaves the ``usage`` key out.
    """
    message: JSONObject = {"role": "assistant", "content": content, "refusal": None, "annotations": []}
    if tool_calls:
        message["tool_calls"] = list(tool_calls)
    if finish_reason is None:
        finish_reason = "tool_calls" if tool_calls else "stop"
    body: JSONObject = {
        "id": id if id is not None else _completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "service_tier": "default",
        "system_fingerprint": None,
    }
    if usage is not None:
        body["usage"] = usage_dict(*usage)
    return body


class _ChunkFactory:
    def __init__(self, model: str, id: str | None, with_usage: bool) -> None:
        self.id = id if id is not None else _completion_id()
        self.created = int(time.time())
        self.model = model
        self.with_usage = with_usage

    def _base(self) -> JSONObject:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": None,
        }

    def chunk(self, delta: JSONObject, finish_reason: str | None = None) -> JSONObject:
        out = self._base()
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        if self.with_usage:  # OpenAI sends "usage": null on every chunk when include_usage is on
            out["usage"] = None
        return out

    def usage_chunk(self, usage: Usage) -> JSONObject:
        out = self._base()
        out["choices"] = []
        out["usage"] = usage_dict(*usage)
        return out


def _split_even(text: str, pieces: int) -> list[str]:
    if not text:
        return []
    n = max(1, min(pieces, len(text)))
    bounds = [round(i * len(text) / n) for i in range(n + 1)]
    return [text[bounds[i] : bounds[i + 1]] for i in range(n)]


def _split_words(text: str) -> list[str]:
    parts = re.findall(r"\s*\S+", text)
    rest = text[sum(map(len, parts)) :]
    if rest:  # trailing whitespace (or an all-whitespace text)
        if parts:
            parts[-1] += rest
        else:
            parts.append(rest)
    return parts


def text_chunks(
    text: str,
    pieces: int | None = None,
    finish_reason: str = "stop",
    usage: Usage | None = None,
    model: str = FAKE_MODEL,
    *,
    id: str | None = None,
) -> list[JSONObject]:
    """Streamed ``chat.completion.chunk`` objects for a text answer.

    A first chunk with ``delta={"role": "assistant", "content": ""}``, the content split by words
    (``pieces=None``, each word keeps its leading whitespace) or into ``pieces`` near-equal parts, a chunk
    with ``delta={}`` and ``finish_reason``, and with ``usage`` a last usage-only chunk (``"choices": []``)
    like OpenAI's ``stream_options.include_usage``.
    """
    f = _ChunkFactory(model, id, usage is not None)
    out = [f.chunk({"role": "assistant", "content": "", "refusal": None})]
    parts = _split_words(text) if pieces is None else _split_even(text, pieces)
    out.extend(f.chunk({"content": part}) for part in parts)
    out.append(f.chunk({}, finish_reason))
    if usage is not None:
        out.append(f.usage_chunk(usage))
    return out


def tool_call_chunks(
    calls: Sequence[tuple[str, str | JSONObject]],
    split: int = 3,
    repeat_id_and_name: bool = False,
    finish_reason: str = "tool_calls",
    usage: Usage | None = None,
    model: str = FAKE_MODEL,
    *,
    id: str | None = None,
    ids: Sequence[str] | None = None,
) -> list[JSONObject]:
    """Streamed tool-call deltas for ``calls`` = ``[(name, arguments_json), ...]``.

    Call ``i`` has ``index=i``. Its first delta carries ``id``, ``type``, ``function.name`` and
    ``function.arguments=""`` (the very first one also ``role: assistant``, ``content: null``); then the
    arguments string follows in ``split`` fragments with only ``index`` and ``function.arguments`` -- unless
    ``repeat_id_and_name``, where every delta repeats ``id``, ``type`` and ``function.name`` (llama.cpp
    server style). Then a ``finish_reason`` chunk and, with ``usage``, a usage-only chunk. ``ids`` fixes the
    call ids (default ``call_<n>``).
    """
    if ids is not None and len(ids) != len(calls):
        raise ValueError("tool_call_chunks: ids must have one entry per call")
    f = _ChunkFactory(model, id, usage is not None)
    out: list[JSONObject] = []
    if not calls:
        out.append(f.chunk({"role": "assistant", "content": None, "refusal": None}))
    for index, (name, arguments) in enumerate(calls):
        args = arguments if isinstance(arguments, str) else json.dumps(arguments)
        call_id = ids[index] if ids is not None else f"call_{next(_ids)}"
        head = {
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        if index == 0:
            out.append(f.chunk({"role": "assistant", "content": None, "tool_calls": [head], "refusal": None}))
        else:
            out.append(f.chunk({"tool_calls": [head]}))
        for fragment in _split_even(args, split):
            delta: JSONObject
            if repeat_id_and_name:
                delta = {
                    "index": index,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": fragment},
                }
            else:
                delta = {"index": index, "function": {"arguments": fragment}}
            out.append(f.chunk({"tool_calls": [delta]}))
    out.append(f.chunk({}, finish_reason))
    if usage is not None:
        out.append(f.usage_chunk(usage))
    return out


# --- The server -----------------------------------------------------------------------------------


class _TrackingServer(web.Server):
    """aiohttp's low-level server with hooks on TCP connection made / lost (each called once per socket)."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        owner: FakeBackend,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._owner = owner

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._owner._connection_made()

    def connection_lost(self, handler: web.RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._owner._connection_lost()


class _Exchange:
    __slots__ = ("frames", "request", "response")

    def __init__(self, request: web.BaseRequest, frames: list[int] | None = None) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        #: Where SSE frames written one by one are counted (FakeBackend.frames_sent).
        self.frames = frames


async def _flush(transport: asyncio.BaseTransport, limit: float = 1.0) -> None:
    """Wait (bounded) until the kernel took everything written so far, so an abort loses nothing."""
    if not isinstance(transport, asyncio.WriteTransport):
        return
    for _ in range(int(limit / 0.001)):
        if not transport.get_write_buffer_size() or transport.is_closing():
            return
        await asyncio.sleep(0.001)


class FakeBackend:
    """An OpenAI-compatible HTTP server on a real TCP port. See the module docstring.

    * ``requests`` / ``headers``: parsed JSON body and headers (keys lower-cased) of each chat request
      (not recorded with ``record=False``; ``request_count`` counts regardless).
    * ``disconnects``: responses whose client went away before the response completed.
    * ``open_connections``: currently open TCP connections; ``total_connections``: accepted so far.
    * ``active_responses``: chat handlers currently running.
    * ``errors``: exceptions raised by ``handler`` (answered with a 500 ErrorReply).
    """

    def __init__(
        self,
        *,
        default: Reply | None = None,
        handler: ReplyHandler | None = None,
        record: bool = True,
        model: str = FAKE_MODEL,
    ) -> None:
        self.default: Reply = default if default is not None else JSONReply(completion("ok", usage=(1, 1)))
        self.handler: ReplyHandler | None = handler
        self.record = record
        self.model = model
        self.requests: list[JSONObject] = []
        self.headers: list[dict[str, str]] = []
        self.errors: list[BaseException] = []
        self._queue: deque[Reply] = deque()
        self._request_count = 0
        self._disconnects = 0
        self._frames_sent = [0]
        self._disconnects_awaited = 0
        self._open_connections = 0
        self._total_connections = 0
        self._active_responses = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed: asyncio.Event | None = None
        self._waiters = 0
        self._stopping = False
        self._runner: web.ServerRunner | None = None
        self._host = "127.0.0.1"
        self._port: int | None = None
        self._models_payload = _dumps(
            {
                "object": "list",
                "data": [{"id": model, "object": "model", "created": 0, "owned_by": "fake"}],
            }
        )

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Self:
        if self._runner is not None:
            raise RuntimeError("FakeBackend already started")
        self._stopping = False
        self._changed = asyncio.Event()
        server = _TrackingServer(
            self._handle,
            owner=self,
            handler_cancellation=True,  # a client disconnect cancels the handler (HangReply, stalls)
            access_log=None,
        )
        runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, backlog=1024)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = host
        self._port = int(runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        runner = self._runner
        if runner is None:
            return
        self._stopping = True  # cancellations from here on are ours, not client disconnects
        for task in list(self._tasks):
            task.cancel()
        await runner.cleanup()
        self._runner = None
        with contextlib.suppress(TimeoutError):
            await self._wait_until(lambda: self._open_connections == 0, 1.0, "connections to close")

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeBackend not started")
        return self._port

    @property
    def base_url(self) -> str:
        """E.g. ``http://127.0.0.1:PORT/v1`` (what ``openai.AsyncOpenAI(base_url=...)`` wants)."""
        return f"http://{self._host}:{self.port}/v1"

    # -- scripting -----------------------------------------------------------------------------------

    def script(self, *replies: Reply | JSONObject) -> None:
        """Queue replies, consumed one per chat request in order; a dict is short for ``JSONReply(dict)``."""
        for reply in replies:
            self._queue.append(JSONReply(reply) if isinstance(reply, dict) else reply)

    @property
    def pending(self) -> int:
        """Scripted replies not consumed yet."""
        return len(self._queue)

    def clear(self) -> None:
        """Forget scripted replies, recorded requests/headers/errors and the disconnect count."""
        self._queue.clear()
        self.requests.clear()
        self.headers.clear()
        self.errors.clear()
        self._request_count = 0
        self._disconnects = 0
        self._disconnects_awaited = 0

    # -- observation ---------------------------------------------------------------------------------

    @property
    def request_count(self) -> int:
        return self._request_count

    @property
    def disconnects(self) -> int:
        return self._disconnects

    @property
    def frames_sent(self) -> int:
        """SSE frames written so far by replies with a ``delay`` (written one by one); a
        write waits while the client does not read, so this stops growing then."""
        return self._frames_sent[0]

    @property
    def open_connections(self) -> int:
        return self._open_connections

    @property
    def total_connections(self) -> int:
        return self._total_connections

    @property
    def active_responses(self) -> int:
        return self._active_responses

    async def wait_disconnect(self, timeout: float = 5.0, *, count: int | None = None) -> int:
        """Wait for the next disconnect not yet waited for (or until ``disconnects >= count``).

        Each call without ``count`` consumes one disconnect, so a disconnect that happened before the call
        is not missed. Returns ``disconnects``; raises ``TimeoutError``.
        """
        target = count if count is not None else self._disconnects_awaited + 1
        await self._wait_until(lambda: self._disconnects >= target, timeout, f"disconnects >= {target}")
        self._disconnects_awaited = max(self._disconnects_awaited, target)
        return self._disconnects

    async def wait_connections(self, count: int = 0, timeout: float = 5.0) -> None:
        """Wait until exactly ``count`` TCP connections are open."""
        await self._wait_until(
            lambda: self._open_connections == count, timeout, f"open_connections == {count}"
        )

    async def wait_requests(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least ``count`` chat requests have arrived (``request_count``)."""
        await self._wait_until(lambda: self._request_count >= count, timeout, f"request_count >= {count}")

    async def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until no chat handler is running."""
        await self._wait_until(lambda: self._active_responses == 0, timeout, "active_responses == 0")

    def _state(self) -> str:
        return (
            f"requests={self._request_count} disconnects={self._disconnects} "
            f"open_connections={self._open_connections} active_responses={self._active_responses}"
        )

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        if predicate():
            return
        self._waiters += 1
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    if self._changed is None:
                        self._changed = asyncio.Event()
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"FakeBackend: no {what} within {timeout}s ({self._state()})") from None
        finally:
            self._waiters -= 1

    def _notify(self) -> None:
        if self._waiters and self._changed is not None:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    def _connection_made(self) -> None:
        self._open_connections += 1
        self._total_connections += 1
        self._notify()

    def _connection_lost(self) -> None:
        self._open_connections -= 1
        self._notify()

    def _count_disconnect(self) -> None:
        if not self._stopping:
            self._disconnects += 1
            self._notify()

    # -- HTTP handling -------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path.rstrip("/")
        if path in ("/v1/chat/completions", "/chat/completions"):
            if request.method != "POST":
                return await _send_bytes(_Exchange(request), ErrorReply(405, "Method not allowed"))
            return await self._chat(request)
        if path in ("/v1/models", "/models") and request.method == "GET":
            return web.Response(body=self._models_payload, headers={"Content-Type": _JSON_CT})
        return await _send_bytes(_Exchange(request), ErrorReply(404, f"No route for {request.method} {path}"))

    async def _chat(self, request: web.BaseRequest) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._active_responses += 1
        exchange = _Exchange(request, self._frames_sent)
        try:
            try:
                body = json.loads(await request.read())
            except ValueError as exc:
                return await _send_bytes(exchange, ErrorReply(400, f"Invalid JSON body: {exc}"))
            if not isinstance(body, dict):
                return await _send_bytes(exchange, ErrorReply(400, "The request body must be a JSON object"))
            self._request_count += 1
            if self.record:
                self.requests.append(body)
                self.headers.append({k.lower(): v for k, v in request.headers.items()})
            self._notify()
            try:
                reply = self._next_reply(body)
                if inspect.isawaitable(reply):
                    reply = await reply
            except Exception as exc:
                self.errors.append(exc)
                reply = ErrorReply(500, f"FakeBackend handler failed: {exc!r}")
            return await _send(exchange, reply)
        except asyncio.CancelledError:
            self._count_disconnect()
            raise
        except ConnectionResetError:
            # A write hit a closed transport. Hand aiohttp the response so it ends quietly.
            self._count_disconnect()
            return exchange.response if exchange.response is not None else web.Response(status=499)
        finally:
            self._active_responses -= 1
            if task is not None:
                self._tasks.discard(task)
            self._notify()

    def _next_reply(self, body: JSONObject) -> Reply | Awaitable[Reply]:
        if self._queue:
            return self._queue.popleft()
        if self.handler is not None:
            return self.handler(body)
        return self.default


async def _forever() -> NoReturn:
    """Sleep until cancelled (the client went away, or the server stops)."""
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")


async def _send(exchange: _Exchange, reply: Reply) -> web.StreamResponse:
    if isinstance(reply, SSEReply):
        return await _send_sse(exchange, reply)
    if isinstance(reply, JSONReply | ErrorReply | RawReply):
        return await _send_bytes(exchange, reply)
    if isinstance(reply, HangReply):
        if reply.send_headers:
            resp = web.StreamResponse(status=reply.status, headers=reply.headers)
            exchange.response = resp
            await resp.prepare(exchange.request)
        await _forever()
    if isinstance(reply, CloseReply):
        transport = exchange.request.transport
        if transport is not None:
            transport.abort() if reply.abort else transport.close()
        # aiohttp's attempt to send this fails on the closed transport and is dropped silently.
        return web.Response(status=499)
    raise TypeError(f"FakeBackend: not a reply: {reply!r}")


async def _send_bytes(exchange: _Exchange, reply: JSONReply | ErrorReply | RawReply) -> web.StreamResponse:
    if not isinstance(reply, RawReply) and reply.delay > 0:
        await asyncio.sleep(reply.delay)
    payload = reply.data if isinstance(reply, RawReply) else reply.payload
    resp = web.Response(body=payload, status=reply.status, headers=reply.response_headers)
    exchange.response = resp
    # Send it here (not after the handler returns) so a client that went away is seen and counted.
    await resp.prepare(exchange.request)
    await resp.write_eof()
    return resp


async def _send_sse(exchange: _Exchange, reply: SSEReply) -> web.StreamResponse:
    if reply.first_byte_delay > 0:
        await asyncio.sleep(reply.first_byte_delay)
    resp = web.StreamResponse(status=reply.status, headers=reply.response_headers)
    exchange.response = resp
    resp.enable_chunked_encoding()
    await resp.prepare(exchange.request)

    limit = reply.stall_after if reply.stall_after is not None else reply.cut_after
    frames = reply.all_frames if limit is None else reply.frames[:limit]
    if reply.delay > 0:
        for i, frame in enumerate(frames):
            if i:
                await asyncio.sleep(reply.delay)
            await resp.write(frame)  # waits while the client does not read (TCP backpressure)
            if exchange.frames is not None:
                exchange.frames[0] += 1
    elif limit is None:
        await resp.write(reply.body)
    elif frames:
        await resp.write(b"".join(frames))

    if reply.stall_after is not None:
        await _forever()
    if reply.cut_after is not None:
        transport = exchange.request.transport
        if transport is not None:
            await _flush(transport)
            transport.abort()  # no chunked terminator: the client sees an incomplete body
        return resp
    await resp.write_eof()
    return resp


# --- Benchmark scenario and CLI -------------------------------------------------------------------

STAGE_TOOL_NAME: Final = "calculator"
STAGE_TOOL_ARGUMENTS: Final[JSONObject] = {"expression": "2+3"}
_STAGE_WORDS: Final = (
    "The",
    "calculator",
    "says",
    "2+3",
    "is",
    "5",
    ",",
    "so",
    "the",
    "answer",
    "is",
    "5",
    ".",
)


def stage_text(chunks: int) -> str:
    """The synthesis answer of the ``stage`` scenario: ``chunks`` words (one streamed chunk each)."""
    return " ".join(itertools.islice(itertools.cycle(_STAGE_WORDS), max(1, chunks)))


def stage_handler(
    *, chunks: int = 20, chunk_delay: float = 0.0, usage: Literal["always", "requested"] = "always"
) -> ReplyHandler:
    """The ``stage`` scenario as a :class:`FakeBackend` handler, all payload bytes precomputed.

    A request with ``tools`` (unless its last message is a ``tool`` result or ``tool_choice`` is
    ``"none"``) gets one ``calculator`` call with ``{"expression": "2+3"}``; any other request (the
    synthesis) gets a text of ``chunks`` words. ``"stream": true`` gets SSE (``chunk_delay`` seconds between
    frames), else JSON. Usage is always included; with ``usage="requested"`` streams carry the usage chunk
    only when ``stream_options.include_usage`` is set (as OpenAI does).
    """
    call_id = "call_stage_calculator"
    args = json.dumps(STAGE_TOOL_ARGUMENTS)
    text = stage_text(chunks)
    tool_usage, text_usage = (60, 12), (90, max(1, chunks))

    def sse(events: list[JSONObject]) -> Reply:
        return _prime(SSEReply(events, delay=chunk_delay))

    tool_json = _prime(
        JSONReply(completion(tool_calls=[call(STAGE_TOOL_NAME, args, id=call_id)], usage=tool_usage))
    )
    tool_sse = sse(tool_call_chunks([(STAGE_TOOL_NAME, args)], ids=[call_id], usage=tool_usage))
    tool_sse_bare = sse(tool_call_chunks([(STAGE_TOOL_NAME, args)], ids=[call_id]))
    text_json = _prime(JSONReply(completion(text, usage=text_usage)))
    text_sse = sse(text_chunks(text, usage=text_usage))
    text_sse_bare = sse(text_chunks(text))

    def handle(request: JSONObject) -> Reply:
        messages = request.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else None
        last_role = last.get("role") if isinstance(last, dict) else None
        wants_tool = (
            bool(request.get("tools")) and last_role != "tool" and request.get("tool_choice") != "none"
        )
        if not request.get("stream"):
            return tool_json if wants_tool else text_json
        options = request.get("stream_options")
        with_usage = usage == "always" or (isinstance(options, dict) and bool(options.get("include_usage")))
        if wants_tool:
            return tool_sse if with_usage else tool_sse_bare
        return text_sse if with_usage else text_sse_bare

    return handle


async def _serve(args: argparse.Namespace) -> None:
    handler = (
        stage_handler(chunks=args.chunks, chunk_delay=args.chunk_delay, usage=args.usage)
        if args.scenario == "stage"
        else None
    )
    fake = FakeBackend(handler=handler, record=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with fake:
        print(f"READY {fake.port}", flush=True)
        await stop.wait()
    print(
        f"fake backend stopped: requests={fake.request_count} connections={fake.total_connections} "
        f"disconnects={fake.disconnects}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.openai_backend",
        description="Fake OpenAI-compatible chat-completions server (prints 'READY <port>' when listening).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (see the READY line)")
    parser.add_argument("--scenario", choices=["stage", "ok"], default="stage")
    parser.add_argument("--chunks", type=int, default=20, help="text chunks of a streamed synthesis answer")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between SSE frames")
    parser.add_argument("--usage", choices=["always", "requested"], default="always")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
