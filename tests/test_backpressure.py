"""A caller that does not read holds its stage back: the service stops reading that
stage's backend stream (the fake backend's writes stop), and a reader that stays stalled
past `stream_stall_seconds` ends its stream with RESOURCE_EXHAUSTED (READER_STALLED) and
the backend request closed. Deltas that arrive together go out as one chunk, unless the
backend is configured for one chunk per delta.

The client channels turn HTTP/2 BDP probing off, so their receive window stays at its
initial size instead of growing to megabytes: otherwise the client library itself would
absorb the whole answer and nothing would reach the server to push back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from tests.conftest import Harness, collect, detail, rich_status, stage, start_harness, stop_harness
from tests.fakes.openai_backend import FakeBackend, SSEReply, text_chunks

pytestmark = pytest.mark.timeout(120)

#: A long answer: 15 MB of text in 3,000 deltas, far more than the windows and the (loopback)
#: socket buffers between.
PIECES = 3000
TEXT = "abcdefghi " * 1_500_000
SMALL_WINDOW = (("grpc.http2.bdp_probe", 0),)


def long_answer(delay: float) -> SSEReply:
    return SSEReply(text_chunks(TEXT, pieces=PIECES), delay=delay)


@pytest_asyncio.fixture
async def stalls(fake: FakeBackend) -> AsyncIterator[Harness]:
    h = await start_harness(
        fake,
        stream_stall_seconds=1.0,
        backend={"max_response_bytes": 64 << 20, "read_timeout": 60.0, "merge_deltas": True},
    )
    yield h
    await stop_harness(h)


async def frames_settle(fake: FakeBackend, quiet: float = 0.5, timeout: float = 30.0) -> int:
    """Wait until the backend's frame count stops growing for `quiet` seconds."""
    async with asyncio.timeout(timeout):
        last = -1
        while fake.frames_sent != last:
            last = fake.frames_sent
            await asyncio.sleep(quiet)  # quiet for a while is what "stopped" means here
    return last


async def test_a_reader_that_stops_reading_stops_the_backend_and_is_cut_after_the_stall_limit(
    stalls: Harness, fake: FakeBackend
) -> None:
    fake.script(long_answer(delay=0.00001))
    channel = grpc.aio.insecure_channel(stalls.server.address, options=SMALL_WINDOW)
    try:
        stub = pb_grpc.ToolchainServiceStub(channel)
        call = stub.StreamTools(pb.StreamToolsRequest(stage=stage("tell me a long story")), timeout=60)
        first = await call.read()
        assert first is not grpc.aio.EOF  # type: ignore[attr-defined]
        # The caller reads no more: the backend is held back well before the end...
        held = await frames_settle(fake)
        assert 0 < held < PIECES / 2, f"the backend sent {held} of {PIECES} deltas to a reader that stopped"
        # ...and past stream_stall_seconds the stage ends and its backend request is closed.
        await fake.wait_disconnect(30.0)
        events, code = await collect(call)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert all(e.WhichOneof("event") == "chunk" for e in events)  # no terminal event can pass
    finally:
        await channel.close(None)


async def test_the_stalled_status_says_why_with_error_info(stalls: Harness, fake: FakeBackend) -> None:
    fake.script(long_answer(delay=0.00001))
    channel = grpc.aio.insecure_channel(stalls.server.address, options=SMALL_WINDOW)
    try:
        stub = pb_grpc.ToolchainServiceStub(channel)
        call = stub.StreamTools(pb.StreamToolsRequest(stage=stage("tell me a long story")), timeout=60)
        await call.read()
        await fake.wait_disconnect(30.0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = detail(rich_status(caught.value), error_details_pb2.ErrorInfo)
        assert info.reason == "READER_STALLED"
        assert "stream_stall_seconds" in (caught.value.details() or "")
    finally:
        await channel.close(None)


async def test_a_slow_reader_that_keeps_reading_gets_the_whole_answer_in_fewer_chunks(
    stalls: Harness, fake: FakeBackend
) -> None:
    fake.script(SSEReply(text_chunks(" ".join(["word"] * 2000))))  # one burst
    channel = grpc.aio.insecure_channel(stalls.server.address, options=SMALL_WINDOW)
    try:
        stub = pb_grpc.ToolchainServiceStub(channel)
        events, code = await collect(
            stub.StreamTools(pb.StreamToolsRequest(stage=stage("story")), timeout=60)
        )
        assert code == grpc.StatusCode.OK
        chunks = [e.chunk.content for e in events if e.WhichOneof("event") == "chunk"]
        assert "".join(chunks) == events[-1].done.text == " ".join(["word"] * 2000)
        assert len(chunks) < 2000 / 4  # deltas that arrived together went out together
    finally:
        await channel.close(None)


@pytest.mark.parametrize("merge", ["default", "off"])
async def test_a_burst_goes_out_merged_by_default_and_one_chunk_per_delta_when_off(
    fake: FakeBackend, merge: str
) -> None:
    h = await start_harness(fake, **({"backend": {"merge_deltas": False}} if merge == "off" else {}))
    try:
        fake.script(SSEReply(text_chunks(" ".join(["word"] * 300))))  # one burst
        events, code = await collect(
            h.stub.StreamTools(pb.StreamToolsRequest(stage=stage("story")), timeout=60)
        )
        assert code == grpc.StatusCode.OK
        chunks = [e.chunk.content for e in events if e.WhichOneof("event") == "chunk" and e.chunk.content]
        assert "".join(chunks) == " ".join(["word"] * 300)
        if merge == "off":
            assert len(chunks) == 300
        else:  # deltas that arrived together: fewer, fuller chunks
            assert len(chunks) < 300 / 4
    finally:
        await stop_harness(h)
