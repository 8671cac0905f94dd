"""An OpenAI-compatible HTTP backend (vLLM, llama.cpp server, Ollama, OpenAI).

One `AsyncOpenAI` client per configured backend, made at start-up and shared by every
stage for the process's life (the legacy handler built one per request: ~25 ms of CPU
each). The client's own retries are off: the runner retries, only where it is safe.
Responses are read through the client's raw-response API and parsed by `wire.py`.
This module is the one place where openai and HTTP exceptions become `BackendError`s.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any, NoReturn

import httpx2
import openai

from toolchain_service.backends import wire
from toolchain_service.backends.base import (
    BackendInfo,
    Capabilities,
    ChatBackend,
    ChatRequest,
    Completion,
    ModelDelta,
    RetryPolicy,
)
from toolchain_service.config import BackendSettings, ConfigError
from toolchain_service.errors import (
    BackendError,
    BackendMisconfigured,
    BackendModelNotFound,
    BackendProtocolError,
    BackendRejected,
    BackendUnavailable,
)


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _backend_message(body: object) -> str:
    if isinstance(body, dict):
        inner = body.get("error", body)
        body = inner.get("message", "") if isinstance(inner, dict) else inner
    return str(body or "")[:300]


def _connection_problem(exc: BaseException) -> str:
    text = " ".join(str(e) for e in (exc, exc.__cause__, exc.__context__) if e).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service" in text or "nodename" in text or "name resolution" in text or "getaddrinfo" in text:
        return "host name not found"
    if "ssl" in text or "certificate" in text or "tls" in text:
        return "TLS handshake failed"
    return "connection failed"


class OpenAIHTTPBackend(ChatBackend):
    def __init__(self, name: str, settings: BackendSettings) -> None:
        streams = True if settings.streams_tool_calls is None else settings.streams_tool_calls
        super().__init__(
            BackendInfo(
                name=name, kind="openai", default_model=settings.default_model, models=settings.models
            ),
            Capabilities(streams_tool_calls=streams),
            RetryPolicy(max_retries=settings.max_retries),
        )
        self._settings = settings
        api_key = settings.api_key()
        if not api_key:
            raise ConfigError(
                f"backends.{name}.api_key_env: the environment variable {settings.api_key_env} is not set"
            )
        self._timeout = httpx2.Timeout(
            settings.request_timeout, connect=settings.connect_timeout, read=settings.read_timeout
        )
        self._client = openai.AsyncOpenAI(
            base_url=settings.base_url,
            api_key=api_key,
            max_retries=0,
            timeout=self._timeout,
            http_client=openai.DefaultAsyncHttpxClient(
                timeout=self._timeout,
                limits=httpx2.Limits(
                    max_connections=settings.max_connections,
                    max_keepalive_connections=settings.max_connections,
                ),
            ),
        )
        self._max_bytes = settings.max_response_bytes

    async def aclose(self) -> None:
        await self._client.close()

    def _body(self, request: ChatRequest, stream: bool) -> dict[str, Any]:
        extra: dict[str, Any] = dict(self._settings.extra_body)
        if self._settings.num_predict_option:
            options = dict(extra.get("options") or {})
            options["num_predict"] = request.max_tokens
            extra["options"] = options
        if stream:
            extra["stream_options"] = {"include_usage": True}
        return extra

    def _kwargs(self, request: ChatRequest, stream: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": stream,
            "extra_body": self._body(request, stream),
        }
        if request.tools:
            kwargs["tools"] = request.tools
            kwargs["tool_choice"] = "auto"
        if request.timeout is not None:
            kwargs["timeout"] = self._timeout.__class__(
                min(request.timeout, self._settings.request_timeout),
                connect=min(request.timeout, self._settings.connect_timeout),
                read=min(request.timeout, self._settings.read_timeout),
            )
        return kwargs

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            raw = await self._client.chat.completions.with_raw_response.create(**self._kwargs(request, False))
            declared = raw.http_response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self._max_bytes:
                raise BackendProtocolError(f"backend response is larger than {self._max_bytes} bytes")
            body = bytearray()
            async for piece in raw.http_response.aiter_bytes():
                body += piece
                if len(body) > self._max_bytes:
                    raise BackendProtocolError(f"backend response is larger than {self._max_bytes} bytes")
            return wire.parse_completion(wire.loads(bytes(body)))
        except BackendError:
            raise
        except Exception as exc:
            self._raise(exc, request)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ModelDelta, None]:
        try:
            async with self._client.chat.completions.with_streaming_response.create(
                **self._kwargs(request, True)
            ) as response:
                finished = False
                async for data in wire.sse_data(response.iter_lines(), self._max_bytes):
                    if data is wire.DONE:
                        return
                    delta = wire.parse_chunk(wire.loads(data))
                    finished = finished or bool(delta.finish_reason)
                    yield delta
                if not finished:
                    raise BackendUnavailable(
                        f"backend {self.name!r} closed the stream before it finished"
                        " (no finish reason, no [DONE])"
                    )
        except BackendError:
            raise
        except Exception as exc:
            self._raise(exc, request)

    def _raise(self, exc: Exception, request: ChatRequest) -> NoReturn:
        """Translate one openai/HTTP exception into the BackendError a caller can act on."""
        name = self.name
        if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
            raise BackendUnavailable(f"backend {name!r} did not answer in time") from None
        if isinstance(exc, openai.APIConnectionError | httpx2.ConnectError):
            raise BackendUnavailable(f"cannot reach backend {name!r}: {_connection_problem(exc)}") from None
        if isinstance(exc, httpx2.TransportError):  # read error, cut mid-body, protocol violation
            raise BackendUnavailable(f"backend {name!r} cut the response short") from None
        if isinstance(exc, openai.APIStatusError):
            status, message = exc.status_code, _backend_message(exc.body)
            if status == 429:
                raise BackendUnavailable(
                    f"backend {name!r} is rate limiting (HTTP 429): {message}",
                    retry_after=_retry_after(exc.response),
                    reason="BACKEND_RATE_LIMITED",
                ) from None
            if status in (401, 403):
                raise BackendMisconfigured(
                    f"backend {name!r} refused the server's credentials (HTTP {status}); "
                    "the server's operator must fix its API key configuration"
                ) from None
            if status == 404:
                raise BackendModelNotFound(
                    f"backend {name!r} does not serve model {request.model!r} (HTTP 404): {message}"
                ) from None
            if status in (400, 413, 422):
                raise BackendRejected(
                    f"backend {name!r} rejected the request (HTTP {status}): {message}"
                ) from None
            raise BackendUnavailable(
                f"backend {name!r} failed (HTTP {status}): {message}", retry_after=_retry_after(exc.response)
            ) from None
        if isinstance(exc, openai.APIError):
            raise BackendUnavailable(f"backend {name!r} reported an error: {exc.message[:300]}") from None
        if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
            raise BackendProtocolError(f"backend {name!r} sent a body that is not valid JSON") from None
        raise exc
