"""Parsing of the OpenAI chat-completions wire format (JSON bodies and SSE events).

The HTTP backend reads raw bytes through the openai client's streaming-response API and parses
them here with `json.loads` and plain dict access: the same fields `ChatCompletionChunk`
and `ChatCompletion` would give, without building a pydantic model per streamed chunk
(tests/test_wire.py proves the equivalence on the same payloads). Anything that is not
the wire format raises `BackendProtocolError`; an `error` object raises the error the
backend describes.

Bodies are UTF-8 JSON (RFC 8259): bytes that are not UTF-8 are a protocol error, never
silently replaced, so a tool never runs on arguments the model did not write. Lone
surrogates written as JSON escapes are valid JSON and become U+FFFD (`utf8.valid`).
SSE is split into lines here, from bytes, with the whole body bounded: a backend cannot
make the server buffer more than `max_response_bytes` of one response.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Final

from toolchain_service.backends.base import Completion, ModelDelta
from toolchain_service.errors import (
    BackendError,
    BackendProtocolError,
    BackendResponseTooLarge,
    BackendUnavailable,
)
from toolchain_service.events import ToolCall, ToolCallDelta, Usage
from toolchain_service.utf8 import valid

#: The end-of-stream sentinel of OpenAI SSE.
DONE: Final = b"[DONE]"


def _str(value: object, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return valid(value)
    raise BackendProtocolError(f"backend sent a non-string {what}")


def parse_usage(value: object) -> Usage | None:
    if not isinstance(value, dict):
        return None
    try:
        prompt = int(value.get("prompt_tokens") or 0)
        completion = int(value.get("completion_tokens") or 0)
        total = int(value.get("total_tokens") or prompt + completion)
    except (TypeError, ValueError):
        return None
    return Usage(prompt, completion, total)


def error_from_body(error: object) -> BackendError:
    """An `{"error": ...}` object inside a 200 response or an SSE stream."""
    message = ""
    if isinstance(error, dict):
        message = valid(str(error.get("message") or "")[:300])
    elif isinstance(error, str):
        message = valid(error[:300])
    return BackendUnavailable(f"backend reported an error mid-response: {message or 'no message'}")


def loads(data: str | bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except UnicodeDecodeError:  # a ValueError too: test it first
        raise BackendProtocolError("backend sent bytes that are not valid UTF-8") from None
    except ValueError:
        raise BackendProtocolError("backend sent a body that is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BackendProtocolError("backend sent JSON that is not an object")
    if obj.get("error") is not None:
        raise error_from_body(obj["error"])
    return obj


def parse_chunk(obj: dict[str, Any]) -> ModelDelta:
    """One `chat.completion.chunk` object. A usage-only chunk has no choices."""
    usage = parse_usage(obj.get("usage"))
    choices = obj.get("choices")
    if not choices:
        return ModelDelta(usage=usage)
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise BackendProtocolError("backend sent a chunk whose choices are not a list of objects")
    choice = choices[0]
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        raise BackendProtocolError("backend sent a chunk whose delta is not an object")
    deltas: tuple[ToolCallDelta, ...] = ()
    raw_calls = delta.get("tool_calls")
    if raw_calls:
        if not isinstance(raw_calls, list):
            raise BackendProtocolError("backend sent tool_calls that are not a list")
        deltas = tuple(_tool_call_delta(tc, position) for position, tc in enumerate(raw_calls))
    return ModelDelta(
        content=_str(delta.get("content"), "content"),
        tool_calls=deltas,
        finish_reason=_str(choice.get("finish_reason"), "finish_reason"),
        usage=usage,
    )


def _tool_call_delta(tc: object, position: int) -> ToolCallDelta:
    if not isinstance(tc, dict):
        raise BackendProtocolError("backend sent a tool-call delta that is not an object")
    index = tc.get("index", position)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise BackendProtocolError("backend sent a tool-call delta without a valid index")
    function = tc.get("function") or {}
    if not isinstance(function, dict):
        raise BackendProtocolError("backend sent a tool-call function that is not an object")
    return ToolCallDelta(
        index=index,
        id=_str(tc.get("id"), "tool-call id"),
        name=_str(function.get("name"), "tool name"),
        arguments=_str(function.get("arguments"), "tool arguments"),
    )


def parse_completion(obj: dict[str, Any]) -> Completion:
    """One unstreamed `chat.completion` object."""
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BackendProtocolError("backend sent a completion without choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise BackendProtocolError("backend sent a completion without a message")
    calls: list[ToolCall] = []
    for position, tc in enumerate(message.get("tool_calls") or []):
        if not isinstance(tc, dict) or not isinstance(tc.get("function"), dict):
            raise BackendProtocolError("backend sent a tool call that is not an object")
        function = tc["function"]
        arguments = function.get("arguments")
        if isinstance(arguments, dict | list):  # some servers send an object, not a JSON text
            arguments = json.dumps(arguments)
        calls.append(
            ToolCall(
                id=_str(tc.get("id"), "tool-call id") or f"call_{position}",
                name=_str(function.get("name"), "tool name"),
                arguments=_str(arguments, "tool arguments"),
            )
        )
    return Completion(
        content=_str(message.get("content"), "content"),
        tool_calls=tuple(calls),
        finish_reason=_str(choice.get("finish_reason"), "finish_reason"),
        usage=parse_usage(obj.get("usage")),
    )


async def sse_data(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    """The `data` payloads of an SSE body read as byte chunks; `DONE`, when it comes, is
    the last item.

    Lines end with LF, CRLF or CR. A body that ends without `[DONE]` simply ends (the
    caller decides whether that was a cut); a body larger than `max_bytes` raises
    `BackendResponseTooLarge` before more than `max_bytes` are buffered."""
    async for batch in sse_batches(chunks, max_bytes):
        for payload in batch:
            yield payload


async def sse_batches(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[list[bytes]]:
    """`sse_data`, a list at a time: the payloads that one chunk of the body completed
    (what had arrived together), never waiting for more."""
    buffer = bytearray()
    data: list[bytes] = []
    total = 0
    scanned = 0  # bytes of `buffer` known to hold no line end
    async for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise BackendResponseTooLarge(max_bytes)
        buffer += chunk
        start = 0
        batch: list[bytes] = []
        while True:
            end, after = _line_end(buffer, max(start, scanned))
            if end < 0:
                break
            line = bytes(buffer[start:end])
            start = after
            if line:
                _field(line, data)
            elif data:
                payload = b"\n".join(data)
                data.clear()
                if payload.strip() == DONE:
                    batch.append(DONE)
                    yield batch
                    return
                batch.append(payload)
        if batch:
            yield batch
        del buffer[:start]
        scanned = max(0, len(buffer) - 1)  # a CR at the end is looked at again
    if buffer.endswith(b"\r"):
        del buffer[-1]
    if buffer:
        _field(bytes(buffer), data)
    if data:
        # The last event had no blank line after it: complete JSON is still usable.
        payload = b"\n".join(data)
        yield [DONE if payload.strip() == DONE else payload]


#: The most text one merged delta carries: well under any gRPC message limit (4 MiB by
#: default) and small enough that no single event holds much memory.
MERGE_LIMIT = 32 << 10


def merge_deltas(deltas: list[ModelDelta], limit: int = MERGE_LIMIT) -> list[ModelDelta]:
    """Deltas that arrived together, as few as can carry them: consecutive ones joined
    until one holds `limit` characters of content and arguments. Joined: the content, the
    pieces of each tool call's arguments (a call's id and name stay on its first piece),
    the last finish reason and usage."""
    if len(deltas) == 1:
        return deltas
    merged: list[ModelDelta] = []
    group: list[ModelDelta] = []
    size = 0
    for delta in deltas:
        group.append(delta)
        size += len(delta.content) + sum(len(call.arguments) for call in delta.tool_calls)
        if size >= limit:
            merged.append(_joined(group))
            group, size = [], 0
    if group:
        merged.append(_joined(group))
    return merged


def _joined(deltas: list[ModelDelta]) -> ModelDelta:
    if len(deltas) == 1:
        return deltas[0]
    content: list[str] = []
    calls: list[ToolCallDelta] = []
    finish_reason = ""
    usage = None
    for delta in deltas:
        content.append(delta.content)
        for call in delta.tool_calls:
            last = calls[-1] if calls else None
            if (
                last is not None
                and last.index == call.index
                and (not call.id or call.id == last.id)
                and (not call.name or call.name == last.name)
            ):
                calls[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + call.arguments)
            else:
                calls.append(call)
        finish_reason = delta.finish_reason or finish_reason
        usage = delta.usage or usage
    return ModelDelta("".join(content), tuple(calls), finish_reason, usage)


def _line_end(buffer: bytearray, start: int) -> tuple[int, int]:
    """(end of the first line at or after `start`, start of the next), or (-1, -1). A CR
    at the very end waits for the next chunk: it may be the first half of a CRLF."""
    lf = buffer.find(b"\n", start)
    cr = buffer.find(b"\r", start, lf if lf >= 0 else len(buffer))
    if cr >= 0:
        if cr + 1 == len(buffer):
            return -1, -1
        return cr, cr + 2 if buffer[cr + 1] == 0x0A else cr + 1
    if lf >= 0:
        return lf, lf + 1
    return -1, -1


def _field(line: bytes, data: list[bytes]) -> None:
    """Record one non-empty SSE line; only `data` fields matter (comments and `event`,
    `id`, `retry` fields are ignored)."""
    name, colon, value = line.partition(b":")
    if name == b"data" and colon:
        data.append(value[1:] if value.startswith(b" ") else value)
    elif name == b"data":
        data.append(b"")
