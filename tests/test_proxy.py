"""The OpenAI-compatible backend honours HTTP_PROXY / HTTPS_PROXY and NO_PROXY, as other
HTTP clients do, read once when its connection pool is made. The proxy here is the fake
backend itself: a request for an absolute URL of a host that does not exist reaches it
only through the proxy."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from toolchain_proto.v1 import toolchain_pb2 as pb

from tests.conftest import collect, kinds, stage, start_harness, stop_harness
from tests.fakes.openai_backend import FakeBackend, JSONReply, SSEReply, completion, text_chunks

#: No resolver knows this host (RFC 2606): only a proxy can carry a request to it.
NOWHERE = "http://model-server.invalid:8080/v1"
PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def test_backend_requests_go_through_the_proxy_the_environment_names(
    fake: FakeBackend, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    clean_proxy_env.setenv("HTTP_PROXY", f"http://user:secret@127.0.0.1:{fake.port}")
    h = await start_harness(fake, backend={"base_url": NOWHERE})
    try:
        fake.script(
            JSONReply(completion(content="no tool needed")),
            SSEReply(text_chunks("through the proxy")),
        )
        response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage()), timeout=10)
        assert response.text == "no tool needed"
        events, code = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage()), timeout=10))
        assert code == grpc.StatusCode.OK and events[-1].done.text == "through the proxy"
        # what the proxy saw: the backend's host, and the proxy's own credentials (the
        # backend's key goes to the backend: a plain-HTTP request passes the proxy whole)
        assert all(headers["host"] == "model-server.invalid:8080" for headers in fake.headers)
        assert all(headers["proxy-authorization"].startswith("Basic ") for headers in fake.headers)
    finally:
        await stop_harness(h)


async def test_no_proxy_sends_the_backend_requests_direct(
    fake: FakeBackend, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    clean_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{fake.port}")
    clean_proxy_env.setenv("NO_PROXY", "model-server.invalid")
    h = await start_harness(fake, backend={"base_url": NOWHERE})
    try:
        events, code = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage()), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE  # straight to a host that does not exist
        assert kinds(events) == ["error"] and events[0].error.reason == "BACKEND_UNAVAILABLE"
        assert fake.request_count == 0
    finally:
        await stop_harness(h)


async def test_an_https_backend_is_reached_through_a_connect_tunnel_that_never_sees_its_key(
    fake: FakeBackend, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    """aiohttp puts a pool's default headers on the CONNECT request too: the backend's key
    must not be one of them. The proxy here records the CONNECT request and refuses it."""
    seen: list[bytes] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    proxy = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    clean_proxy_env.setenv("HTTPS_PROXY", f"http://user:secret@127.0.0.1:{port}")
    clean_proxy_env.setenv("BACKEND_KEY", "sk-the-backends-own-key")
    h = await start_harness(
        fake, backend={"base_url": "https://model-server.invalid/v1", "api_key_env": "BACKEND_KEY"}
    )
    try:
        events, code = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage()), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE and kinds(events) == ["error"]
        assert seen, "the backend request did not go to the proxy"
        connect = seen[0].decode()
        assert connect.startswith("CONNECT model-server.invalid:443 ")
        assert "Proxy-Authorization: Basic " in connect
        assert "sk-the-backends-own-key" not in connect
    finally:
        await stop_harness(h)
        proxy.close()
        await proxy.wait_closed()
