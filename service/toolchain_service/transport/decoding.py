"""Requests that are not valid protobuf end with INVALID_ARGUMENT, not UNKNOWN.

grpc deserialises a request before any handler runs; when that fails (a string field that
is not UTF-8, truncated bytes) it logs a traceback and answers UNKNOWN with the
exception's class and message. `DecodeGuard`, a server interceptor, wraps every
method's request deserializer: a request that does not decode becomes an `Undecodable`
carrying an `InvalidRequest` with one BadRequest field violation per string field that is
not UTF-8 (found by walking the wire format against the message's descriptor, e.g.
"stage.user_prompt"), and the method ends with that error's status before the handler
sees it. Methods marked `@accepts_undecodable` get the `Undecodable` themselves, so that
a stage stream can still end with its terminal Error event.

Install it after other interceptors (auth first: an unauthenticated caller learns
nothing about its request). Handlers are wrapped once per method and cached.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from toolchain_service.errors import FieldViolation, InvalidRequest
from toolchain_service.transport.status import grpc_status

F = TypeVar("F", bound=Callable[..., Any])
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context = grpc.aio.ServicerContext[Any, Any]

_MAX_DEPTH = 32
_ATTRIBUTE = "_accepts_undecodable"


class Undecodable:
    """What a guarded deserializer returns for bytes that are not a valid request."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidRequest) -> None:
        self.error = error


def accepts_undecodable(method: F) -> F:
    """Mark a handler that reports an `Undecodable` request itself."""
    setattr(method, _ATTRIBUTE, True)
    return method


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _bad_strings(data: bytes, descriptor: Descriptor, prefix: str, found: list[str], depth: int) -> None:
    """Append the path of every string field of `data` that is not UTF-8."""
    seen: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
            continue
        if wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            continue
        if wire_type != 2:
            raise ValueError("unsupported wire type")
        length, pos = _varint(data, pos)
        value, pos = data[pos : pos + length], pos + length
        if pos > len(data):
            raise ValueError("truncated field")
        field = descriptor.fields_by_number.get(number)
        if field is None:
            continue
        path = prefix + field.name
        if field.is_repeated:
            index = seen.get(number, 0)
            seen[number] = index + 1
            path = f"{path}[{index}]"
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                found.append(path)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type and depth < _MAX_DEPTH:
            _bad_strings(value, field.message_type, path + ".", found, depth + 1)


def describe(data: bytes, descriptor: Descriptor | None) -> InvalidRequest:
    """Why `data` is not a valid message of `descriptor`, as field violations."""
    found: list[str] = []
    if descriptor is not None:
        try:
            _bad_strings(data, descriptor, "", found, 0)
        except ValueError:
            found.clear()
    if found:
        return InvalidRequest([FieldViolation(path, "is not valid UTF-8") for path in found])
    what = descriptor.full_name if descriptor is not None else "request"
    return InvalidRequest([FieldViolation("", f"the request is not a valid {what} message")])


def _guarded(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    owner = getattr(deserializer, "__self__", None)  # pb.X.FromString is bound to the class X
    descriptor: Descriptor | None = getattr(owner, "DESCRIPTOR", None)

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or whatever a custom deserializer raises
            return Undecodable(describe(data, descriptor))

    return decode


async def _reject(context: Context, request: Undecodable) -> None:
    status = grpc_status(request.error)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _guard_unary_request(behavior: Callable[..., Any]) -> Callable[..., Any] | None:
    if inspect.iscoroutinefunction(behavior):

        async def unary(request: Any, context: Context) -> Any:
            if isinstance(request, Undecodable):
                await _reject(context, request)
            return await behavior(request, context)

        return unary
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _reject(context, request)
            async for response in behavior(request, context):
                yield response

        return stream
    return None  # a sync handler: left as grpc runs it


def _guard_stream_request(behavior: Callable[..., Any]) -> Callable[..., Any] | None:
    async def checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Undecodable):
                await _reject(context, request)
            yield request

    if inspect.iscoroutinefunction(behavior):

        async def unary(requests: AsyncIterator[Any], context: Context) -> Any:
            return await behavior(checked(requests, context), context)

        return unary
    if inspect.isasyncgenfunction(behavior):

        async def stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for response in behavior(checked(requests, context), context):
                yield response

        return stream
    return None


def guard(handler: Handler) -> Handler:
    """`handler` with a deserializer that cannot fail, and a behavior that rejects what
    did not decode (unless marked `accepts_undecodable`)."""
    if handler.request_deserializer is None or not hasattr(handler, "_replace"):
        return handler  # raw bytes: nothing to decode; or not grpc's namedtuple
    request_kind = "stream" if handler.request_streaming else "unary"
    kind = f"{request_kind}_{'stream' if handler.response_streaming else 'unary'}"
    behavior = getattr(handler, kind)
    if behavior is None:
        return handler
    if getattr(behavior, _ATTRIBUTE, False):
        wrapped: Callable[..., Any] | None = behavior
    elif handler.request_streaming:
        wrapped = _guard_stream_request(behavior)
    else:
        wrapped = _guard_unary_request(behavior)
    if wrapped is None:
        return handler
    replace: Callable[..., Handler] = getattr(handler, "_replace")  # noqa: B009 - a namedtuple
    return replace(request_deserializer=_guarded(handler.request_deserializer), **{kind: wrapped})


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # grpc-stubs' generic
    """Applies `guard` to every method handler, once per method."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = guard(handler)
        if len(self._cache) < 1024:  # bounded: method names come from callers
            self._cache[method] = (handler, guarded)
        return guarded
