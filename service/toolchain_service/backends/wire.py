"""Parsing of the OpenAI chat-completions wire format (JSON bodies and SSE events).

The HTTP backend reads raw bytes through the openai client's raw-response API and parses
them here with `json.loads` and plain dict access: the same fields `ChatCompletionChunk`
and `ChatCompletion` would give, without building a pydantic model per streamed chunk
(tests/test_wire.py proves the equivalence on the same payloads). Anything that is not
the wire format raises `BackendProtocolError`; an `error` object raises the error the
backend describes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from toolchain_service.backends.base import Completion, ModelDelta
from toolchain_service.errors import BackendError, BackendProtocolError, BackendUnavailable
from toolchain_service.events import ToolCall, ToolCallDelta, Usage

#: The end-of-stream sentinel of OpenAI SSE.
DONE = "[DONE]"


def _str(value: object, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
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
        message = str(error.get("message") or "")[:300]
    elif isinstance(error, str):
        message = error[:300]
    return BackendUnavailable(f"backend reported an error mid-response: {message or 'no message'}")


def loads(data: str | bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackendProtocolError("backend sent a body that is not valid JSON") from exc
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


async def sse_data(lines: AsyncIterator[str], max_event_bytes: int) -> AsyncIterator[str]:
    """The `data` payloads of an SSE stream; `[DONE]`, when it comes, is the last item.

    A stream that ends without `[DONE]` simply ends (the caller decides whether that was
    a cut); an event larger than `max_event_bytes` raises BackendProtocolError."""
    buffer: list[str] = []
    size = 0
    async for line in lines:
        if not line:
            if buffer:
                data = "\n".join(buffer)
                buffer.clear()
                size = 0
                if data.strip() == DONE:
                    yield DONE
                    return
                yield data
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field != "data":
            continue
        value = value.removeprefix(" ")
        size += len(value)
        if size > max_event_bytes:
            raise BackendProtocolError(f"backend sent an SSE event larger than {max_event_bytes} bytes")
        buffer.append(value)
    if buffer:
        # The last event had no blank line after it: complete JSON is still usable.
        data = "\n".join(buffer)
        yield DONE if data.strip() == DONE else data
