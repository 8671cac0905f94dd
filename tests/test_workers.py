"""`toolchain serve --workers 2`, the real command as a child process: both workers serve
the one port, SIGTERM drains both and the supervisor exits 0, a killed worker is
restarted, and configurations that cannot work stop it with exit code 2 and one line.

Which process served a stage is read from the workers' own log lines (JSON, on the
supervisor's stderr): each carries the worker's `pid`, the stage line its `stage_id`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from pydantic import ValidationError
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc
from toolchain_service.config import ClusterSettings, Settings
from toolchain_service.workers import worker_settings

from tests.conftest import collect, kinds, stage
from tests.fakes.openai_backend import FakeBackend, SSEReply, text_chunks
from tests.fakes.redis_server import free_port
from tests.fakes.server_process import LISTENING, SERVE, ServerProcess, run_serve, serve_env
from tests.test_drain import assert_clean_exit

GRACE = 1.0
START_TIMEOUT = 60.0  # three interpreters start on a shared 2-core machine
#: Connections land on a worker by the kernel's hash of their addresses: with at most this
#: many channels, both workers get one but with probability 2^-39 (per search).
MAX_CHANNELS = 40
Record = dict[str, Any]


@dataclass
class Workers:
    """A running `serve --workers 2`, its stdout lines and its stderr's JSON log records."""

    server: ServerProcess
    address: str = ""
    records: list[Record] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def pump(self, stream: asyncio.StreamReader, into: list[str], parse: bool) -> None:
        while raw := await stream.readline():
            line = raw.decode(errors="replace")
            into.append(line)
            if parse:
                with contextlib.suppress(ValueError):
                    self.records.append(json.loads(line))
            self.changed.set()

    async def wait_for(self, predicate: Callable[[Record], bool], what: str, timeout: float = 10.0) -> Record:
        """The first log record matching `predicate`, waited for."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for record in self.records:
                        if predicate(record):
                            return record
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"no log record {what} within {timeout}s:\n{self.server.stderr_text}"
            ) from None

    async def wait_stdout(self, prefix: str, timeout: float = START_TIMEOUT) -> str:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for line in self.server.stdout:
                        if line.startswith(prefix):
                            return line.removeprefix(prefix).strip()
                    if self.server.process.returncode is not None:
                        break
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pass
        raise AssertionError(f"no stdout line {prefix!r}; stderr:\n{self.server.stderr_text}")

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid of its latest start, from the workers' listening lines."""
        return {
            r["worker"]: r["pid"]
            for r in self.records
            if r.get("message", "").startswith(LISTENING) and "worker" in r
        }

    async def pid_of_stage(self, stage_id: str) -> int:
        record = await self.wait_for(
            lambda r: r.get("event") == "stage_end" and r.get("stage_id") == stage_id,
            f"for stage {stage_id}",
        )
        pid: int = record["pid"]
        return pid


async def start_workers(env: Mapping[str, str], *args: str) -> Workers:
    process = await asyncio.create_subprocess_exec(
        *SERVE,
        "--workers",
        "2",
        "--log-format",
        "json",
        *args,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    workers = Workers(ServerProcess(process))
    workers.server._readers += [
        asyncio.create_task(workers.pump(process.stdout, workers.server.stdout, parse=False)),
        asyncio.create_task(workers.pump(process.stderr, workers.server.stderr, parse=True)),
    ]
    try:
        workers.address = (await workers.wait_stdout(LISTENING)).split()[0]
    except BaseException:
        await workers.server.close()
        raise
    return workers


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
async def workers(fake: FakeBackend, port: int) -> AsyncIterator[Workers]:
    """`serve --workers 2` on a fixed port; at the end, the test must have stopped it (a
    SIGTERM is sent otherwise), and it must have exited 0 without leftovers."""
    started = await start_workers(serve_env(fake, address=f"127.0.0.1:{port}", shutdown_grace=str(GRACE)))
    try:
        yield started
        if started.server.process.returncode is None:
            started.server.process.send_signal(signal.SIGTERM)
        assert await started.server.wait(20.0) == 0
        assert_clean_exit(started.server.stderr_text)
    finally:
        await started.server.close()


@dataclass
class Channel:
    channel: grpc.aio.Channel
    stub: pb_grpc.ToolchainServiceAsyncStub
    pid: int


async def channel_on(
    workers: Workers, want: Callable[[int], bool], opened: list[grpc.aio.Channel]
) -> Channel:
    """A channel (its own TCP connection) whose stages a worker with a wanted pid serves:
    new channels, one quick RunTools stage each, until one lands there."""
    for _ in range(MAX_CHANNELS):
        channel = grpc.aio.insecure_channel(workers.address, options=[("grpc.use_local_subchannel_pool", 1)])
        opened.append(channel)
        stub = pb_grpc.ToolchainServiceStub(channel)
        stage_id = f"probe-{uuid.uuid4()}"
        response = await stub.RunTools(pb.RunToolsRequest(stage=stage(stage_id=stage_id)), timeout=10)
        assert response.stage_id == stage_id
        pid = await workers.pid_of_stage(stage_id)
        if want(pid):
            return Channel(channel, stub, pid)
    raise AssertionError(f"{MAX_CHANNELS} channels, none landed on the wanted worker")


@contextlib.asynccontextmanager
async def channels() -> AsyncIterator[list[grpc.aio.Channel]]:
    opened: list[grpc.aio.Channel] = []
    try:
        yield opened
    finally:
        for channel in opened:
            await channel.close(None)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


# --- both workers serve; SIGTERM drains both ----------------------------------------


async def test_stages_land_on_both_workers_and_sigterm_drains_both(
    fake: FakeBackend, workers: Workers
) -> None:
    pids = workers.worker_pids()
    assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2, workers.server.stderr_text
    assert workers.server.process.pid not in pids.values()  # the supervisor serves nothing itself
    async with channels() as opened:
        first = await channel_on(workers, lambda pid: pid in pids.values(), opened)
        second = await channel_on(workers, lambda pid: pid != first.pid, opened)
        assert {first.pid, second.pid} == set(pids.values())

        # A stage running on each worker, then SIGTERM to the supervisor: both drain.
        fake.script(*(SSEReply(text_chunks("this answer never ends"), stall_after=2) for _ in range(2)))
        streams = [
            on.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id=f"long-{i}")), timeout=20)
            for i, on in enumerate((first, second))
        ]
        for stream in streams:
            response = await stream.read()
            assert isinstance(response, pb.StreamSynthesisResponse) and response.event.HasField("chunk")
        workers.server.process.send_signal(signal.SIGTERM)
        for i, stream in enumerate(streams):
            events, code = await collect(stream)
            assert code == grpc.StatusCode.CANCELLED, (i, code)
            assert kinds(events)[-1] == "cancel" and events[-1].cancel.reason == pb.CANCEL_REASON_SHUTDOWN
        assert {await workers.pid_of_stage(f"long-{i}") for i in range(2)} == set(pids.values())
    assert await workers.server.wait(20.0) == 0
    stopped = {r["pid"] for r in workers.records if r.get("message") == "server stopped"}
    assert stopped == set(pids.values())


async def test_each_worker_serves_metrics_on_its_own_port(fake: FakeBackend) -> None:
    for _ in range(20):  # two adjacent free ports
        metrics = free_port()
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind(("127.0.0.1", metrics + 1))
            break
    else:
        raise AssertionError("no two adjacent free ports")
    env = serve_env(fake, address=f"127.0.0.1:{free_port()}", metrics_address=f"127.0.0.1:{metrics}")
    workers = await start_workers(env)
    try:
        lines = [line.strip() for line in workers.server.stdout if line.startswith("toolchain metrics on ")]
        assert lines == [
            f"toolchain metrics on http://127.0.0.1:{metrics + i}/metrics (worker {i})" for i in range(2)
        ]
        for i in range(2):
            assert "toolchain_stages_total" in await asyncio.to_thread(
                fetch, f"http://127.0.0.1:{metrics + i}/metrics"
            )
        workers.server.process.send_signal(signal.SIGINT)
        assert await workers.server.wait(20.0) == 0
        assert_clean_exit(workers.server.stderr_text)
    finally:
        await workers.server.close()


# --- a worker that dies is restarted ------------------------------------------------


async def test_a_killed_worker_is_restarted_and_serves_again(workers: Workers) -> None:
    pids = workers.worker_pids()
    os.kill(pids[1], signal.SIGKILL)
    await workers.wait_for(
        lambda r: (
            r.get("logger") == "toolchain.workers"
            and r.get("worker") == 1
            and "killed by SIGKILL: restarting it in" in r.get("message", "")
        ),
        "of the supervisor about the kill",
    )
    again = await workers.wait_for(
        lambda r: r.get("message") == "worker 1 listening again", "of the restart", timeout=START_TIMEOUT
    )
    new_pid = workers.worker_pids()[1]
    assert again["pid"] == new_pid and new_pid not in pids.values()
    async with channels() as opened:
        restarted = await channel_on(workers, lambda pid: pid == new_pid, opened)
        response = await restarted.stub.RunTools(pb.RunToolsRequest(stage=stage()), timeout=10)
        assert response.stage_id
        await channel_on(workers, lambda pid: pid == pids[0], opened)  # the other one never stopped


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(fake: FakeBackend, port: int) -> None:
    workers = await start_workers(serve_env(fake, address=f"127.0.0.1:{port}", shutdown_grace=str(GRACE)))
    try:
        pids = set(workers.worker_pids().values())
        workers.server.process.kill()
        assert await workers.server.process.wait() == -signal.SIGKILL
        # The workers hold the write end of the stderr pipe: its end means both exited.
        async with asyncio.timeout(20.0):
            await asyncio.gather(*workers.server._readers)
        assert {r["pid"] for r in workers.records if r.get("message") == "server stopped"} == pids
        assert_clean_exit(workers.server.stderr_text)
    finally:
        await workers.server.close()


# --- configurations that cannot work: exit 2, one line, no worker -------------------


async def test_workers_with_port_0_exit_2_with_one_line(fake: FakeBackend) -> None:
    code, out, err = await run_serve(serve_env(fake), "--workers", "2")  # serve_env: port 0
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "invalid configuration: workers: 2 > 1 needs a fixed port in address, not '127.0.0.1:0'"
    ]


@pytest.mark.parametrize(
    ("settings", "args", "message"),
    [
        ({"shutdown_grace": "-1"}, ("--workers", "2"), "invalid configuration: shutdown_grace: "),
        (
            {},
            ("--workers", "0"),
            "invalid configuration: workers: Input should be greater than or equal to 1",
        ),
        ({"workers": "65"}, (), "invalid configuration: workers: Input should be less than or equal to 64"),
        (
            {"workers": "2", "metrics_address": "127.0.0.1:65535"},
            (),
            "invalid configuration: metrics_address: port 65535 + worker index up to 1 passes 65535",
        ),
        # found while building the parts: told once, by worker 0, and worker 1 never starts
        (
            {"tools__plugins": '["no-such-plugin"]'},
            ("--workers", "2"),
            "invalid configuration: tools.plugins: ",
        ),
    ],
    ids=["bad-setting", "workers-0", "workers-65", "metrics-port-range", "missing-plugin"],
)
async def test_a_bad_configuration_exits_2_with_one_line(
    fake: FakeBackend, port: int, settings: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    env = serve_env(fake, address=f"127.0.0.1:{port}", **settings)
    code, out, err = await run_serve(env, *args, timeout=START_TIMEOUT)
    assert (code, out) == (2, ""), err
    assert len(err.splitlines()) == 1 and err.startswith(message), err


# --- what each worker gets -------------------------------------------------------------


def test_each_worker_gets_its_metrics_port_and_replica_id() -> None:
    base = Settings(
        address="127.0.0.1:50051",
        workers=3,
        metrics_address="127.0.0.1:9464",
        cluster=ClusterSettings(redis_url="redis://127.0.0.1:6379", replica_id="node-a"),
    )
    mine = [worker_settings(base, i) for i in range(3)]
    assert [s.metrics_address for s in mine] == [f"127.0.0.1:{9464 + i}" for i in range(3)]
    assert [s.cluster.replica_id for s in mine] == ["node-a-w0", "node-a-w1", "node-a-w2"]
    assert all(s.address == base.address and s.workers == 3 for s in mine)

    free = Settings(address="127.0.0.1:50051", workers=2, metrics_address="127.0.0.1:0")
    assert [worker_settings(free, i).metrics_address for i in range(2)] == ["127.0.0.1:0"] * 2
    assert worker_settings(free, 1).cluster.replica_id == ""  # each process makes its own

    with pytest.raises(ValidationError, match="with the worker suffix"):
        Settings(address="127.0.0.1:50051", workers=2, cluster=ClusterSettings(replica_id="r" * 99))
