"""An OpenAI-compatible HTTP backend (vLLM, llama.cpp server, Ollama, OpenAI).

One `aiohttp.ClientSession` per configured backend (its connection pool), made on first use
and shared by every stage for the process's life (the legacy handler built one per request:
~25 ms of CPU each). aiohttp is the leanest HTTP client the registries offer that does
TLS, proxies and pooling (bench/http_clients.py: ~1.3 ms of CPU per streamed stage, httpx2
~5 ms). The request body is serialised once with `json.dumps`, and responses, JSON and SSE
alike, are read as bytes and parsed by `wire.py`, so no response is buffered beyond
`max_response_bytes`. The openai SDK is not
used here: its typed `create()` costs ~0.7 ms of CPU a call in transforms and pydantic
objects, and its untyped path is internal API; the wire format is small and `wire.py`
reads it strictly. (The benchmark keeps a typed-SDK loop as what a user would write instead.)
No retries here: the runner retries, only where it is safe. A call takes at most
`request_timeout` in all (aiohttp alone bounds each read, not the sum; every byte counts,
SSE comments included), the caller's deadline permitting. This module is the one place
where HTTP exceptions and statuses become `BackendError`s; their messages name the problem
(refused, DNS, TLS, timeout, cut, HTTP status), never a library class, never the API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import socket
import ssl
import time
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import aiohttp

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
from toolchain_service.backends.budget import ByteBudget
from toolchain_service.config import BackendSettings, ConfigError
from toolchain_service.errors import (
    BackendError,
    BackendMisconfigured,
    BackendModelNotFound,
    BackendProtocolError,
    BackendRejected,
    BackendResponseTooLarge,
    BackendUnavailable,
)
from toolchain_service.utf8 import valid

_JSON_HEADERS = {"Content-Type": "application/json"}
_USER_AGENT = "toolchain-grpc/0.1"


def _tool_result_as_user(message: dict[str, Any]) -> dict[str, Any]:
    """Some chat templates (llama.cpp's chatml-function-calling) render no `tool` messages,
    so the model would never see the results; say them as the user instead."""
    return {
        "role": "user",
        "content": f"Result of tool call {message.get('tool_call_id', '')}: {message['content']}",
    }


async def _drain(raw: AsyncIterator[bytes], limit: int = 64 << 10, seconds: float = 0.5) -> None:
    """Read what follows [DONE] (normally only the chunked terminator) so the connection
    goes back to the pool: without this every streamed call opened a new TCP connection.
    A backend that keeps talking or stalls after [DONE] just loses its connection."""
    seen = 0
    try:
        async with asyncio.timeout(seconds):
            async for piece in raw:
                seen += len(piece)
                if seen > limit:
                    return
    except (TimeoutError, aiohttp.ClientError):
        return


async def _within(raw: AsyncIterator[bytes], budget: float, name: str, total: float) -> AsyncIterator[bytes]:
    """`raw`, failing once the time spent waiting for it passes `budget` seconds. Every
    chunk counts, so SSE comments (`: ping`) cannot hold a call past request_timeout; the
    time the consumer spends between chunks does not (it is not the backend's)."""
    waited = 0.0
    resumed = time.monotonic()
    async for chunk in raw:
        waited += time.monotonic() - resumed
        if waited > budget:
            raise BackendUnavailable(f"backend {name!r} did not finish within {total:g} s")
        yield chunk
        resumed = time.monotonic()


def _proxy_for(url: str) -> tuple[str | None, dict[str, str] | None]:
    """The proxy the environment names for `url` (HTTP_PROXY / HTTPS_PROXY, unless NO_PROXY
    exempts its host), and the Proxy-Authorization header of the credentials its URL carries."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(f"{host}:{parts.port}" if parts.port else host):
        return None, None
    proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    auth = None
    if proxy_url.username is not None:
        login, password = unquote(proxy_url.username), unquote(proxy_url.password or "")
        auth = {"Proxy-Authorization": aiohttp.encode_basic_auth(login, password)}
    netloc = proxy_url.hostname or ""
    if ":" in netloc:  # IPv6
        netloc = f"[{netloc}]"
    if proxy_url.port:
        netloc += f":{proxy_url.port}"
    return f"{proxy_url.scheme}://{netloc}", auth


class _HTTPStatusError(Exception):
    """An HTTP error status from the backend, with the start of its body."""

    def __init__(self, response: aiohttp.ClientResponse, text: bytes) -> None:
        super().__init__(f"HTTP {response.status}")
        self.status_code = response.status
        self.headers = response.headers
        self.body: object = text.decode("utf-8", "replace")
        with contextlib.suppress(ValueError):
            self.body = json.loads(text)


async def _read_some(response: aiohttp.ClientResponse, limit: int = 64 << 10) -> bytes:
    """At most `limit` bytes of an error response's body (its message is all we use)."""
    body = bytearray()
    try:
        async for piece in response.content.iter_any():
            body += piece
            if len(body) >= limit:
                break
    except (aiohttp.ClientError, TimeoutError):
        pass
    return bytes(body[:limit])


def _finish(response: aiohttp.ClientResponse) -> None:
    """A body read to its end goes back to the pool; anything else closes the connection,
    so the backend sees the call end (a cancelled stage, a cut, a body too large)."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()


def _tool_choice(choice: str) -> str | dict[str, Any]:
    """The OpenAI wire form of a tool choice: a mode, or the one function to call."""
    if choice in ("auto", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _backend_message(body: object) -> str:
    if isinstance(body, dict):
        inner = body.get("error", body)
        body = inner.get("message", "") if isinstance(inner, dict) else inner
    return valid(str(body or "")[:300])


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first (httpx wraps httpcore wraps
    OSError), without cycles."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 16 and all(current is not e for e in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _connection_problem(exc: BaseException) -> str:
    chain = _causes(exc)
    for cause in chain:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "host name not found"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "TLS certificate not trusted"
        if isinstance(cause, ssl.SSLError):
            return "TLS handshake failed"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        if isinstance(cause, aiohttp.ServerDisconnectedError):
            return "the connection was closed without a response"
    text = " ".join(str(e) for e in chain).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service" in text or "nodename" in text or "name resolution" in text or "getaddrinfo" in text:
        return "host name not found"
    if "ssl" in text or "certificate" in text or "tls" in text:
        return "TLS handshake failed"
    return "connection failed"


class OpenAIHTTPBackend(ChatBackend):
    def __init__(
        self,
        name: str,
        settings: BackendSettings,
        budget: ByteBudget | None = None,
        *,
        keep_alive: bool = True,
    ) -> None:
        streams = True if settings.streams_tool_calls is None else settings.streams_tool_calls
        super().__init__(
            BackendInfo(
                name=name,
                kind="openai",
                default_model=settings.default_model,
                models=settings.models,
                tool_parser=settings.effective_tool_parser(),
            ),
            Capabilities(streams_tool_calls=streams, forces_tool_choice=settings.forces_tool_choice),
            RetryPolicy(max_retries=settings.max_retries),
        )
        self._settings = settings
        api_key = settings.api_key()
        if not api_key:
            raise ConfigError(
                f"backends.{name}.api_key_env: the environment variable {settings.api_key_env} is not set"
            )
        # The key goes on each request, not in the pool's default headers: aiohttp copies
        # those onto a proxy's CONNECT request, where the key would reach the proxy.
        self._headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
        self._request_headers: Mapping[str, str] = {**_JSON_HEADERS, "Authorization": f"Bearer {api_key}"}
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        self._session: aiohttp.ClientSession | None = None
        self._proxy_headers: dict[str, str] | None = None
        self._max_bytes = settings.max_response_bytes
        self._merge = settings.merge_deltas
        #: The process's count of bytes held for callers, and its cap (budget.py).
        self._budget = budget
        #: False: a new connection per request (the embedded model's llama-server, on
        #: loopback, closes idle connections under a reused request: a retry each time).
        self._keep_alive = keep_alive
        # Never echoed: a backend that repeats the key in an error message is redacted.
        self._secret = api_key if len(api_key) >= 8 else ""

    def _client(self) -> aiohttp.ClientSession:
        """The backend's pool, made inside the running loop on first use (aiohttp's rule).
        HTTP(S)_PROXY and NO_PROXY count, as for other clients, but are read once here:
        aiohttp's trust_env reads them, and ~/.netrc in a thread, on every request (about
        a tenth of the service's CPU under load, measured), and the URL never changes."""
        if self._session is None:
            proxy, auth = _proxy_for(self._url)
            if auth is not None and self._url.startswith("https:"):
                self._proxy_headers = auth  # on the CONNECT request of the tunnel
            elif auth is not None:
                self._request_headers = {**self._request_headers, **auth}  # a plain request goes to the proxy
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._settings.max_connections, limit_per_host=0, force_close=not self._keep_alive
                ),
                headers=self._headers,
                proxy=proxy,
                read_bufsize=self._settings.read_buffer_bytes,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _body(self, request: ChatRequest, stream: bool) -> dict[str, Any]:
        extra: dict[str, Any] = dict(self._settings.extra_body)
        if self._settings.num_predict_option:
            options = dict(extra.get("options") or {})
            options["num_predict"] = request.max_tokens
            extra["options"] = options
        if stream:
            extra["stream_options"] = {"include_usage": True}
        return extra

    async def _post(self, request: ChatRequest, stream: bool) -> aiohttp.ClientResponse:
        """POST /chat/completions through the shared pool, the body serialised once here;
        the response comes back unread, or as _HTTPStatusError for HTTP 4xx/5xx."""
        messages = request.messages
        if self._settings.tool_results_as_user:
            messages = [_tool_result_as_user(m) if m.get("role") == "tool" else m for m in messages]
        body: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": stream,
        }
        if request.tools:
            body["tools"] = request.tools
            body["tool_choice"] = _tool_choice(request.tool_choice)
        body.update(self._body(request, stream))
        if request.extra:
            body.update(request.extra)
        cap = self._settings.request_timeout if request.timeout is None else request.timeout
        timeout = aiohttp.ClientTimeout(
            total=None,  # the whole call's limit is ours (_total_timeout), per byte waited
            # sock_connect, not connect: aiohttp's `connect` also counts the wait for a free
            # pool slot, which busy stages may rightly do (bounded by request_timeout)
            sock_connect=min(cap, self._settings.connect_timeout),
            sock_read=min(cap, self._settings.read_timeout),
        )
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            client = self._client()
            response = await client.post(
                self._url,
                data=content,
                headers=self._request_headers,
                timeout=timeout,
                proxy_headers=self._proxy_headers,
            )
        except TimeoutError:
            raise
        except aiohttp.ClientError as exc:  # no response at all: refused, DNS, TLS, closed
            raise BackendUnavailable(
                f"cannot reach backend {self.name!r}: {_connection_problem(exc)}"
            ) from None
        if response.status >= 400:
            try:
                text = await _read_some(response)
            finally:
                response.close()
            raise _HTTPStatusError(response, text)
        return response

    def _total_timeout(self, request: ChatRequest) -> float:
        total = self._settings.request_timeout
        return total if request.timeout is None else max(0.0, min(total, request.timeout))

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            async with asyncio.timeout(self._total_timeout(request)):
                http = await self._post(request, False)
                try:
                    declared = http.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > self._max_bytes:
                        raise BackendResponseTooLarge(self._max_bytes)
                    body = bytearray()
                    async for piece in http.content.iter_any():
                        body += piece
                        if len(body) > self._max_bytes:
                            raise BackendResponseTooLarge(self._max_bytes)
                finally:
                    _finish(http)
            return wire.parse_completion(wire.loads(bytes(body)))
        except BackendError as exc:
            raise self._redacted(exc) from None
        except Exception as exc:
            self._raise(exc, request)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ModelDelta, None]:
        # No asyncio.timeout here: a generator suspends at each yield, and the time the
        # consumer spends between chunks (a slow reader) is not the backend's. Only the time
        # spent waiting for the backend's bytes counts (_within), checked as each arrives,
        # comments and keep-alives included.
        total = self._total_timeout(request)
        try:
            started = time.monotonic()
            async with asyncio.timeout(total):  # a pool slot, the connection, the headers
                http = await self._post(request, True)
            account = self._budget.account() if self._budget is not None else None
            try:
                finished = False
                raw = http.content.iter_any()
                timed = _within(raw, total - (time.monotonic() - started), self.name, total)
                # held from its read until the next is asked for, i.e. until its events are written
                chunks = timed if account is None else account.chunks(timed)
                async for batch in wire.sse_batches(chunks, self._max_bytes):
                    done = batch[-1] is wire.DONE
                    deltas: list[ModelDelta] = []
                    failure: BackendError | None = None
                    for data in batch[:-1] if done else batch:
                        try:
                            deltas.append(wire.parse_chunk(wire.loads(data)))
                        except BackendError as exc:  # what came before it still goes out first
                            failure = exc
                            break
                    if deltas:
                        finished = finished or any(delta.finish_reason for delta in deltas)
                        # what arrived together goes out together (bounded: wire.MERGE_LIMIT)
                        for delta in wire.merge_deltas(deltas) if self._merge else deltas:
                            yield delta
                    if failure is not None:
                        raise failure
                    if done:
                        await _drain(raw)
                        return
                if not finished:
                    raise BackendUnavailable(
                        f"backend {self.name!r} closed the stream before it finished"
                        " (no finish reason, no [DONE])"
                    )
            finally:
                if account is not None:
                    account.close()
                _finish(http)
        except BackendError as exc:
            raise self._redacted(exc) from None
        except Exception as exc:
            self._raise(exc, request)

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "[redacted]") if self._secret else text

    def _redacted(self, exc: BackendError) -> BackendError:
        if self._secret and self._secret in exc.message:
            exc.message = self._redact(exc.message)
            exc.args = (exc.message,)
        return exc

    def _raise(self, exc: Exception, request: ChatRequest) -> NoReturn:
        """Translate one HTTP exception or status into the BackendError a caller can act on."""
        name = self.name
        if isinstance(exc, TimeoutError):  # aiohttp's socket timeouts are TimeoutErrors too
            raise BackendUnavailable(f"backend {name!r} did not answer in time") from None
        if isinstance(
            exc, aiohttp.ClientConnectorError | aiohttp.InvalidURL | aiohttp.ClientProxyConnectionError
        ):
            raise BackendUnavailable(f"cannot reach backend {name!r}: {_connection_problem(exc)}") from None
        if isinstance(exc, aiohttp.ClientError):  # read error, cut mid-body, protocol violation
            raise BackendUnavailable(f"backend {name!r} cut the response short") from None
        if isinstance(exc, _HTTPStatusError):
            status, message = exc.status_code, self._redact(_backend_message(exc.body))
            if status == 429:
                raise BackendUnavailable(
                    f"backend {name!r} is rate limiting (HTTP 429): {message}",
                    retry_after=_retry_after(exc.headers),
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
                f"backend {name!r} failed (HTTP {status}): {message}", retry_after=_retry_after(exc.headers)
            ) from None
        if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
            raise BackendProtocolError(f"backend {name!r} sent a body that is not valid JSON") from None
        raise exc
