"""OpenTelemetry spans: a stage span (child of the caller's traceparent) with phase,
backend-call and tool-call spans below it; nothing at all when tracing is off or
OpenTelemetry is not installed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc
from toolchain_service import tracing
from toolchain_service.transport.server import RunningServer, start_server

from tests.conftest import collect, kinds, make_settings, stage
from tests.fakes.openai_backend import (
    ErrorReply,
    FakeBackend,
    HangReply,
    JSONReply,
    SSEReply,
    completion,
    text_chunks,
    tool_call_chunks,
)

ROOT = Path(__file__).resolve().parent.parent
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"


@dataclass
class Traced:
    server: RunningServer
    stub: pb_grpc.ToolchainServiceAsyncStub
    exporter: InMemorySpanExporter
    fake: FakeBackend

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


async def start_traced(fake: FakeBackend, *, enabled: bool = True) -> tuple[Traced, grpc.aio.Channel]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = await start_server(make_settings(fake, tracing=enabled), tracer_provider=provider)
    channel = grpc.aio.insecure_channel(server.address)
    return Traced(server, pb_grpc.ToolchainServiceStub(channel), exporter, fake), channel


@pytest_asyncio.fixture
async def traced(fake: FakeBackend) -> AsyncIterator[Traced]:
    t, channel = await start_traced(fake)
    yield t
    await channel.close(None)
    await t.server.stop(0)
    assert not tracing.enabled()


def by_name(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = by_name(spans, name)
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    value: int = span.context.span_id
    return value


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_a_stage_makes_a_span_tree_of_phases_backend_calls_and_tool_calls(traced: Traced) -> None:
    traced.fake.script(
        SSEReply(tool_call_chunks([("calculator", {"expression": "2+3"})], usage=(20, 8))),
        SSEReply(text_chunks("It is 5.", usage=(30, 4))),
    )
    request = pb.StreamSynthesisRequest(stage=stage(stage_id="traced-1"))
    events, code = await collect(
        traced.stub.StreamSynthesis(request, metadata=(("traceparent", TRACEPARENT),))
    )
    assert code == grpc.StatusCode.OK and kinds(events)[-1] == "done"

    spans = traced.spans()
    root = one(spans, "toolchain.v1.ToolchainService/StreamSynthesis")
    tool_phase, synthesis_phase = one(spans, "tool_phase"), one(spans, "synthesis_phase")
    tool_chat, synthesis_chat = by_name(spans, "chat fake-model")
    tool_call = one(spans, "execute_tool calculator")
    assert len(spans) == 6

    assert root.kind == SpanKind.SERVER
    assert root.context is not None and root.context.trace_id == TRACE_ID
    assert parent_of(root) == PARENT_ID  # the caller's traceparent
    assert all(s.context is not None and s.context.trace_id == TRACE_ID for s in spans)
    assert parent_of(tool_phase) == parent_of(synthesis_phase) == span_id(root)
    assert parent_of(tool_chat) == parent_of(tool_call) == span_id(tool_phase)
    assert parent_of(synthesis_chat) == span_id(synthesis_phase)

    assert attrs(root)["rpc.system"] == "grpc" and attrs(root)["rpc.method"] == "StreamSynthesis"
    assert attrs(root)["toolchain.stage_id"] == "traced-1" and attrs(root)["toolchain.outcome"] == "ok"
    assert attrs(root)["toolchain.backend"] == "fake"
    assert tool_chat.kind == SpanKind.CLIENT
    assert attrs(tool_chat)["gen_ai.request.model"] == "fake-model"
    assert attrs(tool_chat)["toolchain.attempt"] == 0
    assert attrs(tool_phase)["gen_ai.usage.input_tokens"] == 20
    assert attrs(synthesis_phase)["gen_ai.usage.output_tokens"] == 4
    assert attrs(tool_call)["gen_ai.tool.name"] == "calculator"
    assert attrs(tool_call)["toolchain.tool.outcome"] == "ok"
    assert all(s.status.status_code != StatusCode.ERROR for s in spans)
    assert root.end_time is not None and tool_phase.end_time is not None
    assert root.start_time is not None and tool_phase.start_time is not None
    assert root.start_time <= tool_phase.start_time and tool_phase.end_time <= root.end_time


async def test_without_a_traceparent_the_stage_span_starts_a_new_trace(traced: Traced) -> None:
    traced.fake.script(JSONReply(completion(content="no tools needed")))
    await traced.stub.RunTools(pb.RunToolsRequest(stage=stage()))
    spans = traced.spans()
    root = one(spans, "toolchain.v1.ToolchainService/RunTools")
    assert root.parent is None
    assert {s.name for s in spans} == {root.name, "tool_phase", "chat fake-model"}


async def test_a_failed_stage_marks_its_spans_with_the_error(traced: Traced) -> None:
    traced.fake.script(ErrorReply(503, "overloaded"))
    with pytest.raises(grpc.aio.AioRpcError):
        await traced.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage()))
    spans = traced.spans()
    root = one(spans, "toolchain.v1.ToolchainService/RunSynthesis")
    chat = one(spans, "chat fake-model")
    assert root.status.status_code == StatusCode.ERROR
    assert attrs(root)["toolchain.outcome"] == "error"
    assert attrs(root)["toolchain.reason"] == "BACKEND_UNAVAILABLE"
    assert chat.status.status_code == StatusCode.ERROR
    assert attrs(chat)["error.type"] == "BACKEND_UNAVAILABLE"
    assert one(spans, "tool_phase").status.status_code == StatusCode.ERROR


async def test_a_cancelled_stage_still_ends_every_span(traced: Traced) -> None:
    traced.fake.script(HangReply())
    call = traced.stub.StreamTools(pb.StreamToolsRequest(stage=stage(stage_id="to-cancel")))
    await traced.fake.wait_requests(1)
    await traced.stub.CancelStage(pb.CancelStageRequest(stage_id="to-cancel"))
    _, code = await collect(call)
    assert code == grpc.StatusCode.CANCELLED
    await traced.fake.wait_disconnect(5.0)
    spans = traced.spans()
    names = sorted(s.name for s in spans if s.name != "toolchain.v1.ToolchainService/CancelStage")
    assert names == ["chat fake-model", "tool_phase", "toolchain.v1.ToolchainService/StreamTools"]
    root = one(spans, "toolchain.v1.ToolchainService/StreamTools")
    assert attrs(root)["toolchain.outcome"] == "cancelled"
    assert attrs(root)["toolchain.cancel_reason"] == "CANCEL_STAGE"
    assert attrs(one(spans, "chat fake-model"))["toolchain.cancelled"] is True


async def test_a_stage_rejected_at_the_door_gets_an_error_span(traced: Traced) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await traced.stub.RunTools(pb.RunToolsRequest(stage=stage("")))
    (root,) = traced.spans()
    assert root.name == "toolchain.v1.ToolchainService/RunTools"
    assert root.status.status_code == StatusCode.ERROR
    assert attrs(root)["toolchain.code"] == "INVALID_ARGUMENT"


async def test_no_spans_while_tracing_is_off(fake: FakeBackend) -> None:
    t, channel = await start_traced(fake, enabled=False)
    try:
        assert not tracing.enabled()
        fake.script(JSONReply(completion(content="quiet")))
        await t.stub.RunTools(pb.RunToolsRequest(stage=stage()), metadata=(("traceparent", TRACEPARENT),))
        assert t.spans() == []
    finally:
        await channel.close(None)
        await t.server.stop(0)


NO_OTEL_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys

    for name in [n for n in sys.modules if n.startswith("opentelemetry")]:
        del sys.modules[name]
    sys.modules["opentelemetry"] = None  # as if the otel extra were not installed

    from toolchain_proto.v1 import toolchain_pb2 as pb
    from toolchain_service import tracing
    from toolchain_service.config import ConfigError, load_settings

    from tests.conftest import stage, start_harness, stop_harness
    from tests.fakes.openai_backend import FakeBackend, JSONReply, call, completion

    assert not tracing.AVAILABLE and not tracing.enabled()
    with tracing.span("anything", {"a": 1}) as span:
        span.set_attribute("b", 2)
        assert not span.is_recording()
    assert tracing.start_stage("RunTools", tuple) is None
    try:
        tracing.enable()
    except RuntimeError as exc:
        assert "toolchain-grpc[otel]" in str(exc)
    else:
        raise AssertionError("enable() without OpenTelemetry")
    try:
        load_settings(tracing=True)
    except ConfigError as exc:
        assert "tracing: needs OpenTelemetry" in str(exc), exc
    else:
        raise AssertionError("tracing=true without OpenTelemetry")

    async def main() -> None:
        async with FakeBackend() as fake:
            h = await start_harness(fake)
            try:
                fake.script(
                    JSONReply(completion(tool_calls=[call("calculator", {"expression": "2+3"})])),
                    JSONReply(completion(content="It is 5.")),
                )
                response = await h.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage()))
                assert response.text == "It is 5.", response
            finally:
                await stop_harness(h)

    asyncio.run(main())
    assert not any(m is not None for n, m in sys.modules.items() if n.startswith("opentelemetry"))
    print("no-op ok")
    """
)


async def test_without_opentelemetry_installed_tracing_is_a_no_op() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLCHAIN_")}
    env["PYTHONPATH"] = str(ROOT)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        NO_OTEL_SCRIPT,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == "no-op ok"
