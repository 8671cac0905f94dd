"""The deployment: nginx (`grpc_pass`) in front of three replicas that share Redis, every
process started here (tests/cluster_support.py). Through the proxy: streamed stages spread
over the replicas, cancelled from another connection, cut by a proxy restart and resumed,
a replica drained with SIGTERM; and Redis holds nothing of them once their logs expire."""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis import asyncio as aioredis
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from tests.cluster_support import (
    EVENT_LOG_TTL,
    HEARTBEAT_PREFIX,
    REPLICAS,
    Cluster,
    Replica,
    StageScript,
    assert_clean_log,
    open_cluster,
    prompt,
)
from tests.conftest import collect, kinds
from tests.fakes.grpc_proxy import GrpcProxy

TERMINALS = ("done", "cancel", "error")
KINDS = ("alone", "cancel", "cut")


def synthesis(stage_id: str, kind: str, n: int, *, rounds: int = 1) -> pb.StreamSynthesisRequest:
    return pb.StreamSynthesisRequest(
        stage=pb.StageRequest(stage_id=stage_id, user_prompt=prompt(kind, n), max_rounds=rounds)
    )


def describe(events: list[pb.StageEvent], code: grpc.StatusCode | None = None) -> str:
    shown = [f"{e.sequence}:{e.WhichOneof('event')}" for e in events]
    tail = events[-1] if events else None
    terminal = "" if tail is None or tail.WhichOneof("event") not in TERMINALS else f" last={tail}"
    return f"status={code} events={shown}{terminal}"


def assert_ok_done(stage_id: str, events: list[pb.StageEvent], code: grpc.StatusCode) -> None:
    """One terminal event, Done, status OK, sequences 0, 1, 2, ... and the stage's id on each."""
    out = Outcome(stage_id, "alone", 0, events, code)
    assert not (problem := judge(out)), f"{problem}: {out}"


def watch_health(channel: grpc.aio.Channel) -> Any:
    """A health Watch of a replica, opened before its drain: a draining replica takes no
    new calls (its port is closed, its connections told GOAWAY), but open watches hear it."""
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))


async def wait_not_serving(watch: Any, timeout: float = 30.0) -> None:
    """Read a replica's health Watch until it reports NOT_SERVING (its drain began)."""
    try:
        async with asyncio.timeout(timeout):
            while (response := await watch.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    return
    finally:
        watch.cancel()
    raise AssertionError("the replica's health never became NOT_SERVING")


def metadata(stage_id: str) -> tuple[tuple[str, str], ...]:
    """The stage's id as request metadata, so nginx's access log names it per request."""
    return (("x-stage-id", stage_id),)


async def wait_until(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"not within {timeout}s: {what()}")
        await asyncio.sleep(0.1)


# --- 300 stages: left alone, cancelled through the proxy, cut by a proxy restart and resumed ---

PER_KIND = 100
#: Streams of the left-alone and cancelled stages open at a time (the cut ones: all at once).
CONCURRENCY = 40


@dataclass
class Outcome:
    stage_id: str
    kind: str
    n: int
    events: list[pb.StageEvent] = field(default_factory=list)  # all of them, in the order received
    code: grpc.StatusCode | None = None  # the final status (of the resume, for a cut stage)
    cancel_error: str = ""  # CancelStage's failure
    before_cut: list[pb.StageEvent] = field(default_factory=list)  # what the cut stream had received
    cut_code: grpc.StatusCode | None = None  # the cut stream's status
    after_sequence: int | None = None  # what ResumeStage was given

    def __str__(self) -> str:
        cut = "" if self.kind != "cut" else f" cut={self.cut_code} after_sequence={self.after_sequence}"
        return f"{self.stage_id}{cut} cancel_error={self.cancel_error!r} {describe(self.events, self.code)}"


async def alone(stub: pb_grpc.ToolchainServiceAsyncStub, out: Outcome) -> None:
    call = stub.StreamSynthesis(
        synthesis(out.stage_id, "alone", out.n), timeout=120, metadata=metadata(out.stage_id)
    )
    out.events, out.code = await collect(call)


async def cancelled(
    stub: pb_grpc.ToolchainServiceAsyncStub, cancel_stub: pb_grpc.ToolchainServiceAsyncStub, out: Outcome
) -> None:
    """Read up to the first synthesis chunk (the backend then stalls: the stage surely
    runs), CancelStage on the other channel, then read the rest."""
    md = metadata(out.stage_id)
    call = stub.StreamSynthesis(synthesis(out.stage_id, "cancel", out.n), timeout=120, metadata=md)
    try:
        while (response := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]  # grpc-stubs lag
            assert isinstance(response, pb.StreamSynthesisResponse)
            out.events.append(response.event)
            if response.event.chunk.phase == pb.PHASE_SYNTHESIS:
                break
    except grpc.aio.AioRpcError as err:
        out.code = err.code()
        return
    try:
        reply = await cancel_stub.CancelStage(
            pb.CancelStageRequest(stage_id=out.stage_id), timeout=60, metadata=md
        )
        if reply.stage_id != out.stage_id:
            out.cancel_error = f"CancelStage answered for {reply.stage_id!r}"
    except grpc.aio.AioRpcError as err:
        out.cancel_error = f"{err.code()}: {err.details()}"
    rest, out.code = await collect(call)
    out.events += rest


async def read_until_cut(call: Any, out: Outcome, running: asyncio.Event) -> None:
    """Read the cut stage's stream until it breaks; `running` is set at its first tool
    summary (its second round then waits for the "cut" gate: the stage surely runs when
    its stream is cut)."""
    try:
        while (response := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]  # grpc-stubs lag
            out.before_cut.append(response.event)
            if response.event.HasField("tool_summary"):
                running.set()
    except grpc.aio.AioRpcError as err:
        out.cut_code = err.code()
        return
    out.cut_code = await call.code()


def resume_point(out: Outcome) -> tuple[list[pb.StageEvent], int | None]:
    """What the caller keeps of the cut stream and resumes after: mostly the last event
    it received; every fourth stage as if its last two events were lost in flight, and
    every fourth from the start (after_sequence unset)."""
    seen = out.before_cut
    if out.n % 4 == 1 and len(seen) > 2:
        return seen[:-2], seen[-3].sequence
    if out.n % 4 == 2 or not seen:
        return [], None
    return list(seen), seen[-1].sequence


async def resumed(stub: pb_grpc.ToolchainServiceAsyncStub, script: StageScript, out: Outcome) -> None:
    """ResumeStage from what the caller kept; once it delivered the second tool round's
    summary (the resume is attached) the backend lets the synthesis start."""
    kept, out.after_sequence = resume_point(out)
    request = pb.ResumeStageRequest(stage_id=out.stage_id)
    if out.after_sequence is not None:
        request.after_sequence = out.after_sequence
    call = stub.ResumeStage(request, timeout=120, metadata=metadata(out.stage_id))
    out.events = kept
    try:
        while (response := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]  # grpc-stubs lag
            assert isinstance(response, pb.ResumeStageResponse)
            out.events.append(response.event)
            if response.event.tool_summary.round == 2:
                script.resumed(out.n).set()
        out.code = await call.code()
    except grpc.aio.AioRpcError as err:
        out.code = err.code()
    finally:
        script.resumed(out.n).set()  # never leave the stage waiting


async def cut_and_resume(cluster: Cluster, proxy: GrpcProxy, outcomes: list[Outcome]) -> None:
    """Open every cut stage's stream through `proxy`; once each runs, restart the proxy
    (every connection through it drops), let the stages go on, and resume each through
    the new proxy, on a new connection."""
    stub = cluster.stub(proxy)
    marks = [asyncio.Event() for _ in outcomes]
    readers = []
    for out, running in zip(outcomes, marks, strict=True):
        call = stub.StreamSynthesis(
            synthesis(out.stage_id, "cut", out.n, rounds=2), timeout=120, metadata=metadata(out.stage_id)
        )
        readers.append(asyncio.create_task(read_until_cut(call, out, running)))
    try:
        async with asyncio.timeout(90):
            await asyncio.gather(*(mark.wait() for mark in marks))
    except TimeoutError:
        waiting = [str(out) for out, mark in zip(outcomes, marks, strict=True) if not mark.is_set()]
        raise AssertionError(f"cut stages not running after 90s: {waiting[:5]}") from None
    await proxy.restart()
    async with asyncio.timeout(60):
        await asyncio.gather(*readers)
    cluster.script.gates["cut"].set()  # their second round runs, no caller attached
    resume_stub = cluster.stub(proxy)
    # In reverse order: nginx's round robin, started afresh, would otherwise send most
    # resumes to the replica that runs the stage, as it did the streams.
    await asyncio.gather(*(resumed(resume_stub, cluster.script, out) for out in reversed(outcomes)))


async def redis_keys(cluster: Cluster) -> set[str]:
    client = aioredis.from_url(cluster.redis.url, decode_responses=True)
    try:
        return {key async for key in client.scan_iter(count=1000)}
    finally:
        await client.aclose()


def without_beats(keys: set[str]) -> set[str]:
    return {key for key in keys if not key.startswith(HEARTBEAT_PREFIX)}


async def redis_dbsize(cluster: Cluster) -> int:
    client = aioredis.from_url(cluster.redis.url)
    try:
        size: int = await client.dbsize()
        return size
    finally:
        await client.aclose()


@pytest.mark.timeout(300)
async def test_300_streamed_stages_through_nginx_over_three_replicas() -> None:
    """300 StreamSynthesis stages through nginx over three replicas, 100 of each kind:

    * left alone: OK, Done;
    * cancelled by CancelStage through the proxy on another connection (nginx round-robin
      sends it to another replica than the stream's two times in three): every cancel
      succeeds, the stream ends with Cancel(CANCEL_STAGE) and CANCELLED;
    * cut: their streams go through a second nginx (a deployment runs more than one),
      which is restarted while they are open: every connection through it drops, the
      other two kinds' streams, on the first, go on. Each is then resumed through the
      new proxy with ResumeStage(after_sequence = what it kept): the events before the
      cut and those of the resume are 0, 1, 2, ... without gap or repeat, one terminal
      event, OK, Done.

    Every stage has exactly one terminal event and contiguous sequences; the stages spread
    over the three replicas (each replica's own stage log, and nginx's access log, agree);
    and once all ended and their logs' TTL passed, Redis holds what it held before the load
    (the replicas' heartbeat keys aside)."""
    async with open_cluster(proxies=2) as cluster:
        with cluster.explained():
            await _three_hundred_stages(cluster)


async def _three_hundred_stages(cluster: Cluster) -> None:
    steady, restarted = cluster.proxies
    baseline_keys = await redis_keys(cluster)
    baseline_size = await redis_dbsize(cluster)
    outcomes = {kind: [Outcome(f"{kind}-{n}", kind, n) for n in range(PER_KIND)] for kind in KINDS}
    stub, cancel_stub = cluster.stub(steady), cluster.stub(steady)
    limit = asyncio.Semaphore(CONCURRENCY)

    async def bounded(work: Callable[[], Awaitable[None]]) -> None:
        async with limit:
            await work()

    steady_work: list[Awaitable[None]] = []
    for left, cancel in zip(outcomes["alone"], outcomes["cancel"], strict=True):
        steady_work.append(bounded(functools.partial(alone, stub, left)))
        steady_work.append(bounded(functools.partial(cancelled, stub, cancel_stub, cancel)))
    started = time.monotonic()
    await asyncio.gather(cut_and_resume(cluster, restarted, outcomes["cut"]), *steady_work)
    elapsed = time.monotonic() - started

    # Every stage: one terminal event, sequences 0, 1, 2, ..., the status its kind asks for.
    problems = [
        f"{out.kind}: {problem} ({out})" for out in chain(*outcomes.values()) if (problem := judge(out))
    ]
    assert not problems, f"{len(problems)} of 300 stages went wrong:\n" + "\n".join(problems[:20])

    # Which replica ran each: its own stage log (a stage_end line per StreamSynthesis stage).
    every_id = {out.stage_id for out in chain(*outcomes.values())}

    def unlogged() -> set[str]:
        return every_id - set().union(*(r.ran_stages("StreamSynthesis") for r in cluster.replicas))

    await wait_until(lambda: not unlogged(), 30, lambda: f"no stage_end line for {sorted(unlogged())[:10]}")
    owner: dict[str, Replica] = {}
    for replica in cluster.replicas:
        for stage_id in replica.ran_stages("StreamSynthesis") & every_id:
            assert stage_id not in owner, f"{stage_id} ran on {owner[stage_id].name} and {replica.name}"
            owner[stage_id] = replica
    spread = Counter(replica.name for replica in owner.values())
    assert all(spread[r.name] >= 30 for r in cluster.replicas), f"stages per replica: {spread}"

    # nginx's account agrees: the replica each StreamSynthesis went to is the one that ran it.
    by_address = {r.address: r for r in cluster.replicas}
    routed = {
        (request.method, request.stage_id): by_address.get(request.upstream)
        for proxy in cluster.proxies
        for request in proxy.requests()
        if request.stage_id in every_id
    }
    for out in chain(outcomes["alone"], outcomes["cancel"]):
        went_to = routed.get(("StreamSynthesis", out.stage_id))
        assert went_to is owner[out.stage_id], (out.stage_id, went_to, owner[out.stage_id])

    # CancelStage reached the owner every time (every cancel above succeeded), mostly
    # through another replica than the one running the stage.
    crossed_cancels = sum(
        routed.get(("CancelStage", out.stage_id)) not in (None, owner[out.stage_id])
        for out in outcomes["cancel"]
    )
    assert crossed_cancels >= PER_KIND // 4, f"only {crossed_cancels} cancels went through another replica"
    crossed_resumes = sum(
        routed.get(("ResumeStage", out.stage_id)) not in (None, owner[out.stage_id])
        for out in outcomes["cut"]
    )
    assert crossed_resumes >= PER_KIND // 4, f"only {crossed_resumes} resumes went through another replica"

    # Redis: once the logs' TTL passed, back to what it held before the load.
    async def leftovers() -> tuple[set[str], int]:
        keys = await redis_keys(cluster)
        beats = len(keys) - len(without_beats(keys))
        return without_beats(keys) - without_beats(baseline_keys), await redis_dbsize(cluster) - beats

    baseline_beats = len(baseline_keys) - len(without_beats(baseline_keys))
    loop = asyncio.get_running_loop()
    end = loop.time() + EVENT_LOG_TTL + 60
    while (remaining := await leftovers()) != (set(), baseline_size - baseline_beats):
        if loop.time() > end:
            raise AssertionError(
                f"Redis still holds {len(remaining[0])} keys of the run ({sorted(remaining[0])[:10]}); "
                f"DBSIZE less heartbeats {remaining[1]}, before the load {baseline_size - baseline_beats}"
            )
        await asyncio.sleep(0.2)
    print(
        f"300 stages in {elapsed:.1f}s; per replica {dict(spread)}; cancels through another replica "
        f"{crossed_cancels}/{PER_KIND}, resumes {crossed_resumes}/{PER_KIND}"
    )


def judge(out: Outcome) -> str:
    """What is wrong with a stage's events and status ('' when nothing)."""
    events, code = out.events, out.code
    terminals = [k for k in kinds(events) if k in TERMINALS]
    if [e.sequence for e in events] != list(range(len(events))):
        return "sequences are not 0, 1, 2, ..."
    if {e.stage_id for e in events} != {out.stage_id}:
        return "events of another stage"
    if len(terminals) != 1 or kinds(events)[-1] != terminals[0]:
        return f"terminal events {terminals}"
    rounds = [e.tool_summary.round for e in events if e.HasField("tool_summary")]
    if rounds != ([1, 2] if out.kind == "cut" else [1]):
        return f"tool summaries of rounds {rounds}"
    if out.kind == "cut" and (
        out.cut_code == grpc.StatusCode.OK or any(k in TERMINALS for k in kinds(out.before_cut))
    ):
        return "the stream ended before the cut"
    if out.kind == "cancel":
        if out.cancel_error:
            return f"CancelStage failed: {out.cancel_error}"
        if code != grpc.StatusCode.CANCELLED or events[-1].cancel.reason != pb.CANCEL_REASON_CANCEL_STAGE:
            return "not Cancel(CANCEL_STAGE) + CANCELLED"
        return ""
    if code != grpc.StatusCode.OK or terminals != ["done"]:
        return "not Done + OK"
    return ""


# --- A replica drained with SIGTERM behind the proxy --------------------------------------------


class DrainRefusal(AssertionError):
    """Stages sent through nginx during a replica's drain were refused by it."""


@pytest.mark.timeout(180)
async def test_a_replica_taken_out_of_the_proxy_then_drained_finishes_its_streams() -> None:
    """The rollout nginx (open source: no active health checks) supports: reload it
    without the replica, then SIGTERM the replica. Its open streams finish OK, new stages
    all succeed on the others, and it exits 0."""
    async with open_cluster() as cluster:
        with cluster.explained():
            await _drain_behind_the_proxy(cluster, take_out_first=True)


@pytest.mark.timeout(180)
async def test_a_replica_drained_with_sigterm_alone_behind_the_proxy() -> None:
    """SIGTERM to a replica nginx still sends to: its open streams finish OK and it exits
    0; the stages started through the proxy during its drain all succeed on the others
    (the draining replica closes its port and sends GOAWAY, and nginx retries a refused
    connection on the next upstream; it could not retry a stage answered SERVER_DRAINING)."""
    async with open_cluster() as cluster:
        with cluster.explained():
            await _drain_behind_the_proxy(cluster, take_out_first=False)


async def _drain_behind_the_proxy(cluster: Cluster, *, take_out_first: bool) -> None:
    proxy = cluster.proxies[0]
    stub = cluster.stub(proxy)
    victim, others = cluster.replicas[0], cluster.replicas[1:]

    # Streams that surely run during the drain: their synthesis waits for the "hold" gate.
    # nginx's round robin gives each replica three of the nine.
    held_ids = [f"held-{i}" for i in range(3 * REPLICAS)]
    held = [
        stub.StreamSynthesis(synthesis(sid, "hold", i), timeout=120, metadata=metadata(sid))
        for i, sid in enumerate(held_ids)
    ]
    async with asyncio.timeout(60):
        firsts = await asyncio.gather(*(call.read() for call in held))
    for sid, first in zip(held_ids, firsts, strict=True):
        assert isinstance(first, pb.StreamSynthesisResponse), (sid, first)

    if take_out_first:
        await proxy.reload([r.address for r in others])
    watch = watch_health(cluster.channel(victim))
    await watch.read()  # open: SERVING
    victim.server.process.send_signal(signal.SIGTERM)
    await wait_not_serving(watch)

    # New stages while the victim drains, through the proxy, on the old connection and a new one.
    fresh_stub = cluster.stub(proxy)
    new_ids = [f"during-drain-{i}" for i in range(6 * REPLICAS)]
    new_calls = [
        (stub if i % 2 else fresh_stub).StreamSynthesis(
            synthesis(sid, "alone", i), timeout=60, metadata=metadata(sid)
        )
        for i, sid in enumerate(new_ids)
    ]
    new_results = await asyncio.gather(*(collect(call) for call in new_calls))
    by_address = {r.address: r.name for r in cluster.replicas}
    answered_by = {r.stage_id: by_address.get(r.upstream, r.upstream) for r in proxy.requests()}
    refused = {
        sid: f"{answered_by.get(sid)}: {describe(events, code)}"
        for sid, (events, code) in zip(new_ids, new_results, strict=True)
        if code != grpc.StatusCode.OK
    }
    for sid, (events, code) in zip(new_ids, new_results, strict=True):
        if sid not in refused:
            assert_ok_done(sid, events, code)

    # The victim's own streams finish, then it exits 0.
    assert victim.server.process.returncode is None, "the victim ended before its streams did"
    cluster.script.gates["hold"].set()
    held_results = await asyncio.gather(*(collect(call) for call in held))
    for sid, first, (events, code) in zip(held_ids, firsts, held_results, strict=True):
        assert isinstance(first, pb.StreamSynthesisResponse)
        assert_ok_done(sid, [first.event, *events], code)
    assert await victim.server.wait(30.0) == 0, victim.server.stderr_text
    assert_clean_log(victim)
    ran_on_victim = victim.ran_stages("StreamSynthesis")
    assert ran_on_victim & set(held_ids), f"no held stream ran on the drained replica: {ran_on_victim}"
    for replica in others:
        assert replica.server.process.returncode is None, f"{replica.name} ended"

    if refused:
        raise DrainRefusal(
            f"{len(refused)} of {len(new_ids)} stages started through the proxy during the drain "
            f"failed:\n" + "\n".join(f"{sid} on {why}" for sid, why in refused.items())
        )
    assert not ran_on_victim & set(new_ids), f"the drained replica ran new stages: {ran_on_victim}"
