"""Real-rate many-stream benchmark: 1,000 StreamSynthesis stages open at once against a
backend that streams at a model's pace, and 1,000 stalled readers of 1 MB answers.

    python -m bench.realrate                     # rows A and B, 1,000 streams each, and row C
    python -m bench.realrate --smoke             # 50 streams, 2 s of streaming, < 1 minute
    python -m bench.realrate --streams 100 --rate 20 --tokens 100 --json bench/results/realrate.json

Processes, as `bench.run` runs them (`bench.procs.Child`): the fake backend (`bench.backend`
with its `stamped` or `bulk` scenario) and the service (`bench.service_proc`), each its own
process and both restarted per row, so the service's VmHWM is that row's peak RSS; the
client is this process (grpc.aio stubs on a few channels, `bench.loadgen`'s). CPU is
utime+stime from /proc over the row's window (the first call's start to the last one's
end), as in `bench.run`.

Row A, `rate`: N streams opened over `--ramp` seconds (evenly spaced, the channels taken in
turn), each one stage: the `calculator` call, then a synthesis answer of `--tokens` tokens
at `--rate` tokens/s. Each token's text is the backend's `time.monotonic_ns()` at its send
(CLOCK_MONOTONIC is one clock for every process of the machine), so the client measures,
per token, the gap from its send to the chunk event that carried it (the service may merge
deltas that arrived together into one chunk: every token of a chunk gets that chunk's
arrival), and how far each stream ends behind its backend (the last token's send to the
Done event).

Row B, `stall`: N streams whose answer is `--bulk-bytes` of text in `--bulk-piece`-character
events, written by the backend as fast as its connection takes it. Each client reads the
first event and stops reading; once every stream has its first event, the client waits
`--stall` seconds, then reads how many bytes the backend has sent per answer (its
`/bench/streams`) and the service's RSS, then every stream reads to the end (the whole
answer is checked by length and CRC-32, and so is Done's text): whether backpressure
reaches the backend, and whether the service's memory stays bounded while nobody reads.
As the stall begins, `--pace-streams` streams that read (row A's stamped answers, on a
second backend process of their own, `pace`, through a channel with grpc's defaults) run
beside the stalled ones: whether the others keep their pace (their token-to-event gap and
how far behind their backend they end; a failed one fails the row).

Row C, `overload`: row A's streams, twice `--admit` of them, against a service whose
admission (`max_concurrent_stages`) is `--admit`: every call must be either served or refused
with RESOURCE_EXHAUSTED (SERVER_OVERLOADED) and a retry delay; the row reports how long the
served calls waited before their handler ran (`to-be`) and how long the refused ones waited
for their refusal (targets: 50 ms each).

Any error or failed check fails its row (exit code 1). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from bench import checks, common, loadgen, scenario
from bench.backend import bulk_text, live_spec
from bench.driver import Summary, describe
from bench.procs import Child, ChildFailed, Snapshot, proc_status_kb, snapshot, system_busy_seconds


@dataclass
class Plan:
    streams: int
    rate: float
    tokens: int
    #: Seconds over which the N calls are started (evenly spaced).
    ramp: float
    channels: int
    bulk_bytes: int
    bulk_piece: int
    stall: float
    #: The service's backend connection pool (so that every stream can have its own).
    max_connections: int
    rows: list[str]
    #: Row B's client: 0: grpc's defaults (BDP probing grows the HTTP/2 window); else no
    #: probing and this lookahead (the stream window), in bytes.
    client_window: int = 0
    #: Row C: the service's admitted concurrency (`max_concurrent_stages`); the row opens
    #: twice as many calls.
    admit: int = 100
    #: Row C: the service's admission_max_loop_busy (adaptive admission); 0: off, and the
    #: count bound `admit` admits.
    admit_busy: float = 0.0
    #: Row B: streams that read, at `rate` tokens/s on a backend of their own, opened as the
    #: stall begins: whether the others keep their pace while the stalled readers hold on.
    pace_streams: int = 50


@dataclass
class Common:
    """What both rows report."""

    name: str
    streams: int
    status: str = "ok"
    error: str = ""
    errors: int = 0
    ok_streams: int = 0
    max_in_flight: int = 0
    wall_s: float = 0.0
    #: Time to first event: the call's start to its first event (ms).
    ttfe_ms: Summary = field(default_factory=Summary)
    events_per_stage: float = 0.0
    #: CPU seconds over the row's window: service, backend, client (this process).
    cpu_s: dict[str, float] = field(default_factory=dict)
    rss_peak_mb: float = 0.0
    other_cpu_pct: float = 0.0
    #: Errors by their description (the first 120 characters).
    error_kinds: dict[str, int] = field(default_factory=dict)
    #: Seconds from a failed call's start to its failure: the least and the most.
    error_after_s: list[float] = field(default_factory=list)
    #: The most stages streaming at once: first event received, Done not yet.
    streaming_max: int = 0
    #: TTFE p50 of each tenth of the streams, in the order they were started (ms).
    ttfe_by_start_ms: list[float] = field(default_factory=list)
    #: The busiest second of each process over the row, in % of one core.
    cpu_peak_pct: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class RateRow(Common):
    rate: float = 0.0
    tokens: int = 0
    #: Per token: the backend's send to the client's receipt of the event carrying it (ms).
    gap_ms: Summary = field(default_factory=Summary)
    #: Per stream: the backend's last token send to the client's Done event (ms).
    end_behind_ms: Summary = field(default_factory=Summary)
    tokens_per_chunk: float = 0.0
    #: Per stream: its call's start to its tool-phase request's arrival at the backend (ms),
    #: the bound on how long the call waited before the service's handler ran (the handler's
    #: own work before that request is ~1 ms unloaded).
    to_backend_ms: Summary = field(default_factory=Summary)
    #: Calls the service refused (RESOURCE_EXHAUSTED SERVER_OVERLOADED, its admission), and
    #: the time from their start to the refusal (ms): told at once, not queued unseen.
    refused: int = 0
    refused_ms: Summary = field(default_factory=Summary)
    #: Refusals whose error event carried a retry delay (the status's RetryInfo).
    refused_with_retry: int = 0
    #: Row C: the admitted concurrency (max_concurrent_stages), 0 in row A.
    admit: int = 0
    #: Row C with adaptive admission: the service's admission_max_loop_busy.
    admit_busy: float = 0.0
    #: How late the backend sent tokens against its own schedule (ms): its max and mean.
    backend_lag_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class StallRow(Common):
    answer_bytes: int = 0
    #: The whole SSE response of one answer, in bytes (what "sent" is a part of).
    response_bytes: int = 0
    stall_s: float = 0.0
    #: Bytes the backend had sent per answer at the end of the stall (KiB).
    sent_kib: dict[str, float] = field(default_factory=dict)
    sent_pct: float = 0.0
    complete_at_stall: int = 0
    rss_at_stall_mb: float = 0.0
    rss_peak_at_stall_mb: float = 0.0
    #: Per stream: resuming to its Done event (ms).
    drain_ms: Summary = field(default_factory=Summary)
    #: Where the sent bytes were when the stall ended, KiB per stream: in the kernel's
    #: socket queues between backend and service, and between service and client.
    kernel_kib: dict[str, float] = field(default_factory=dict)
    #: This client's RSS growth from the row's start to the stall's end (grpc's buffers).
    client_rss_growth_mb: float = 0.0
    #: The reading streams of the stall (Plan.pace_streams): how many ended well, their
    #: token-to-event gap and how far behind their backend they ended (ms), their errors.
    pace_ok: int = 0
    pace_gap_ms: Summary = field(default_factory=Summary)
    pace_end_ms: Summary = field(default_factory=Summary)
    pace_errors: dict[str, int] = field(default_factory=dict)


# -- processes --------------------------------------------------------------------------


def start_backend(log_dir: Path, name: str, args: list[str]) -> tuple[Child, str]:
    child = Child(name, "bench.backend", args, log_dir)
    try:
        port = child.expect("READY", 60)
    except ChildFailed:
        child.stop()
        raise
    return child, f"http://127.0.0.1:{port}/v1"


def start_service(
    log_dir: Path,
    url: str,
    max_connections: int,
    env: dict[str, str] | None = None,
    pace_url: str | None = None,
) -> tuple[Child, str]:
    args = ["--backend-url", url, "--max-connections", str(max_connections)]
    if pace_url is not None:
        args += ["--pace-url", pace_url]
    child = Child("service", "bench.service_proc", args, log_dir, env)
    try:
        port = child.expect("READY", 120)
    except ChildFailed:
        child.stop()
        raise
    return child, f"127.0.0.1:{port}"


def backend_streams(url: str) -> list[dict[str, Any]]:
    base = url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{base}/bench/streams", timeout=30) as response:
        streams: list[dict[str, Any]] = json.loads(response.read())["streams"]
    return streams


def tcp_queued(port: int) -> int:
    """Bytes the kernel holds on the loopback TCP connections of `port`: both ends' send
    queues (written, not yet acknowledged or not yet sent) and receive queues (not yet
    read), from /proc/net/tcp and tcp6."""
    total = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, encoding="ascii") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote, state = fields[1], fields[2], fields[3]
                    if state == "0A":  # LISTEN: its queues count connections, not bytes
                        continue
                    if int(local.rsplit(":", 1)[1], 16) == port or int(remote.rsplit(":", 1)[1], 16) == port:
                        tx, rx = fields[4].split(":")
                        total += int(tx, 16) + int(rx, 16)
        except OSError:
            continue
    return total


def cpu_and_other(first: Snapshot, last: Snapshot) -> tuple[dict[str, float], float]:
    cpu = {role: last.cpu[role] - first.cpu[role] for role in first.cpu}
    _, cpus = system_busy_seconds()
    wall = max(1e-9, last.wall - first.wall)
    ours = sum(cpu.values())
    other = max(0.0, (last.busy - first.busy - ours) / (wall * cpus) * 100.0)
    return {"service": cpu["server"], "backend": cpu["backend"], "client": cpu["parent"]}, other


# -- the client -------------------------------------------------------------------------


class Flight:
    """Calls in flight, and the most at once."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    def enter(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def leave(self) -> None:
        self.now -= 1


class Errors:
    def __init__(self) -> None:
        self.count = 0
        self.first = ""
        self.kinds: dict[str, int] = {}
        #: Seconds from a failed call's start to its failure: the least and the most.
        self.after: list[float] = []

    def add(self, exc: BaseException, started_ns: int) -> None:
        self.count += 1
        text = describe(exc)
        self.first = self.first or text
        self.kinds[text[:120]] = self.kinds.get(text[:120], 0) + 1
        after = (time.monotonic_ns() - started_ns) / 1e9
        self.after = [min(self.after[0], after), max(self.after[1], after)] if self.after else [after, after]


class Timeline:
    """When each good stream started, got its first event and ended (monotonic ns), and
    the CPU of every process second by second."""

    def __init__(self, children: dict[str, Child]) -> None:
        self.children = children
        self.streams: list[tuple[int, int, int, int]] = []  # (start order, started, first, done)
        self.peak: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, index: int, started: int, first: int, done: int) -> None:
        self.streams.append((index, started, first, done))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        names = {"server": "service", "backend": "backend", "parent": "client"}
        before = snapshot(self.children)
        while True:
            await asyncio.sleep(1.0)
            now = snapshot(self.children)
            wall = max(1e-9, now.wall - before.wall)
            for role, name in names.items():
                pct = (now.cpu[role] - before.cpu[role]) / wall * 100.0
                self.peak[name] = max(self.peak.get(name, 0.0), pct)
            before = now

    async def stop(self, row: Common) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        row.cpu_peak_pct = {name: round(pct, 1) for name, pct in self.peak.items()}
        points = sorted(
            [(first, 1) for _, _, first, _ in self.streams] + [(done, -1) for *_, done in self.streams]
        )
        level = 0
        for _, step in points:
            level += step
            row.streaming_max = max(row.streaming_max, level)
        ordered = sorted(self.streams)
        parts = min(10, len(ordered))
        bounds = [len(ordered) * i // parts for i in range(parts + 1)]
        row.ttfe_by_start_ms = [
            round(statistics.median((f - s) / 1e6 for _, s, f, _ in ordered[bounds[i] : bounds[i + 1]]), 1)
            for i in range(parts)
        ]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise checks.CheckFailed(message)


class StageEvents:
    """The order checks every streamed stage gets: sequence 0..n-1, one stage id, tool
    chunks, exactly one OK calculator summary, synthesis chunks, Done last."""

    def __init__(self) -> None:
        self.count = 0
        self.stage_id = ""
        self.summaries = 0
        self.done: pb.Done | None = None
        #: The streamed tool call's id (stamped scenario: call_<its arrival at the backend>).
        self.call_id = ""

    def take(self, event: pb.StageEvent) -> str:
        """Check one event in order; return its kind."""
        _require(self.done is None, f"event {self.count} after Done")
        _require(event.sequence == self.count, f"event {self.count} has sequence {event.sequence}")
        if self.count == 0:
            self.stage_id = event.stage_id
            _require(bool(self.stage_id), "empty stage_id")
        _require(event.stage_id == self.stage_id, f"event {self.count} has stage_id {event.stage_id!r}")
        self.count += 1
        kind = event.WhichOneof("event")
        if kind == "chunk":
            phase = pb.PHASE_SYNTHESIS if self.summaries else pb.PHASE_TOOL
            _require(
                event.chunk.phase == phase, f"event {event.sequence}: chunk of phase {event.chunk.phase}"
            )
            for delta in event.chunk.tool_calls:
                if delta.id:
                    _require(not self.call_id, f"event {event.sequence}: a second tool call id")
                    self.call_id = delta.id
        elif kind == "tool_summary":
            self.summaries += 1
            _require(self.summaries == 1, "more than one tool summary")
            checks.check_tool_results(event.tool_summary.results, self.call_id or scenario.CALL_ID)
        elif kind == "done":
            self.done = event.done
        else:
            detail = event.error.message if kind == "error" else str(getattr(event, kind or "chunk"))
            raise checks.CheckFailed(f"event {event.sequence} is {kind}: {detail[:300]}")
        return kind

    def finish(self) -> pb.Done:
        _require(self.done is not None, f"no Done event after {self.count} events")
        _require(self.summaries == 1, "no tool summary")
        assert self.done is not None
        return self.done


def _request() -> pb.StreamSynthesisRequest:
    return pb.StreamSynthesisRequest(stage=loadgen.stage_request())


async def _open(
    plan: Plan, target: str
) -> tuple[list[grpc.aio.Channel], list[pb_grpc.ToolchainServiceAsyncStub]]:
    """The channels (`bench.loadgen`'s: a few, each its own connection), warmed up."""
    count = plan.channels or loadgen.default_channels(plan.streams)
    if plan.client_window:
        # A client whose HTTP/2 stream window stays small: no BDP probing to grow it.
        options = [
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", plan.client_window),
        ]
        channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]
    else:
        channels = loadgen.open_channels(target, count)
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 30.0)
    stubs = [pb_grpc.ToolchainServiceStub(channel) for channel in channels]
    # Warm-up: one tool-phase stage per channel (not measured: before the window opens).
    request = pb.StreamToolsRequest(stage=loadgen.stage_request())
    for _ in range(2):
        await asyncio.gather(*(_drain(stub.StreamTools(request, timeout=30)) for stub in stubs))
    return channels, stubs


def _take_stamps(content: str, now: int, last_stamp: int, gaps: list[int]) -> int:
    """The stamped tokens of one chunk that arrived at `now`: each one's send-to-arrival gap
    appended to `gaps` (ns), in send order; returns the last stamp."""
    for token in content.split():
        stamp = int(token)
        _require(stamp > last_stamp, f"token {len(gaps)} stamped out of order")
        last_stamp = stamp
        gaps.append(now - stamp)
    return last_stamp


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


async def _spread(
    plan: Plan,
    stubs: Sequence[pb_grpc.ToolchainServiceAsyncStub],
    one: Callable[[int, Any], Coroutine[Any, Any, None]],
) -> list[asyncio.Task[None]]:
    """Start `one(i, stub)` for every stream, evenly over the ramp, channels in turn."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    step = plan.ramp / max(1, plan.streams - 1) if plan.streams > 1 else 0.0
    tasks: list[asyncio.Task[None]] = []
    for i in range(plan.streams):
        delay = start + i * step - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, stubs[i % len(stubs)])))
    return tasks


async def rate_row(
    plan: Plan, children: dict[str, Child], url: str, target: str, overload: bool = False
) -> RateRow:
    """Row A, or with `overload` row C (`plan.admit`, `plan.admit_busy`: its admission)."""
    row = RateRow("rate", plan.streams, rate=plan.rate, tokens=plan.tokens)
    if overload:
        row.name, row.admit, row.admit_busy = "overload", plan.admit, plan.admit_busy
    # With a count bound, more served than it admits is the bound not holding.
    admit = row.admit if not row.admit_busy else 0
    deadline = plan.ramp + plan.tokens / plan.rate + 120.0
    request = _request()
    flight, errors = Flight(), Errors()
    ttfes: list[float] = []
    gaps: list[float] = []
    behind: list[float] = []
    events: list[int] = []
    chunks_with_tokens = 0
    refusals: list[float] = []
    with_retry = 0
    to_backend: list[float] = []

    timeline = Timeline(children)

    async def one(index: int, stub: pb_grpc.ToolchainServiceAsyncStub) -> None:
        nonlocal chunks_with_tokens, with_retry
        flight.enter()
        started = time.monotonic_ns()
        first = 0
        mine: list[int] = []
        text: list[str] = []
        last_stamp = 0
        token_chunks = 0
        stage = StageEvents()
        try:
            call = stub.StreamSynthesis(request, timeout=deadline)
            async for response in call:
                now = time.monotonic_ns()
                first = first or now
                if stage.count == 0 and response.event.error.reason == "SERVER_OVERLOADED":
                    refusals.append((now - started) / 1e9)  # admission said no, at once
                    refusal = response.event.error
                    with_retry += refusal.retryable and refusal.HasField("retry_delay")
                    call.cancel()
                    return
                kind = stage.take(response.event)
                if kind == "chunk" and response.event.chunk.phase == pb.PHASE_SYNTHESIS:
                    content = response.event.chunk.content
                    if content:
                        text.append(content)
                        token_chunks += 1
                    last_stamp = _take_stamps(content, now, last_stamp, mine)
            done_at = time.monotonic_ns()
            done = stage.finish()
            _require(len(mine) == plan.tokens, f"{len(mine)} tokens, not {plan.tokens}")
            _require(done.text == "".join(text), "Done's text is not the streamed chunks")
        except Exception as exc:
            errors.add(exc, started)
        else:
            ttfes.append((first - started) / 1e9)
            _require(stage.call_id.startswith("call_"), f"tool call id {stage.call_id!r} is not stamped")
            to_backend.append((int(stage.call_id[5:]) - started) / 1e9)
            gaps.extend(g / 1e9 for g in mine)
            behind.append((done_at - last_stamp) / 1e9)
            events.append(stage.count)
            chunks_with_tokens += token_chunks
            timeline.add(index, started, first, done_at)
        finally:
            flight.leave()

    channels, stubs = await _open(plan, target)
    first_snap = snapshot(children)
    timeline.start()
    tasks = await _spread(plan, stubs, one)
    await asyncio.gather(*tasks)
    last_snap = snapshot(children)
    await timeline.stop(row)
    for channel in channels:
        await channel.close(None)
    row.rss_peak_mb = children["server"].status_kb("VmHWM") / 1024.0
    row.wall_s = last_snap.wall - first_snap.wall
    row.cpu_s, row.other_cpu_pct = cpu_and_other(first_snap, last_snap)
    row.errors, row.ok_streams, row.max_in_flight = errors.count, len(events), flight.most
    row.error_kinds, row.error_after_s = errors.kinds, errors.after
    row.ttfe_ms, row.gap_ms, row.end_behind_ms = Summary.of(ttfes), Summary.of(gaps), Summary.of(behind)
    row.refused, row.refused_ms = len(refusals), Summary.of(refusals)
    row.refused_with_retry = with_retry
    row.to_backend_ms = Summary.of(to_backend)
    row.events_per_stage = sum(events) / max(1, len(events))
    row.tokens_per_chunk = len(gaps) / max(1, chunks_with_tokens)
    streams = [s for s in await asyncio.to_thread(backend_streams, url) if s["scenario"] == "stamped"]
    if streams:
        row.backend_lag_ms = {
            "max": max(float(s["lag_max_ms"]) for s in streams),
            "mean": sum(float(s["lag_mean_ms"]) for s in streams) / len(streams),
        }
    if errors.count or len(events) + len(refusals) != plan.streams:
        row.status = "FAILED"
        row.error = (
            f"{errors.count} errors, {len(events)}/{plan.streams} ok, {len(refusals)} refused;"
            f" first: {errors.first or '-'}"
        )
    elif with_retry != len(refusals):
        row.status = "FAILED"
        row.error = f"{len(refusals) - with_retry} of {len(refusals)} refusals carried no retry delay"
    elif admit and (not refusals or len(events) > admit):
        row.status = "FAILED"
        row.error = f"{plan.streams} calls on {admit} admitted: {len(events)} served, {len(refusals)} refused"
    return row


async def pace_stream(
    stub: pb_grpc.ToolchainServiceAsyncStub,
    tokens: int,
    timeout: float,
    gaps: list[float],
    ends: list[float],
    errors: Errors,
) -> None:
    """One stream that reads, on the `pace` backend (stamped tokens): its token-to-event
    gaps and how far behind its backend it ended, or its error."""
    request = _request()
    request.stage.backend = "pace"
    started = time.monotonic_ns()
    stage = StageEvents()
    mine: list[int] = []
    last_stamp = 0
    try:
        async for response in stub.StreamSynthesis(request, timeout=timeout):
            now = time.monotonic_ns()
            if stage.take(response.event) == "chunk" and response.event.chunk.phase == pb.PHASE_SYNTHESIS:
                last_stamp = _take_stamps(response.event.chunk.content, now, last_stamp, mine)
        done_at = time.monotonic_ns()
        stage.finish()
        _require(len(mine) == tokens, f"{len(mine)} tokens, not {tokens}")
    except Exception as exc:
        errors.add(exc, started)
    else:
        gaps.extend(g / 1e9 for g in mine)
        ends.append((done_at - last_stamp) / 1e9)


async def stall_row(plan: Plan, children: dict[str, Child], url: str, target: str) -> StallRow:
    pieces = bulk_text(plan.bulk_bytes, plan.bulk_piece)
    answer = "".join(pieces)
    expected_crc = zlib.crc32(answer.encode())
    spec = live_spec("bulk", 0, 0.0, plan.bulk_bytes, plan.bulk_piece)
    row = StallRow("stall", plan.streams, answer_bytes=len(answer), response_bytes=spec.total)
    deadline = plan.ramp + plan.stall + 300.0
    request = _request()
    flight, errors = Flight(), Errors()
    arrived = 0  # streams that have their first event (or failed before it)
    all_arrived = asyncio.Event()
    resume = asyncio.Event()
    resumed_at = 0
    ttfes: list[float] = []
    drains: list[float] = []
    events: list[int] = []

    def arrive() -> None:
        nonlocal arrived
        arrived += 1
        if arrived >= plan.streams:
            all_arrived.set()

    timeline = Timeline(children)

    async def one(index: int, stub: pb_grpc.ToolchainServiceAsyncStub) -> None:
        flight.enter()
        started = time.monotonic_ns()
        first = 0
        here = False
        stage = StageEvents()
        crc, length = 0, 0
        try:
            responses = aiter(stub.StreamSynthesis(request, timeout=deadline))
            stage.take((await anext(responses)).event)
            first = time.monotonic_ns()
            here = True
            arrive()
            await resume.wait()  # the stall: nothing more is read until the parent says
            async for response in responses:
                kind = stage.take(response.event)
                if kind == "chunk" and response.event.chunk.phase == pb.PHASE_SYNTHESIS:
                    content = response.event.chunk.content.encode()
                    crc, length = zlib.crc32(content, crc), length + len(content)
            done_at = time.monotonic_ns()
            done = stage.finish()
            _require(length == len(answer), f"{length} bytes of answer, not {len(answer)}")
            _require(crc == expected_crc, "the streamed answer is not the backend's")
            _require(zlib.crc32(done.text.encode()) == expected_crc, "Done's text is not the answer")
        except Exception as exc:
            errors.add(exc, started)
            if not here:
                arrive()
        else:
            ttfes.append((first - started) / 1e9)
            drains.append((done_at - resumed_at) / 1e9)
            events.append(stage.count)
            timeline.add(index, started, first, done_at)
        finally:
            flight.leave()

    channels, stubs = await _open(plan, target)
    client_rss = proc_status_kb(os.getpid(), "VmRSS")
    first_snap = snapshot(children)
    timeline.start()
    tasks = await _spread(plan, stubs, one)
    done_early: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*tasks))
    waiter: asyncio.Future[Any] = asyncio.ensure_future(all_arrived.wait())
    await asyncio.wait([waiter, done_early], timeout=plan.ramp + 120.0, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    row.stall_s = plan.stall
    # The stall begins: streams that read, on a backend of their own, through a channel
    # with grpc's defaults, while the stalled ones hold on.
    pace_channel: grpc.aio.Channel | None = None
    pace_gaps: list[float] = []
    pace_ends: list[float] = []
    pace_errors = Errors()
    pace: asyncio.Future[Any] | None = None
    if "pace" in children and plan.pace_streams:
        pace_channel = grpc.aio.insecure_channel(target)
        pace_stub = pb_grpc.ToolchainServiceStub(pace_channel)
        pace = asyncio.gather(
            *(
                pace_stream(pace_stub, plan.tokens, deadline, pace_gaps, pace_ends, pace_errors)
                for _ in range(plan.pace_streams)
            )
        )
    await asyncio.sleep(plan.stall)
    if pace is not None and pace_channel is not None:
        await pace
        await pace_channel.close(None)
        row.pace_ok, row.pace_errors = len(pace_ends), pace_errors.kinds
        row.pace_gap_ms, row.pace_end_ms = Summary.of(pace_gaps), Summary.of(pace_ends)
    server = children["server"]
    row.rss_at_stall_mb = server.status_kb("VmRSS") / 1024.0
    row.rss_peak_at_stall_mb = server.status_kb("VmHWM") / 1024.0
    row.client_rss_growth_mb = (proc_status_kb(os.getpid(), "VmRSS") - client_rss) / 1024.0
    in_flight_at_stall = flight.now
    per_stream = 1024.0 * plan.streams
    row.kernel_kib = {
        "backend_to_service": tcp_queued(urlsplit(url).port or 0) / per_stream,
        "service_to_client": tcp_queued(int(target.rsplit(":", 1)[1])) / per_stream,
    }
    streams = [s for s in await asyncio.to_thread(backend_streams, url) if s["scenario"] == "bulk"]
    resumed_at = time.monotonic_ns()
    resume.set()
    await done_early
    last_snap = snapshot(children)
    await timeline.stop(row)
    for channel in channels:
        await channel.close(None)
    row.rss_peak_mb = server.status_kb("VmHWM") / 1024.0
    row.wall_s = last_snap.wall - first_snap.wall
    row.cpu_s, row.other_cpu_pct = cpu_and_other(first_snap, last_snap)
    row.errors, row.ok_streams, row.error_kinds = errors.count, len(events), errors.kinds
    row.error_after_s = errors.after
    row.max_in_flight = max(flight.most, in_flight_at_stall)
    row.ttfe_ms, row.drain_ms = Summary.of(ttfes), Summary.of(drains)
    row.events_per_stage = sum(events) / max(1, len(events))
    sent = sorted(float(s["sent"]) for s in streams)
    if sent:
        row.sent_kib = {
            "p50": sent[len(sent) // 2] / 1024.0,
            "min": sent[0] / 1024.0,
            "max": sent[-1] / 1024.0,
            "mean": sum(sent) / len(sent) / 1024.0,
        }
        row.sent_pct = 100.0 * sum(sent) / len(sent) / max(1, spec.total)
        row.complete_at_stall = sum(1 for s in streams if s["done"])
    problems = []
    if errors.count or len(events) != plan.streams:
        problems.append(
            f"{errors.count} errors, {len(events)}/{plan.streams} ok; first: {errors.first or '-'}"
        )
    if len(streams) != plan.streams:
        problems.append(f"the backend saw {len(streams)} answers by the stall's end, not {plan.streams}")
    if pace_errors.count:
        problems.append(f"{pace_errors.count} of the reading streams failed; first: {pace_errors.first}")
    if problems:
        row.status, row.error = "FAILED", "; ".join(problems)
    return row


# -- the run ----------------------------------------------------------------------------


async def run_row(plan: Plan, kind: str, log_dir: Path, say: Callable[[str], None]) -> Common:
    """One row with a backend and a service of its own; a row whose processes fail is FAILED."""
    env: dict[str, str] = {}
    if kind == "overload":
        # Row C: twice the admitted concurrency, the service's admission set to it.
        plan = replace(plan, streams=2 * plan.admit)
        if plan.admit_busy:  # adaptive: the loop's load admits, the count bound is the default
            env["TOOLCHAIN_ADMISSION_MAX_LOOP_BUSY"] = f"{plan.admit_busy:g}"
        else:
            env["TOOLCHAIN_MAX_CONCURRENT_STAGES"] = str(plan.admit)
    if kind in ("rate", "overload"):
        args = ["--scenario", "stamped", "--rate", f"{plan.rate:g}", "--tokens", str(plan.tokens)]
        admitted = ""
        if kind == "overload":
            admitted = (
                f" (admission: event loop at most {plan.admit_busy:.0%} busy)"
                if plan.admit_busy
                else f" on {plan.admit} admitted (max_concurrent_stages)"
            )
        say(
            f"{kind}: {plan.streams} streams x {plan.tokens} tokens at {plan.rate:g} tokens/s{admitted},"
            f" opened over {plan.ramp:g} s ..."
        )
    else:
        args = [
            "--scenario",
            "bulk",
            "--bulk-bytes",
            str(plan.bulk_bytes),
            "--bulk-piece",
            str(plan.bulk_piece),
        ]
        say(f"stall: {plan.streams} streams of {plan.bulk_bytes} B answers, stalled {plan.stall:g} s ...")
    started: list[Child] = []
    row: Common
    try:
        backend, url = start_backend(log_dir, f"backend-{kind}", args)
        started.append(backend)
        pace: dict[str, Child] = {}
        pace_url = None
        if kind == "stall" and plan.pace_streams:
            stamped = ["--scenario", "stamped", "--rate", f"{plan.rate:g}", "--tokens", str(plan.tokens)]
            pace["pace"], pace_url = start_backend(log_dir, "backend-pace", stamped)
            started.append(pace["pace"])
        service, target = start_service(log_dir, url, plan.max_connections, env, pace_url)
        started.append(service)
        children = {"server": service, "backend": backend, **pace}
        if kind == "overload":
            row = await rate_row(plan, children, url, target, overload=True)
        elif kind == "rate":
            row = await rate_row(plan, children, url, target)
        else:
            row = await stall_row(plan, children, url, target)
        for child in started:
            if not child.alive():
                row.status, row.error = "FAILED", f"{child.name} died:\n{child.log_tail()}"
    except (ChildFailed, OSError) as exc:
        row = StallRow(kind, plan.streams) if kind == "stall" else RateRow(kind, plan.streams)
        row.status, row.error = "FAILED", str(exc)
    finally:
        for child in reversed(started):
            child.stop()
    say(f"  {'ok' if row.ok else 'FAILED: ' + row.error.splitlines()[0]} ({row.wall_s:.1f} s)")
    return row


def render(headers: Sequence[str], lines: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """A plain-text table as `bench.run` prints one: the first `left` columns left-aligned."""
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(headers)]

    def one(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left or i == len(headers) - 1 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [one(headers), one(["-" * w for w in widths]), *(one(c) for c in lines)]


def _f(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def _common_cells(row: Common) -> list[str]:
    return [
        _f(row.cpu_s.get("service", 0.0), 2),
        _f(row.cpu_s.get("backend", 0.0), 2),
        _f(row.cpu_s.get("client", 0.0), 2),
        _f(row.rss_peak_mb, 0),
        _f(row.other_cpu_pct, 0),
        str(row.errors),
        "ok" if row.ok else "FAILED",
    ]


_COMMON = ["srv CPU s", "be CPU s", "cli CPU s", "RSS MB", "other%", "errors", "status"]


def tables(rows: Sequence[Common]) -> list[str]:
    out: list[str] = []
    rate = [r for r in rows if isinstance(r, RateRow)]
    if rate:
        headers = [
            "row",
            "streams",
            "tok/s",
            "tokens",
            "in flight",
            "streaming",
            "wall s",
            "TTFE50",
            "TTFE99",
            "to-be50",
            "to-be99",
            "gap50",
            "gap99",
            "end50",
            "end99",
            "ev/stage",
            "tok/chunk",
            "refused",
            "refused99",
            *_COMMON,
        ]
        lines = [
            [
                r.name,
                str(r.streams),
                f"{r.rate:g}",
                str(r.tokens),
                str(r.max_in_flight),
                str(r.streaming_max),
                _f(r.wall_s),
                _f(r.ttfe_ms.p50),
                _f(r.ttfe_ms.p99),
                _f(r.to_backend_ms.p50),
                _f(r.to_backend_ms.p99),
                _f(r.gap_ms.p50),
                _f(r.gap_ms.p99),
                _f(r.end_behind_ms.p50),
                _f(r.end_behind_ms.p99),
                _f(r.events_per_stage),
                _f(r.tokens_per_chunk, 2),
                str(r.refused),
                _f(r.refused_ms.p99) if r.refused else "",
                *_common_cells(r),
            ]
            for r in rate
        ]
        out += [
            "",
            "A. real-rate streams (TTFE; to-be = call start -> its tool-phase request at the backend,"
            " the wait before a handler ran; gap = backend token send -> its event at the client,"
            " end = last token send -> Done; ms)",
        ]
        out += render(headers, lines)
    stall = [r for r in rows if isinstance(r, StallRow)]
    if stall:
        headers = [
            "row",
            "streams",
            "answer KiB",
            "stall s",
            "in flight",
            "streaming",
            "wall s",
            "TTFE50",
            "TTFE99",
            "sent50 KiB",
            "sent max KiB",
            "sent %",
            "done@stall",
            "kern be>srv KiB",
            "kern srv>cli KiB",
            "cli +MB",
            "RSS@stall MB",
            "drain50 s",
            "drain99 s",
            "ev/stage",
            *_COMMON,
        ]
        lines = [
            [
                r.name,
                str(r.streams),
                _f(r.answer_bytes / 1024.0, 0),
                f"{r.stall_s:g}",
                str(r.max_in_flight),
                str(r.streaming_max),
                _f(r.wall_s),
                _f(r.ttfe_ms.p50),
                _f(r.ttfe_ms.p99),
                _f(r.sent_kib.get("p50", 0.0)),
                _f(r.sent_kib.get("max", 0.0)),
                _f(r.sent_pct),
                str(r.complete_at_stall),
                _f(r.kernel_kib.get("backend_to_service", 0.0)),
                _f(r.kernel_kib.get("service_to_client", 0.0)),
                _f(r.client_rss_growth_mb, 0),
                _f(r.rss_at_stall_mb, 0),
                _f(r.drain_ms.p50 / 1000.0, 2),
                _f(r.drain_ms.p99 / 1000.0, 2),
                _f(r.events_per_stage),
                *_common_cells(r),
            ]
            for r in stall
        ]
        out += [
            "",
            "B. stalled readers (sent = bytes of each answer's response the backend had sent when the"
            " stall ended; RSS = service peak over the whole row)",
        ]
        out += render(headers, lines)
    return out


def report_text(plan: Plan, rows: Sequence[Common], seconds: float) -> str:
    load = os.getloadavg()
    channels = plan.channels or loadgen.default_channels(plan.streams)
    lines = [
        "",
        f"toolchain-grpc real-rate benchmark: {platform.python_implementation()} {platform.python_version()},"
        f" {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {seconds:.0f} s",
        f"{plan.streams} StreamSynthesis calls per row (overload: {2 * plan.admit}) on {channels} channels,"
        " started evenly over"
        f" {plan.ramp:g} s; service backend pool {plan.max_connections} connections",
        "legend: srv/be/cli CPU s = CPU seconds of the service / fake backend / this client over the row;"
        " RSS = service peak (VmHWM);",
        "  other% = machine CPU used outside the benchmark's processes (others' load); in flight = most"
        " calls open at once;",
        "  streaming = most stages between their first event and Done at once",
        *tables(rows),
    ]
    notes = []
    for r in rows:
        if isinstance(r, RateRow) and r.backend_lag_ms:
            lag = r.backend_lag_ms
            notes.append(
                f"{r.name}: the backend sent its tokens up to {lag['max']:.1f} ms behind its schedule (mean"
                f" {lag['mean']:.2f} ms); max: TTFE {r.ttfe_ms.max:.1f} ms, gap {r.gap_ms.max:.1f} ms,"
                f" end {r.end_behind_ms.max:.1f} ms"
            )
        if isinstance(r, RateRow) and r.admit:
            notes.append(
                f"{r.name}: {r.streams} calls on"
                + (f" a loop-load admission ({r.admit_busy:.0%})" if r.admit_busy else f" {r.admit} admitted")
                + f": {r.ok_streams} served, {r.refused}"
                f" refused ({r.refused_with_retry} with a retry delay); before the handler: served p99"
                f" {r.to_backend_ms.p99:.1f} ms, max {r.to_backend_ms.max:.1f} ms (target <= 50);"
                f" refused p99 {r.refused_ms.p99:.1f} ms, max {r.refused_ms.max:.1f} ms (target <= 50)"
            )
        if isinstance(r, StallRow) and r.sent_kib:
            sent = r.sent_kib
            notes.append(
                f"stall: each answer is {r.response_bytes} B of SSE ({r.answer_bytes} B of text); when the"
                f" stall ended the backend had sent {sent.get('min', 0):.0f}-{sent.get('max', 0):.0f} KiB"
                f" (mean {sent.get('mean', 0):.0f}) of each; service RSS then {r.rss_at_stall_mb:.0f} MB"
                f" (peak so far {r.rss_peak_at_stall_mb:.0f}), peak over the row {r.rss_peak_mb:.0f} MB"
            )
        if isinstance(r, StallRow) and (r.pace_ok or r.pace_errors):
            notes.append(
                f"stall: {plan.pace_streams} streams that read ({plan.tokens} tokens at {plan.rate:g}/s on a"
                f" backend of their own), opened as the stall began: {r.pace_ok} ended well; token to event"
                f" p50 {r.pace_gap_ms.p50:.1f} ms, p99 {r.pace_gap_ms.p99:.1f} ms,"
                f" max {r.pace_gap_ms.max:.1f};"
                f" ended behind their backend p50 {r.pace_end_ms.p50:.1f} ms, p99 {r.pace_end_ms.p99:.1f} ms"
            )
            for kind, count in r.pace_errors.items():
                notes.append(f"stall: reading streams: {count} x {kind}")
    for r in rows:
        if r.cpu_peak_pct:
            busiest = ", ".join(f"{name} {pct:.0f}%" for name, pct in r.cpu_peak_pct.items())
            notes.append(f"{r.name}: the busiest second of each process (% of one core): {busiest}")
        if r.ttfe_by_start_ms:
            tenths = " ".join(f"{v:.0f}" for v in r.ttfe_by_start_ms)
            notes.append(f"{r.name}: TTFE p50 by tenth of the streams in start order (ms): {tenths}")
        for kind, count in sorted(r.error_kinds.items(), key=lambda item: -item[1]):
            notes.append(f"{r.name}: {count} x {kind}")
        if r.error_after_s:
            low, high = r.error_after_s
            notes.append(f"{r.name}: the failed calls failed {low:.1f}-{high:.1f} s after their start")
    failed = [r for r in rows if not r.ok]
    if notes:
        lines += ["", "notes:", *(f"  {n}" for n in notes)]
    if failed:
        lines += ["", "FAILED rows (first error):", *(f"  {r.name}: {r.error}" for r in failed)]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.realrate", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="50 streams, 2 s of streaming, a 2 s stall")
    parser.add_argument("--streams", "-n", type=int, default=None, help="concurrent streams per row (1000)")
    parser.add_argument("--rate", type=float, default=20.0, help="row A: tokens per second per stream")
    parser.add_argument("--tokens", type=int, default=None, help="row A: tokens per answer (100)")
    parser.add_argument("--ramp", type=float, default=None, help="seconds over which the calls start (1.5)")
    parser.add_argument("--channels", type=int, default=0, help="0: bench.loadgen's default for N callers")
    parser.add_argument("--bulk-bytes", type=int, default=1 << 20, help="row B: characters per answer")
    parser.add_argument("--bulk-piece", type=int, default=4096, help="row B: characters per backend event")
    parser.add_argument("--stall", type=float, default=None, help="row B: seconds the readers stop (10)")
    parser.add_argument(
        "--max-connections", type=int, default=0, help="the service's backend pool; 0: max(256, streams)"
    )
    parser.add_argument(
        "--client-window",
        type=int,
        default=0,
        help="bytes: the client's HTTP/2 stream window, without BDP probing; 0: grpc's defaults",
    )
    parser.add_argument(
        "--admit",
        type=int,
        default=None,
        help="row C: the service's max_concurrent_stages; the row opens twice as many calls (100)",
    )
    parser.add_argument(
        "--admit-busy",
        type=float,
        default=0.0,
        help="row C: admit by the service's event-loop load instead (admission_max_loop_busy, e.g. 0.7)",
    )
    parser.add_argument(
        "--row", action="append", choices=("rate", "stall", "overload"), help="only these rows"
    )
    parser.add_argument(
        "--pace-streams",
        type=int,
        default=None,
        help="row B: streams that read at --rate on a backend of their own during the stall (50; 0: none)",
    )
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--logs", default="", help="directory for the children's logs (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    streams, tokens, ramp, stall = (50, 40, 0.5, 2.0) if args.smoke else (1000, 100, 1.5, 10.0)
    streams = args.streams if args.streams is not None else streams
    if streams < 1 or args.rate <= 0:
        raise SystemExit("--streams and --rate must be positive")
    return Plan(
        streams=streams,
        rate=args.rate,
        tokens=args.tokens if args.tokens is not None else tokens,
        ramp=args.ramp if args.ramp is not None else ramp,
        channels=args.channels,
        bulk_bytes=args.bulk_bytes,
        bulk_piece=args.bulk_piece,
        stall=args.stall if args.stall is not None else stall,
        max_connections=args.max_connections or max(256, streams),
        rows=list(args.row or ("rate", "stall", "overload")),
        client_window=args.client_window,
        admit=args.admit if args.admit is not None else (25 if args.smoke else 100),
        admit_busy=args.admit_busy,
        pace_streams=args.pace_streams if args.pace_streams is not None else (5 if args.smoke else 50),
    )


def check_settings(plan: Plan) -> None:
    """The service's settings must let every stream run and every bulk answer through."""
    settings = scenario.service_settings("http://127.0.0.1:1/v1", plan.max_connections)
    if settings.max_concurrent_stages < plan.streams:
        # bench.service_proc builds production settings, which read TOOLCHAIN_* variables.
        os.environ["TOOLCHAIN_MAX_CONCURRENT_STAGES"] = str(plan.streams)
    total = live_spec("bulk", 0, 0.0, plan.bulk_bytes, plan.bulk_piece).total
    limit = settings.backends["fake"].max_response_bytes
    if "stall" in plan.rows and total > limit:
        raise SystemExit(f"a {total} B bulk response is over the service's max_response_bytes ({limit})")


async def amain(plan: Plan, log_dir: Path, say: Callable[[str], None]) -> list[Common]:
    return [await run_row(plan, kind, log_dir, say) for kind in plan.rows]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    check_settings(plan)
    started = time.time()

    def say(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-realrate-") as tmp:
        log_dir = Path(args.logs) if args.logs else Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            rows = common.run(amain(plan, log_dir, say))
        except KeyboardInterrupt:
            return 1
        print(report_text(plan, rows, time.time() - started), flush=True)
        if args.json:
            out = {
                "meta": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "loadavg_end": os.getloadavg(),
                    "seconds": time.time() - started,
                    "plan": asdict(plan),
                },
                "rows": [asdict(r) | {"kind": type(r).__name__} for r in rows],
            }
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
