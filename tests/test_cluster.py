"""Replicas sharing a stage registry on a real Redis: CancelStage on any replica, a
cluster-wide stage id, ResumeStage after a dropped connection, the grace period, the log's
cap, a lost owner, ownership under auth, and Redis emptied after the stages end.

Two real servers (port 0, real channels) on one real redis-server and one fake backend."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from redis import asyncio as aioredis
from toolchain_client.aio import ToolchainClient
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc
from toolchain_service.config import AuthSettings, ClusterSettings, ConfigError
from toolchain_service.transport.server import RunningServer, start_server

from tests.conftest import Harness, collect, detail, kinds, make_settings, rich_status, stage
from tests.fakes.openai_backend import FakeBackend, HangReply, SSEReply, stage_handler, text_chunks
from tests.fakes.redis_server import RedisServer, free_port, start_redis
from tests.fakes.server_process import serve_env, start_serve

pytestmark = pytest.mark.timeout(120)

SLOW = stage_handler(chunks=40, chunk_delay=0.05)  # ~2 s of synthesis chunks


@pytest_asyncio.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = await start_redis()
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def rdb(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


class Replica:
    def __init__(self, server: RunningServer, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.server = server
        self.channel = grpc.aio.insecure_channel(server.address)
        self.stub = pb_grpc.ToolchainServiceStub(self.channel)
        self.metadata = metadata

    async def close(self) -> None:
        await self.channel.close(None)
        await self.server.stop(0)


async def start_replica(fake: FakeBackend, redis_url: str, name: str, **overrides: Any) -> Replica:
    cluster = {"redis_url": redis_url, "replica_id": name, "resume_grace_seconds": 10.0}
    cluster.update(overrides.pop("cluster", {}))
    settings = make_settings(fake, cluster=ClusterSettings(**cluster), **overrides)
    return Replica(await start_server(settings))


@pytest_asyncio.fixture
async def pair(fake: FakeBackend, redis_server: RedisServer) -> AsyncIterator[tuple[Replica, Replica]]:
    fake.handler = SLOW
    a = await start_replica(fake, redis_server.url, "replica-a")
    b = await start_replica(fake, redis_server.url, "replica-b")
    yield a, b
    await a.close()
    await b.close()


async def first_events(call: Any, count: int) -> list[pb.StageEvent]:
    events: list[pb.StageEvent] = []
    async with asyncio.timeout(30):
        while len(events) < count:
            response = await call.read()
            assert response is not grpc.aio.EOF, f"the stream ended after {kinds(events)}"  # type: ignore[attr-defined]
            events.append(response.event)
    return events


async def resumed(stub: pb_grpc.ToolchainServiceStub, stage_id: str, after: int | None, **kw: Any) -> Any:
    request = pb.ResumeStageRequest(stage_id=stage_id)
    if after is not None:
        request.after_sequence = after
    return stub.ResumeStage(request, timeout=60, **kw)


def reason_of(err: grpc.aio.AioRpcError) -> str:
    reason: str = detail(rich_status(err), error_details_pb2.ErrorInfo).reason
    return reason


# -- CancelStage on any replica --------------------------------------------------------


async def test_cancel_stage_on_another_replica_ends_the_stream_with_a_cancel_event(
    pair: tuple[Replica, Replica], fake: FakeBackend
) -> None:
    a, b = pair
    call = a.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id="far-1")), timeout=60)
    await first_events(call, 2)  # the stage is running on a
    await b.stub.CancelStage(pb.CancelStageRequest(stage_id="far-1"), timeout=10)
    events, code = await collect(call)
    assert code == grpc.StatusCode.CANCELLED
    assert kinds(events)[-1] == "cancel"
    assert events[-1].cancel.reason == pb.CANCEL_REASON_CANCEL_STAGE
    await fake.wait_disconnect(10.0)  # the backend request was closed on a


async def test_cancel_stage_reaches_a_unary_call_on_another_replica(
    pair: tuple[Replica, Replica], fake: FakeBackend
) -> None:
    a, b = pair
    fake.script(HangReply())  # the tool phase waits until the stage is cancelled
    call = a.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage(stage_id="far-unary")), timeout=60)
    async with asyncio.timeout(30):
        while a.server.stages.get("far-unary") is None:  # noqa: ASYNC110 - server state, no event
            await asyncio.sleep(0.01)
    await b.stub.CancelStage(pb.CancelStageRequest(stage_id="far-unary"), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    await fake.wait_disconnect(10.0)


async def test_cancel_stage_of_an_id_no_replica_runs_is_not_found(pair: tuple[Replica, Replica]) -> None:
    _, b = pair
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await b.stub.CancelStage(pb.CancelStageRequest(stage_id="nobody-runs-this"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(caught.value) == "NOT_FOUND"


async def test_a_running_stage_id_is_taken_on_every_replica(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    call = a.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id="taken")), timeout=60)
    await first_events(call, 1)
    events, code = await collect(
        b.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id="taken")), timeout=30)
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert kinds(events) == ["error"] and events[0].error.reason == "STAGE_ALREADY_RUNNING"
    await b.stub.CancelStage(pb.CancelStageRequest(stage_id="taken"), timeout=10)
    _, code = await collect(call)
    assert code == grpc.StatusCode.CANCELLED


# -- ResumeStage -----------------------------------------------------------------------


async def test_a_dropped_stream_resumes_on_another_replica_without_gap_or_repeat(
    pair: tuple[Replica, Replica], fake: FakeBackend
) -> None:
    a, b = pair
    call = a.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id="drop-1")), timeout=60)
    before = await first_events(call, 5)
    call.cancel()  # the connection "drops": the server sees the call go away
    after_events, code = await collect(await resumed(b.stub, "drop-1", before[-1].sequence))
    assert code == grpc.StatusCode.OK
    events = before + after_events
    assert [e.sequence for e in events] == list(range(len(events)))
    assert kinds(events).count("done") == 1 and kinds(events)[-1] == "done"
    assert kinds(events).count("tool_summary") == 1
    assert all(e.stage_id == "drop-1" for e in events)
    synthesis = [e.chunk.content for e in events if e.chunk.phase == pb.PHASE_SYNTHESIS and e.chunk.content]
    assert len(synthesis) == 40 and "".join(synthesis) == events[-1].done.text  # no chunk lost
    assert fake.disconnects == 0  # the backend stream was never cut


async def test_resume_from_the_start_replays_every_event_of_a_finished_stage(
    pair: tuple[Replica, Replica],
) -> None:
    a, b = pair
    original, code = await collect(
        a.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id="replay")), timeout=60)
    )
    assert code == grpc.StatusCode.OK
    replayed, code = await collect(await resumed(b.stub, "replay", None))
    assert code == grpc.StatusCode.OK
    # deterministic: a Struct (a map) may serialize its keys in any order otherwise
    assert [e.SerializeToString(deterministic=True) for e in replayed] == [
        e.SerializeToString(deterministic=True) for e in original
    ]


async def test_a_dropped_stream_with_no_resume_ends_with_cancel_disconnected(
    fake: FakeBackend, redis_server: RedisServer
) -> None:
    fake.handler = SLOW
    a = await start_replica(fake, redis_server.url, "grace-a", cluster={"resume_grace_seconds": 0.2})
    try:
        call = a.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id="gone")), timeout=60)
        before = await first_events(call, 3)
        call.cancel()
        async with asyncio.timeout(20):  # the grace period ends and the stage is cancelled
            while a.server.stages.get("gone") is not None:  # noqa: ASYNC110 - server state, no event
                await asyncio.sleep(0.02)
        events, code = await collect(await resumed(a.stub, "gone", before[-1].sequence))
        assert code == grpc.StatusCode.CANCELLED
        assert kinds(events)[-1] == "cancel"
        assert events[-1].cancel.reason == pb.CANCEL_REASON_DISCONNECTED
        assert [e.sequence for e in before + events] == list(range(len(before) + len(events)))
    finally:
        await a.close()


async def test_resume_past_the_log_cap_is_out_of_range(fake: FakeBackend, redis_server: RedisServer) -> None:
    fake.handler = stage_handler(chunks=60)
    a = await start_replica(
        fake, redis_server.url, "cap-a", cluster={"event_log_max_events": 16}, backend={"merge_deltas": False}
    )
    try:
        original, code = await collect(
            a.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id="capped")), timeout=60)
        )
        assert code == grpc.StatusCode.OK and len(original) > 16
        events, code = await collect(await resumed(a.stub, "capped", 0))
        assert code == grpc.StatusCode.OUT_OF_RANGE
        assert kinds(events) == ["error"]
        assert events[0].error.reason == "RESUME_EVENTS_DROPPED" and events[0].sequence == 1
        # the last 16 are still there
        tail, code = await collect(await resumed(a.stub, "capped", len(original) - 17))
        assert code == grpc.StatusCode.OK and len(tail) == 16
    finally:
        await a.close()


async def test_resume_of_an_unknown_stage_is_not_found(pair: tuple[Replica, Replica]) -> None:
    _, b = pair
    events, code = await collect(await resumed(b.stub, "never-ran", None))
    assert code == grpc.StatusCode.NOT_FOUND
    assert kinds(events) == ["error"] and events[0].error.reason == "NOT_FOUND"


async def test_resume_without_a_registry_is_failed_precondition(h: Harness) -> None:
    events, code = await collect(await resumed(h.stub, "any", None))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert kinds(events) == ["error"] and events[0].error.reason == "RESUME_NOT_CONFIGURED"


async def test_resume_of_a_stage_whose_replica_was_killed_ends_with_owner_lost(
    fake: FakeBackend, redis_server: RedisServer
) -> None:
    fake.handler = SLOW
    doomed = await start_serve(
        serve_env(
            fake,
            cluster__redis_url=redis_server.url,
            cluster__replica_id="doomed",
            cluster__heartbeat_seconds="0.2",
        )
    )
    b = await start_replica(fake, redis_server.url, "survivor", cluster={"heartbeat_seconds": 0.2})
    channel = grpc.aio.insecure_channel(doomed.address)
    try:
        stub = pb_grpc.ToolchainServiceStub(channel)
        call = stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id="orphan")), timeout=60)
        before = await first_events(call, 3)
        resume = await resumed(b.stub, "orphan", before[-1].sequence)
        doomed.process.send_signal(signal.SIGKILL)
        assert await doomed.wait(20) == -signal.SIGKILL
        events, code = await collect(resume)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert kinds(events)[-1] == "error" and events[-1].error.reason == "STAGE_OWNER_LOST"
        assert events[-1].error.retryable
        sequences = [e.sequence for e in before + events]
        assert sequences == list(range(len(sequences)))
    finally:
        await channel.close(None)
        await doomed.close()
        await b.close()


# -- ownership -------------------------------------------------------------------------


async def test_with_auth_only_the_principal_that_started_a_stage_may_cancel_or_resume_it(
    fake: FakeBackend, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKEN_ALICE", "alice-secret")
    monkeypatch.setenv("TOKEN_BOB", "bob-secret")
    fake.handler = SLOW
    auth = AuthSettings(bearer_env_vars=("TOKEN_ALICE", "TOKEN_BOB"))
    a = await start_replica(fake, redis_server.url, "auth-a", auth=auth)
    b = await start_replica(fake, redis_server.url, "auth-b", auth=auth)
    alice = (("authorization", "Bearer alice-secret"),)
    bob = (("authorization", "Bearer bob-secret"),)
    try:
        request = pb.StreamSynthesisRequest(stage=stage(stage_id="alices"))
        call = a.stub.StreamSynthesis(request, timeout=60, metadata=alice)
        await first_events(call, 2)
        for replica in (a, b):
            for stage_id in ("alices", "no-such-stage"):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await replica.stub.CancelStage(
                        pb.CancelStageRequest(stage_id=stage_id), timeout=10, metadata=bob
                    )
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert reason_of(caught.value) == "STAGE_NOT_OWNED"
            events, code = await collect(await resumed(replica.stub, "alices", None, metadata=bob))
            assert code == grpc.StatusCode.PERMISSION_DENIED and kinds(events) == ["error"]
        await b.stub.CancelStage(pb.CancelStageRequest(stage_id="alices"), timeout=10, metadata=alice)
        events, code = await collect(call)
        assert code == grpc.StatusCode.CANCELLED and events[-1].cancel.reason == pb.CANCEL_REASON_CANCEL_STAGE
    finally:
        await a.close()
        await b.close()


async def test_ownership_holds_without_a_registry_too(
    fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKEN_ALICE", "alice-secret")
    monkeypatch.setenv("TOKEN_BOB", "bob-secret")
    fake.handler = SLOW
    settings = make_settings(fake, auth=AuthSettings(bearer_env_vars=("TOKEN_ALICE", "TOKEN_BOB")))
    replica = Replica(await start_server(settings))
    alice = (("authorization", "Bearer alice-secret"),)
    try:
        call = replica.stub.StreamSynthesis(
            pb.StreamSynthesisRequest(stage=stage(stage_id="mine")), timeout=60, metadata=alice
        )
        await first_events(call, 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await replica.stub.CancelStage(
                pb.CancelStageRequest(stage_id="mine"),
                timeout=10,
                metadata=(("authorization", "Bearer bob-secret"),),
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await replica.stub.CancelStage(pb.CancelStageRequest(stage_id="mine"), timeout=10, metadata=alice)
        _, code = await collect(call)
        assert code == grpc.StatusCode.CANCELLED
    finally:
        await replica.close()


# -- Redis itself ----------------------------------------------------------------------


async def test_redis_holds_nothing_of_a_stage_once_its_log_expired(
    fake: FakeBackend, redis_server: RedisServer, rdb: aioredis.Redis
) -> None:
    fake.handler = stage_handler(chunks=5)
    a = await start_replica(fake, redis_server.url, "ttl-a", cluster={"event_log_ttl_seconds": 0.5})
    try:
        baseline = set(await rdb.keys("*"))  # the replica's heartbeat
        streams = await asyncio.gather(
            *(
                collect(a.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage()), timeout=60))
                for _ in range(40)
            )
        )
        unary = await asyncio.gather(
            *(a.stub.RunTools(pb.RunToolsRequest(stage=stage()), timeout=60) for _ in range(10))
        )
        assert all(code == grpc.StatusCode.OK for _, code in streams)
        assert all(response.tool_results for response in unary)
        async with asyncio.timeout(30):
            while set(await rdb.keys("*")) != baseline:  # noqa: ASYNC110 - Redis has no event for it
                await asyncio.sleep(0.1)
    finally:
        await a.close()
    async with asyncio.timeout(10):
        while await rdb.dbsize():  # noqa: ASYNC110 - the heartbeat goes with the replica
            await asyncio.sleep(0.05)


async def test_a_stage_started_while_redis_is_down_fails_with_registry_unavailable(
    fake: FakeBackend, redis_server: RedisServer
) -> None:
    fake.handler = stage_handler(chunks=3)
    a = await start_replica(fake, redis_server.url, "lonely", cluster={"request_timeout": 0.5})
    try:
        await redis_server.stop()
        events, code = await collect(
            a.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage()), timeout=30)
        )
        assert code == grpc.StatusCode.UNAVAILABLE
        assert kinds(events) == ["error"] and events[0].error.reason == "REGISTRY_UNAVAILABLE"
        assert events[0].error.retryable
    finally:
        with contextlib.suppress(Exception):
            await a.close()


async def test_an_unreachable_redis_stops_start_up_naming_the_key(fake: FakeBackend) -> None:
    settings = make_settings(
        fake, cluster=ClusterSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", request_timeout=0.5)
    )
    with pytest.raises(ConfigError, match=r"^cluster\.redis_url: cannot reach Redis"):
        await start_server(settings)


async def test_the_python_client_resumes_a_stream_on_another_replica(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    received: list[pb.StageEvent] = []
    async with ToolchainClient(a.server.address) as first, ToolchainClient(b.server.address) as second:
        events = first.stream_synthesis("What is 2+3?", stage_id="py-client", timeout=60)
        async with contextlib.aclosing(events):
            async for event in events:
                received.append(event)
                if len(received) == 4:
                    break  # closing the iterator cancels the call: the stream "drops"
        async for event in second.resume_stage("py-client", after_sequence=received[-1].sequence, timeout=60):
            received.append(event)
    assert [e.sequence for e in received] == list(range(len(received)))
    assert kinds(received)[-1] == "done"


async def test_a_stalled_reader_is_let_go_and_its_stage_stays_resumable(
    fake: FakeBackend, redis_server: RedisServer
) -> None:
    words = "abcdefghi " * 1_500_000  # 15 MB in 3,000 deltas: more than every buffer between
    fake.script(SSEReply(text_chunks(words, pieces=3000), delay=0.00001))
    a = await start_replica(
        fake,
        redis_server.url,
        "stall-a",
        stream_stall_seconds=1.0,
        backend={"max_response_bytes": 64 << 20, "read_timeout": 60.0},
    )
    # a small receive window (no BDP probing), and room for Done, which carries the whole text
    options = (("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 64 << 20))
    channel = grpc.aio.insecure_channel(a.server.address, options=options)
    try:
        stub = pb_grpc.ToolchainServiceStub(channel)
        call = stub.StreamTools(pb.StreamToolsRequest(stage=stage("long", stage_id="stalled")), timeout=60)
        before = await first_events(call, 1)  # then the caller stops reading
        async with asyncio.timeout(60):  # until the server lets the stream go
            while (handle := a.server.stages.get("stalled")) is None or handle.readers:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        backlog, code = await collect(call)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        before += backlog
        rest, code = await collect(await resumed(stub, "stalled", before[-1].sequence))
        assert code == grpc.StatusCode.OK
        events = before + rest
        assert [e.sequence for e in events] == list(range(len(events)))
        assert events[-1].done.text == words
        assert fake.disconnects == 0  # the stage ran on
    finally:
        await channel.close(None)
        await a.close()


async def test_a_resume_while_the_first_stream_still_reads_gets_the_same_events(
    pair: tuple[Replica, Replica],
) -> None:
    a, b = pair  # a half-open connection: the caller resumes before the server saw the drop
    call = a.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id="twice")), timeout=60)
    await first_events(call, 1)
    (original, first_code), (resumed_events, second_code) = await asyncio.gather(
        collect(call), collect(await resumed(b.stub, "twice", 0))
    )
    assert first_code == second_code == grpc.StatusCode.OK
    assert [e.SerializeToString(deterministic=True) for e in resumed_events] == [
        e.SerializeToString(deterministic=True) for e in original
    ]


async def test_a_detached_stage_cancelled_by_cancel_stage_shows_it_to_a_later_resume(
    pair: tuple[Replica, Replica], fake: FakeBackend
) -> None:
    a, b = pair
    request = pb.StreamSynthesisRequest(stage=stage(stage_id="gone-then-cancelled"))
    call = a.stub.StreamSynthesis(request, timeout=60)
    before = await first_events(call, 2)
    call.cancel()  # detached: the stage runs on, unread
    await b.stub.CancelStage(pb.CancelStageRequest(stage_id="gone-then-cancelled"), timeout=10)
    await fake.wait_disconnect(10.0)
    events, code = await collect(await resumed(b.stub, "gone-then-cancelled", before[-1].sequence))
    assert code == grpc.StatusCode.CANCELLED
    assert kinds(events)[-1] == "cancel" and events[-1].cancel.reason == pb.CANCEL_REASON_CANCEL_STAGE
    sequences = [e.sequence for e in before + events]
    assert sequences == list(range(len(sequences)))
