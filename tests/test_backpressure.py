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
from tests.test_metrics import sample, scrape

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


@pytest.mark.parametrize("cap", ["capped", "uncapped"])
async def test_at_the_buffer_cap_stalled_readers_are_cut_early_and_reading_streams_go_on(
    fake: FakeBackend, cap: str
) -> None:
    """max_buffered_bytes: what a stalled reader's stage has read and not yet written counts
    against one cap for all stages. At the cap (here 1 byte: any held chunk fills it) a
    reading stream gets no more of its answer, and a stream whose reader has left an event
    unread for a second counts as stalled (stream_stall_seconds is 60 s here): it is cut,
    gives its share back, and the reading stream completes. Without the cap the reading
    stream completes at once and the stalled one goes on."""
    h = await start_harness(
        fake,
        stream_stall_seconds=60.0,
        max_buffered_bytes=1 if cap == "capped" else 0,
        metrics_address="127.0.0.1:0",
        backend={"max_response_bytes": 64 << 20, "read_timeout": 60.0},
    )
    assert h.server.metrics is not None
    metrics = h.server.metrics.url
    words = " ".join(["word"] * 50)
    fake.script(long_answer(delay=0.00001), SSEReply(text_chunks(words, pieces=10), delay=0.001))
    stalled_channel = grpc.aio.insecure_channel(h.server.address, options=SMALL_WINDOW)
    ended: list[str] = []
    try:
        stalled = pb_grpc.ToolchainServiceStub(stalled_channel).StreamTools(
            pb.StreamToolsRequest(stage=stage("a long story")), timeout=60
        )
        assert await stalled.read() is not grpc.aio.EOF  # type: ignore[attr-defined]
        await frames_settle(fake)  # its stage now holds what it read and cannot write
        held = sample(await scrape(metrics), "toolchain_buffered_bytes", {})
        assert held is not None and held > 0  # what the stalled stage read and could not write

        async def stalled_cut() -> None:
            await fake.wait_disconnect(30.0)  # the service closed the stalled stage's backend request
            ended.append("stalled")

        async def reader() -> tuple[list[pb.StageEvent], grpc.StatusCode]:
            call = h.stub.StreamTools(pb.StreamToolsRequest(stage=stage("short")), timeout=60)
            result = await collect(call)
            ended.append("reader")
            return result

        if cap == "capped":
            _, (events, code) = await asyncio.gather(stalled_cut(), reader())
            assert ended == ["stalled", "reader"]  # the reader's answer waited for the cut
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while (response := await stalled.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                    assert isinstance(response, pb.StreamToolsResponse)
                    assert response.event.WhichOneof("event") == "chunk"  # no terminal event can pass
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert detail(rich_status(caught.value), error_details_pb2.ErrorInfo).reason == "READER_STALLED"
            assert "max_buffered_bytes" in (caught.value.details() or "")
        else:
            events, code = await reader()
            assert not stalled.done() and fake.disconnects == 0  # the stalled stream goes on
            stalled.cancel()
            await fake.wait_disconnect(30.0)
        assert code == grpc.StatusCode.OK
        assert events[-1].done.text == words
        assert "".join(e.chunk.content for e in events if e.WhichOneof("event") == "chunk") == words
        held = sample(await scrape(metrics), "toolchain_buffered_bytes", {})
        assert held == 0  # every stage gave back what it held
    finally:
        await stalled_channel.close(None)
        await stop_harness(h)


async def test_the_read_buffer_sets_how_much_a_stalled_stage_reads_before_its_backend_is_held(
    fake: FakeBackend,
) -> None:
    """backends.<name>.read_buffer_bytes: the HTTP client stops reading the socket of a
    stage whose caller does not read once about twice this is unread, so a small buffer
    holds the backend back sooner than a large one."""
    held: dict[int, int] = {}
    for size in (4 << 10, 2 << 20):
        h = await start_harness(
            fake,
            stream_stall_seconds=30.0,
            backend={"max_response_bytes": 64 << 20, "read_timeout": 60.0, "read_buffer_bytes": size},
        )
        channel = grpc.aio.insecure_channel(h.server.address, options=SMALL_WINDOW)
        try:
            fake.script(long_answer(delay=0.00001))
            call = pb_grpc.ToolchainServiceStub(channel).StreamTools(
                pb.StreamToolsRequest(stage=stage("a long story")), timeout=60
            )
            assert await call.read() is not grpc.aio.EOF  # type: ignore[attr-defined]
            before = fake.frames_sent
            held[size] = await frames_settle(fake) - before
            call.cancel()
            await fake.wait_disconnect(30.0)
        finally:
            await channel.close(None)
            await stop_harness(h)
    frame = len(TEXT) // PIECES  # text bytes per delta; a frame is a little more
    assert held[4 << 10] < PIECES / 2
    # the large buffer took in at least ~1.5 MiB more of the answer before the backend was held
    assert held[2 << 20] - held[4 << 10] > (3 << 19) // (frame * 2), held
