"""LocalModelBackend on its own (no gRPC): the embedded model behind its llama-server child.

Streaming, the bounded queue for sequence slots, timeouts and closing a stream, asserted on
what the backend's caller (the runner) sees, and on llama-server's own /slots."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
import pytest_asyncio
from toolchain_service.backends.base import ChatRequest, ModelDelta
from toolchain_service.backends.local_model import LocalModelBackend
from toolchain_service.config import BackendSettings
from toolchain_service.errors import BackendUnavailable

from tests.model_support import wait_slots_idle

pytestmark = [pytest.mark.model]

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[LocalModelBackend]:
    local = LocalModelBackend("local", BackendSettings(kind="local", parallel=1, max_retries=0))
    await local.start()
    try:
        yield local
    finally:
        await local.aclose()
    exit_ = local.process.last_exit
    assert exit_ is not None and exit_.returncode == 0, exit_
    assert local.process.restarts == 0, f"the model process {exit_.how} during the test"


def _request(max_tokens: int = 48, timeout: float | None = None) -> ChatRequest:
    return ChatRequest(model="", messages=STORY, max_tokens=max_tokens, temperature=0.0, timeout=timeout)


async def _drain(backend: LocalModelBackend, request: ChatRequest) -> list[ModelDelta]:
    async with aclosing(backend.stream(request)) as deltas:
        return [delta async for delta in deltas]


async def test_a_stream_delivers_the_text_in_pieces_and_ends_with_usage(backend: LocalModelBackend) -> None:
    deltas = await _drain(backend, _request(max_tokens=24))
    pieces = [d.content for d in deltas if d.content]
    assert len(pieces) >= 5
    final = [d for d in deltas if d.finish_reason]
    assert final and final[-1].finish_reason in ("stop", "length")
    usage = next(d.usage for d in reversed(deltas) if d.usage is not None)
    assert usage.completion_tokens <= 24 and usage.prompt_tokens > 0


async def test_requests_beyond_the_slots_wait_in_the_queue(backend: LocalModelBackend) -> None:
    first = asyncio.create_task(_drain(backend, _request(max_tokens=64)))
    async with asyncio.timeout(30):
        while backend.active_requests() < 1:  # noqa: ASYNC110 - backend state
            await asyncio.sleep(0.01)
    second = asyncio.create_task(_drain(backend, _request(max_tokens=8)))
    async with asyncio.timeout(30):
        while backend.queue_depth() < 1:  # noqa: ASYNC110 - backend state
            await asyncio.sleep(0.01)
    assert backend.active_requests() == 1  # parallel=1: one runs, one waits
    await asyncio.gather(first, second)
    assert backend.queue_depth() == 0 and backend.active_requests() == 0
    assert backend.requests_started == 2
    assert backend.max_queue_wait > 0


async def test_closing_a_stream_stops_generation(backend: LocalModelBackend) -> None:
    async with aclosing(backend.stream(_request(max_tokens=400))) as deltas:
        async for delta in deltas:
            if delta.content:
                break
    await wait_slots_idle(backend)
    assert backend.active_requests() == 0


async def test_a_request_past_its_timeout_fails_as_unavailable(backend: LocalModelBackend) -> None:
    with pytest.raises(BackendUnavailable, match=r"in time|did not finish"):
        await _drain(backend, _request(max_tokens=400, timeout=0.3))
    await wait_slots_idle(backend)
