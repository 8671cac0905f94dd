"""A minimal, fast fake OpenAI chat-completions server for the benchmark (its own process).

    python -m bench.backend --port 0 --chunks 20 --chunk-delay 0.002   # prints "READY <port>"

Raw asyncio HTTP/1.1 with keep-alive on uvloop: every response is precomputed bytes, and a
request is routed by a dict lookup on its raw body (the JSON is parsed only the first time a
body is seen), so the backend's CPU per request stays small and nearly constant; the same
backend serves the service rows and the floor rows, so its cost is the same on both sides.

The answers are the ``stage`` scenario of ``tests.fakes.openai_backend`` (``bench.scenario``):
a request with ``tools`` whose last message is not a tool result gets one ``calculator``
call, any other request the synthesis text; ``"stream": true`` gets SSE (one HTTP chunk per
event, ``--chunk-delay`` seconds between events, the first event at once), else JSON.

``GET /bench/stats`` returns the request count per (answer kind, canonical body digest):
the benchmark uses it to prove that the floor sends the very request bodies the service
sends. ``GET /bench/bodies`` returns one canonical body per digest.

Two more scenarios (``--scenario``; the default ``stage`` is the above) change only the
streamed synthesis answer, for ``bench.realrate``; the tool phase stays the same call:

* ``stamped``: ``--tokens`` tokens at ``--rate`` tokens/s (the first at once, then on a
  fixed schedule), each token's text being ``" <time.monotonic_ns() at its send>"``, so a
  client on the same machine can tell how long each token took to reach it; and the
  streamed tool call's id is ``call_<time.monotonic_ns() at the request's arrival>``, so
  it can tell how long its call took to reach the backend;
* ``bulk``: a ``--bulk-bytes`` answer in ``--bulk-piece``-character pieces (``bulk_text``),
  written as fast as the connection takes it: no more is written while the transport's
  buffer is over its high-water mark (asyncio's ``pause_writing``), so what the backend
  has sent is what the service (or the kernel's socket buffers) took.

``GET /bench/streams`` returns, per such streamed answer, the bytes handed to the kernel
so far (written minus what the transport still buffers), its total, whether it is
complete, and (``stamped``) how late the backend sent its tokens against their schedule.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, cast

from bench import common, scenario

_SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
_MAX_CACHED_BODIES: Final = 256
_MAX_HEAD: Final = 64 << 10
_MAX_STREAMS_KEPT: Final = 100_000


#: The call id in the answers' JSON; the stamped scenario writes its arrival stamp there.
_CALL_ID_BYTES: Final = b'"%s"' % scenario.CALL_ID.encode()
assert len(b'"call_%016d"' % 0) == len(_CALL_ID_BYTES)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _http(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class Replies:
    """The four precomputed answers of the stage scenario."""

    def __init__(self, chunks: int) -> None:
        created = int(time.time())
        usage_tool = {"prompt_tokens": 60, "completion_tokens": 12, "total_tokens": 72}
        usage_text = {"prompt_tokens": 90, "completion_tokens": chunks, "total_tokens": 90 + chunks}

        def base(kind: str, suffix: str) -> dict[str, Any]:
            return {
                "id": f"chatcmpl-bench-{suffix}",
                "object": kind,
                "created": created,
                "model": scenario.MODEL,
                "service_tier": "default",
                "system_fingerprint": None,
            }

        def chunk(suffix: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            out = base("chat.completion.chunk", suffix)
            out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            out["usage"] = None
            return out

        def usage_chunk(suffix: str, usage: dict[str, int]) -> dict[str, Any]:
            out = base("chat.completion.chunk", suffix)
            out["choices"] = []
            out["usage"] = usage
            return out

        def completion(suffix: str, message: dict[str, Any], finish: str, usage: dict[str, int]) -> bytes:
            body = base("chat.completion", suffix)
            body["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}]
            body["usage"] = usage
            return _http("200 OK", _dumps(body))

        call = {
            "id": scenario.CALL_ID,
            "type": "function",
            "function": {"name": scenario.TOOL_NAME, "arguments": scenario.TOOL_ARGUMENTS},
        }
        self.tool_json = completion(
            "tool",
            {"role": "assistant", "content": None, "refusal": None, "annotations": [], "tool_calls": [call]},
            "tool_calls",
            usage_tool,
        )
        text = scenario.answer_text(chunks)
        self.text_json = completion(
            "text",
            {"role": "assistant", "content": text, "refusal": None, "annotations": []},
            "stop",
            usage_text,
        )
        head = {
            "index": 0,
            "id": scenario.CALL_ID,
            "type": "function",
            "function": {"name": scenario.TOOL_NAME, "arguments": ""},
        }
        tool_events = [
            chunk("tools", {"role": "assistant", "content": None, "tool_calls": [head], "refusal": None}),
            *(
                chunk("tools", {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]})
                for fragment in scenario.argument_fragments()
            ),
            chunk("tools", {}, "tool_calls"),
            usage_chunk("tools", usage_tool),
        ]
        text_events = [
            chunk("text", {"role": "assistant", "content": "", "refusal": None}),
            *(chunk("text", {"content": word}) for word in scenario.answer_words(chunks)),
            chunk("text", {}, "stop"),
            usage_chunk("text", usage_text),
        ]
        self.tool_sse = self._sse(tool_events)
        self.text_sse = self._sse(text_events)

    @staticmethod
    def _sse(events: Sequence[dict[str, Any]]) -> tuple[bytes, ...]:
        """The response as writes: the head with the first event, one write per further
        event, the terminating zero-length chunk with the last ([DONE])."""
        frames = [b"data: " + _dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
        chunked = [b"%x\r\n%s\r\n" % (len(f), f) for f in frames]
        chunked[0] = _SSE_HEAD + chunked[0]
        chunked[-1] += b"0\r\n\r\n"
        return tuple(chunked)


def bulk_text(total: int, piece: int) -> list[str]:
    """The bulk answer's pieces: `total` characters in pieces of `piece` (the last may be
    shorter), each starting with its index, so that a lost or reordered piece shows."""
    pieces: list[str] = []
    filler = "abcdefghijklmnopqrstuvwxyz0123456789 " * (piece // 37 + 2)
    for index in range(max(1, -(-total // max(1, piece)))):
        size = min(piece, total - index * piece)
        pieces.append((f"{index:08d} " + filler)[:size])
    return pieces


@dataclass
class LiveSpec:
    """A synthesis answer that is written as it goes instead of precomputed writes."""

    scenario: str  # stamped | bulk
    head: bytes  # the response head with the first (role) event
    #: stamped: one token's event is token_prefix + str(ns) + token_suffix (chunk-framed).
    token_prefix: bytes = b""
    token_suffix: bytes = b""
    tokens: int = 0
    rate: float = 0.0
    #: bulk: every further write, precomputed (the pieces, the finish, usage, [DONE]).
    frames: tuple[bytes, ...] = ()
    #: stamped: the writes after the last token (finish, usage, [DONE]).
    tail: bytes = b""

    @property
    def total(self) -> int:
        """Bytes of the whole response (stamped: with stamps as long as now's)."""
        if self.scenario == "bulk":
            return len(self.head) + sum(len(f) for f in self.frames)
        token = len(_frame(self.token_prefix + b"%d" % time.monotonic_ns() + self.token_suffix))
        return len(self.head) + self.tokens * token + len(self.tail)


def _frame(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


def live_spec(scenario_name: str, tokens: int, rate: float, bulk_bytes: int, bulk_piece: int) -> LiveSpec:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
        out = {
            "id": f"chatcmpl-bench-{scenario_name}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": scenario.MODEL,
            "service_tier": "default",
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            if usage is None
            else [],
            "usage": usage,
        }
        return b"data: " + _dumps(out) + b"\n\n"

    count = tokens if scenario_name == "stamped" else len(bulk_text(bulk_bytes, bulk_piece))
    usage = {"prompt_tokens": 90, "completion_tokens": count, "total_tokens": 90 + count}
    head = _SSE_HEAD + _frame(chunk({"role": "assistant", "content": "", "refusal": None}))
    ending = (
        _frame(chunk({}, "stop")),
        _frame(chunk({}, usage=usage)),
        _frame(b"data: [DONE]\n\n") + b"0\r\n\r\n",
    )
    if scenario_name == "stamped":
        marker = "\x00STAMP\x00"
        prefix, suffix = chunk({"content": marker}).split(_dumps(marker)[1:-1])
        return LiveSpec(
            "stamped",
            head,
            token_prefix=prefix + b" ",
            token_suffix=suffix,
            tokens=tokens,
            rate=rate,
            tail=b"".join(ending),
        )
    pieces = tuple(_frame(chunk({"content": p})) for p in bulk_text(bulk_bytes, bulk_piece))
    return LiveSpec("bulk", head, frames=(*pieces, *ending))


class LiveStream:
    """One live answer being written on one connection, and what it has sent."""

    def __init__(self, spec: LiveSpec, transport: asyncio.Transport) -> None:
        self.spec = spec
        self.transport: asyncio.Transport | None = transport
        self.total = spec.total
        self.written = 0
        self.done = False
        self.index = 0  # the next token (stamped) or frame (bulk)
        self.started_ns = time.monotonic_ns()
        self.lag_max_ns = 0
        self.lag_sum_ns = 0

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.written += len(data)

    def sent(self) -> int:
        """Bytes handed to the kernel: written minus what the transport still holds (once
        the answer is complete, all it wrote: the connection may be writing another's)."""
        transport = self.transport
        buffered = transport.get_write_buffer_size() if transport is not None and not self.done else 0
        return max(0, self.written - buffered)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scenario": self.spec.scenario,
            "sent": self.sent(),
            "written": self.written,
            "total": self.total if not self.done else self.written,
            "done": self.done,
        }
        if self.spec.scenario == "stamped":
            out["tokens"] = self.index
            out["lag_max_ms"] = self.lag_max_ns / 1e6
            out["lag_mean_ms"] = self.lag_sum_ns / 1e6 / max(1, self.index)
        return out


#: What a chat request is answered with: precomputed bytes, precomputed writes, or live.
Answer: TypeAlias = bytes | tuple[bytes, ...] | LiveSpec


class State:
    """What the backend process knows: its answers, the routing cache and the counts."""

    def __init__(self, chunks: int, delay: float, live: LiveSpec | None = None) -> None:
        self.replies = Replies(chunks)
        self._tool_sse_joined = b"".join(self.replies.tool_sse)
        self.stamps_calls = live is not None and live.scenario == "stamped"
        self.delay = delay
        #: The streamed synthesis answer of the stamped and bulk scenarios (None: stage).
        self.live = live
        self.streams: list[LiveStream] = []
        self.routes: dict[bytes, tuple[str, Answer]] = {}
        self.counts: dict[str, int] = {}
        self.bodies: dict[str, Any] = {}
        self.requests = 0
        self.connections = 0

    def route(self, body: bytes) -> tuple[str, Answer]:
        """(count key, answer) for a chat request body; parsed once per distinct body."""
        hit = self.routes.get(body)
        if hit is not None:
            return hit
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            return "invalid", _http("400 Bad Request", b'{"error":{"message":"body is not a JSON object"}}')
        messages = request.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else None
        last_role = last.get("role") if isinstance(last, dict) else None
        wants_tool = (
            bool(request.get("tools")) and last_role != "tool" and request.get("tool_choice") != "none"
        )
        stream = bool(request.get("stream"))
        kind = ("tool" if wants_tool else "text") + ("_sse" if stream else "_json")
        answer: Answer
        if wants_tool:
            answer = self.replies.tool_sse if stream else self.replies.tool_json
        elif stream and self.live is not None:
            answer = self.live
        else:
            answer = self.replies.text_sse if stream else self.replies.text_json
        canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
        self.bodies.setdefault(digest, request)
        route = (f"{kind}:{digest}", answer)
        if len(self.routes) < _MAX_CACHED_BODIES:
            self.routes[body] = route
        return route

    def stamped_tool_answer(self) -> bytes:
        """The streamed tool-phase answer whose call id carries this request's arrival,
        `call_<time.monotonic_ns():016d>` (as long as scenario.CALL_ID, so every chunk
        length stays right): the client learns when its call reached the backend, the
        bound on when the service's handler started (stamped scenario)."""
        stamp = b'"call_%016d"' % time.monotonic_ns()
        return self._tool_sse_joined.replace(_CALL_ID_BYTES, stamp)

    def stats(self) -> bytes:
        return _dumps({"requests": self.requests, "connections": self.connections, "counts": self.counts})

    def stream_stats(self) -> bytes:
        return _dumps({"streams": [stream.stats() for stream in self.streams]})


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered in order."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming: tuple[bytes, ...] = ()
        self.next_frame = 0
        self.timer: asyncio.TimerHandle | None = None
        self.live: LiveStream | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.state.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.live is not None:
            self.live.transport = None
            self.live = None
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.live is not None and self.live.spec.scenario == "bulk":
            self._pump()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.streaming and self.live is None:
            self._process()

    def _process(self) -> None:
        while self.transport is not None and not self.streaming and self.live is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    self._fail(b"431 Request Header Fields Too Large")
                return
            lines = bytes(self.buffer[:end]).split(b"\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    self._fail(b"411 Length Required")
                    return
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                self._fail(b"400 Bad Request")
                return
            self._respond(parts[0], parts[1], body)

    def _fail(self, status: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_http(status.decode(), b"{}"))
        self.transport.close()

    def _respond(self, method: bytes, path: bytes, body: bytes) -> None:
        transport = self.transport
        assert transport is not None
        state = self.state
        if method == b"POST" and path.rstrip(b"/") in (b"/v1/chat/completions", b"/chat/completions"):
            key, answer = state.route(body)
            state.requests += 1
            state.counts[key] = state.counts.get(key, 0) + 1
            if isinstance(answer, LiveSpec):
                self._start_live(answer)
            elif answer is state.replies.tool_sse and state.stamps_calls:
                transport.write(state.stamped_tool_answer())
            elif isinstance(answer, bytes):
                transport.write(answer)
            elif state.delay <= 0:
                transport.write(b"".join(answer))
            else:
                transport.write(answer[0])
                self.streaming, self.next_frame = answer, 1
                self.timer = asyncio.get_running_loop().call_later(state.delay, self._tick)
        elif method == b"GET" and path == b"/bench/stats":
            transport.write(_http("200 OK", state.stats()))
        elif method == b"GET" and path == b"/bench/streams":
            transport.write(_http("200 OK", state.stream_stats()))
        elif method == b"GET" and path == b"/bench/bodies":
            transport.write(_http("200 OK", _dumps(state.bodies)))
        else:
            transport.write(_http("404 Not Found", b'{"error":{"message":"no such route"}}'))

    def _tick(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        self.transport.write(self.streaming[self.next_frame])
        self.next_frame += 1
        if self.next_frame < len(self.streaming):
            self.timer = asyncio.get_running_loop().call_later(self.state.delay, self._tick)
            return
        self.streaming = ()
        if self.buffer:
            self._process()

    # -- the live answers (stamped, bulk) -------------------------------------------------

    def _start_live(self, spec: LiveSpec) -> None:
        assert self.transport is not None
        live = LiveStream(spec, self.transport)
        if len(self.state.streams) < _MAX_STREAMS_KEPT:
            self.state.streams.append(live)
        self.live = live
        live.write(spec.head)
        if spec.scenario == "bulk":
            self._pump()
        else:
            self._stamp()

    def _end_live(self, live: LiveStream) -> None:
        live.done = True
        self.live = None
        if self.buffer:
            self._process()

    def _stamp(self) -> None:
        """Send the next token now, stamped, and schedule the one after it."""
        self.timer = None
        live = self.live
        if live is None or live.transport is None:
            return
        spec = live.spec
        now = time.monotonic_ns()
        lag = now - (live.started_ns + round(live.index * 1e9 / spec.rate))
        live.lag_max_ns = max(live.lag_max_ns, lag)
        live.lag_sum_ns += max(0, lag)
        live.write(_frame(spec.token_prefix + b"%d" % now + spec.token_suffix))
        live.index += 1
        if live.index >= spec.tokens:
            live.write(spec.tail)
            self._end_live(live)
            return
        due = live.started_ns + round(live.index * 1e9 / spec.rate)
        delay = max(0.0, (due - time.monotonic_ns()) / 1e9)
        self.timer = asyncio.get_running_loop().call_later(delay, self._stamp)

    def _pump(self) -> None:
        """Write the bulk answer's frames until the transport says it is full, or all."""
        live = self.live
        if live is None:
            return
        frames = live.spec.frames
        while not self.paused and live.transport is not None and live.index < len(frames):
            live.write(frames[live.index])
            live.index += 1
        if live.index >= len(frames):
            self._end_live(live)


async def _serve(args: argparse.Namespace) -> int:
    live = (
        None
        if args.scenario == "stage"
        else live_spec(args.scenario, args.tokens, args.rate, args.bulk_bytes, args.bulk_piece)
    )
    state = State(args.chunks, args.chunk_delay, live)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(state), args.host, args.port, backlog=4096, reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    common.announce(f"READY {port}")
    await common.wait_for_stop()
    server.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backend", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=scenario.DEFAULT_CHUNKS)
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between SSE events")
    parser.add_argument(
        "--scenario",
        choices=("stage", "stamped", "bulk"),
        default="stage",
        help="the streamed synthesis answer: stage (--chunks words), stamped, bulk (see above)",
    )
    parser.add_argument("--tokens", type=int, default=100, help="stamped: tokens per answer")
    parser.add_argument("--rate", type=float, default=20.0, help="stamped: tokens per second")
    parser.add_argument("--bulk-bytes", type=int, default=1 << 20, help="bulk: characters per answer")
    parser.add_argument("--bulk-piece", type=int, default=4096, help="bulk: characters per event")
    return common.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
