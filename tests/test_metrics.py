"""Prometheus metrics on their own HTTP port, read with a real HTTP GET."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncGenerator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_service.backends.base import (
    BackendInfo,
    Capabilities,
    ChatBackend,
    ChatRequest,
    Completion,
    ModelDelta,
    RetryPolicy,
)
from toolchain_service.backends.registry import BackendRegistry
from toolchain_service.observe import Metrics
from toolchain_service.transport.server import start_server

from tests.conftest import collect, kinds, make_settings, stage, start_harness, stop_harness
from tests.fakes.openai_backend import (
    ErrorReply,
    FakeBackend,
    JSONReply,
    SSEReply,
    call,
    completion,
    text_chunks,
    tool_call_chunks,
)


async def scrape(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            body: bytes = response.read()
            return body.decode()

    return await asyncio.to_thread(get)


def sample(text: str, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


async def test_metrics_endpoint_counts_a_finished_stream_synthesis_stage(fake: FakeBackend) -> None:
    h = await start_harness(fake, metrics_address="127.0.0.1:0")
    try:
        assert h.server.metrics is not None
        fake.script(
            SSEReply(tool_call_chunks([("calculator", {"expression": "2+3"})], usage=(20, 8))),
            SSEReply(text_chunks("It is 5.", usage=(30, 4))),
        )
        events, _ = await collect(h.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage())))
        assert kinds(events)[-1] == "done"

        text = await scrape(h.server.metrics.url)
        assert 'toolchain_stages_total{outcome="ok",rpc="StreamSynthesis"} 1.0' in text
        assert sample(text, "toolchain_tool_calls_total", {"tool": "calculator", "outcome": "ok"}) == 1.0
        assert sample(text, "toolchain_tokens_total", {"phase": "tool", "kind": "prompt"}) == 20.0
        assert sample(text, "toolchain_tokens_total", {"phase": "synthesis", "kind": "completion"}) == 4.0
        assert sample(text, "toolchain_phase_seconds_count", {"phase": "synthesis"}) == 1.0
        assert sample(text, "toolchain_first_event_seconds_count", {"rpc": "StreamSynthesis"}) == 1.0
        assert sample(text, "toolchain_active_stages", {"rpc": "StreamSynthesis"}) == 0.0
    finally:
        await stop_harness(h)


async def test_failed_stages_are_counted_by_reason_and_backend_errors_by_kind(fake: FakeBackend) -> None:
    h = await start_harness(fake, metrics_address="127.0.0.1:0")
    try:
        assert h.server.metrics is not None
        fake.script(ErrorReply(503, "down for maintenance"))
        events, _ = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage())))
        assert kinds(events) == ["error"]
        fake.script(JSONReply(completion(tool_calls=[call("nope", {})])))
        await h.stub.RunTools(pb.RunToolsRequest(stage=stage()))

        text = await scrape(h.server.metrics.url)
        assert sample(text, "toolchain_stages_total", {"rpc": "StreamTools", "outcome": "error"}) == 1.0
        assert sample(text, "toolchain_stage_errors_total", {"reason": "BACKEND_UNAVAILABLE"}) == 1.0
        labels = {"backend": "fake", "kind": "BACKEND_UNAVAILABLE"}
        assert sample(text, "toolchain_backend_errors_total", labels) == 1.0
        labels = {"tool": "(unknown)", "outcome": "unknown_tool"}
        assert sample(text, "toolchain_tool_calls_total", labels) == 1.0
    finally:
        await stop_harness(h)


async def test_the_metrics_port_closes_when_the_server_stops(fake: FakeBackend) -> None:
    h = await start_harness(fake, metrics_address="127.0.0.1:0")
    assert h.server.metrics is not None
    url = h.server.metrics.url
    assert "toolchain_active_stages" in await scrape(url)
    await stop_harness(h)
    assert h.server.metrics is None
    with pytest.raises(urllib.error.URLError):
        await scrape(url)


async def test_no_metrics_port_unless_configured(fake: FakeBackend) -> None:
    h = await start_harness(fake)
    try:
        assert h.server.metrics is None
    finally:
        await stop_harness(h)


class QueuedBackend(ChatBackend):
    """Keeps queue statistics the way LocalModelBackend does."""

    def __init__(self) -> None:
        super().__init__(BackendInfo("llama", "local", "m"), Capabilities(), RetryPolicy())
        self.requests_started = 4
        self.max_queue_wait = 0.75
        self._waited = 1.5

    @property
    def mean_queue_wait(self) -> float:
        return self._waited / self.requests_started

    def queue_depth(self) -> int:
        return 2

    def active_requests(self) -> int:
        return 3

    @property
    def restarts(self) -> int:
        return 1

    async def complete(self, request: ChatRequest) -> Completion:
        raise AssertionError("not called")

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ModelDelta, None]:
        raise AssertionError("not called")
        yield ModelDelta()  # pragma: no cover


async def test_local_model_queue_wait_is_exported(fake: FakeBackend) -> None:
    settings = make_settings(fake, metrics_address="127.0.0.1:0")
    backends = BackendRegistry({"fake": QueuedBackend()}, "fake")
    server = await start_server(settings, backends=backends)
    try:
        assert server.metrics is not None
        text = await scrape(server.metrics.url)
        assert sample(text, "toolchain_local_queue_wait_seconds_count", {"backend": "llama"}) == 4.0
        assert sample(text, "toolchain_local_queue_wait_seconds_sum", {"backend": "llama"}) == 1.5
        assert sample(text, "toolchain_local_queue_wait_max_seconds", {"backend": "llama"}) == 0.75
        assert sample(text, "toolchain_local_queue_depth", {"backend": "llama"}) == 2.0
        assert sample(text, "toolchain_local_active_requests", {"backend": "llama"}) == 3.0
        assert sample(text, "toolchain_local_model_restarts_total", {"backend": "llama"}) == 1.0
    finally:
        await server.stop(0)


def test_backends_without_a_queue_add_no_queue_metrics() -> None:
    metrics = Metrics()
    metrics.watch_queues([object()])
    names = {family.name for family in metrics.registry.collect()}
    assert "toolchain_local_queue_depth" not in names


def test_the_local_model_backend_offers_the_queue_statistics() -> None:
    from toolchain_service.backends.local_model import LocalModelBackend
    from toolchain_service.config import BackendSettings
    from toolchain_service.observe import QueueStats

    assert isinstance(LocalModelBackend("local", BackendSettings(kind="local")), QueueStats)
