"""A deployment for the cluster tests, every part a real process started here: Redis, three
replicas (`python -m toolchain_client serve`, each with TOOLCHAIN_CLUSTER__REDIS_URL and
its own TOOLCHAIN_CLUSTER__REPLICA_ID) against one fake OpenAI backend in this process,
and nginx proxies (`grpc_pass`, tests/fakes/grpc_proxy.py) in front of the replicas.

    async with open_cluster() as cluster:
        stub = cluster.stub(cluster.proxies[0])
        ...

Leaving the block stops every part and checks how each ended: a replica must exit 0
on SIGTERM without a traceback in its log, redis-server and nginx with status 0.
`cluster.explained()` around a test's body prints every process's log when the body
fails (pytest shows it with the failure).

The backend answers by the stage's kind and number, the `[kind] stage n` that opens its
user prompt (`prompt(kind, n)`): every tool round calls the calculator once (tool-phase
chunks, a tool summary), then the synthesis answer streams `CHUNKS` words, `CHUNK_DELAY`
seconds apart, so that stages overlap:

* `alone`: just that;
* `cancel`: the synthesis sends its first two words, then nothing until the stage is
  cancelled (the response stays open), so a CancelStage surely finds it running;
* `cut` (asked with max_rounds 2): its second tool round waits for `script.gates["cut"]`
  (the test sets it once it cut the stream), so the stage surely runs when it is cut and
  makes events while no caller is attached; its synthesis waits for `script.resumed(n)`
  (set once the ResumeStage stream delivered the second round's summary), so the stage
  cannot end, and its log expire, before it is resumed;
* `hold`: the synthesis does not start before `script.gates["hold"]` is set (stages that
  surely run while a replica drains).

Which replica ran a stage: each replica logs one JSON line per stage it ran
(`"event": "stage_end"`, with `rpc` and `stage_id`; `observe.py`), on its own stderr,
which the test holds per replica (`ran_stages`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from tests.fakes.grpc_proxy import GrpcProxy, close_grpc_proxy, start_grpc_proxy
from tests.fakes.openai_backend import (
    FakeBackend,
    JSONObject,
    Reply,
    SSEReply,
    text_chunks,
    tool_call_chunks,
)
from tests.fakes.redis_server import RedisServer, start_redis
from tests.fakes.server_process import ServerProcess, serve_env, start_serve

REPLICAS: Final = 3
CHUNKS: Final = 20
CHUNK_DELAY: Final = 0.02
#: What a replica gets to finish its stages on SIGTERM (the drain test's open streams).
SHUTDOWN_GRACE: Final = 30.0
#: Short, so that the event logs of ended stages leave Redis within the test.
EVENT_LOG_TTL: Final = 2.0
#: Long: a stage whose stream was cut waits this long for its ResumeStage.
RESUME_GRACE: Final = 60.0

#: The replicas' liveness keys in Redis (service/toolchain_service/cluster/registry.py).
HEARTBEAT_PREFIX: Final = "tc:replica:"
_CALL: Final = ("calculator", {"expression": "2+3"})


_PROMPT: Final = re.compile(r"\[(?P<kind>\w+)\] stage (?P<n>\d+):")


def prompt(kind: str, n: int) -> str:
    return f"[{kind}] stage {n}: what is 2+3?"


def _tag(request: JSONObject) -> tuple[str, int]:
    """The kind and number of `prompt(kind, n)` in the request's user message."""
    for message in request.get("messages") or ():
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str) and (match := _PROMPT.match(content)):
                return match["kind"], int(match["n"])
    return "alone", -1


def _tool_results(request: JSONObject) -> int:
    return sum(isinstance(m, dict) and m.get("role") == "tool" for m in request.get("messages") or ())


class StageScript:
    """The backend's handler: a calculator call per tool round, then the kind's answer."""

    def __init__(self, *, chunks: int = CHUNKS, chunk_delay: float = CHUNK_DELAY) -> None:
        self.gates = {"cut": asyncio.Event(), "hold": asyncio.Event()}
        self._resumed: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        words = " ".join(f"word{i}" for i in range(chunks))
        self._tool = SSEReply(tool_call_chunks([_CALL], ids=["call_calc"], usage=(60, 12)), delay=chunk_delay)
        self._text = SSEReply(text_chunks(words, usage=(90, chunks)), delay=chunk_delay)
        # role chunk + two words, then the response stays open until the stage is cancelled
        self._stalled = SSEReply(text_chunks(words, usage=(90, chunks)), delay=chunk_delay, stall_after=3)

    def resumed(self, n: int) -> asyncio.Event:
        """Set it when cut stage `n`'s ResumeStage stream is attached: its synthesis starts."""
        return self._resumed[n]

    async def __call__(self, request: JSONObject) -> Reply:
        kind, n = _tag(request)
        if request.get("tools"):  # a tool round (the synthesis offers no tools)
            if kind == "cut" and _tool_results(request):
                await self.gates["cut"].wait()
            return self._tool
        if kind == "cancel":
            return self._stalled
        if kind == "cut":
            await self.resumed(n).wait()
        elif kind == "hold":
            await self.gates["hold"].wait()
        return self._text


@dataclass
class Replica:
    name: str
    server: ServerProcess

    @property
    def address(self) -> str:
        return self.server.address

    def log_records(self) -> Iterator[dict[str, Any]]:
        for line in list(self.server.stderr):
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        yield record

    def ran_stages(self, rpc: str) -> set[str]:
        """The stage ids of this replica's `stage_end` lines for `rpc`."""
        return {
            str(record.get("stage_id"))
            for record in self.log_records()
            if record.get("event") == "stage_end" and record.get("rpc") == rpc
        }

    async def stop(self, timeout: float = SHUTDOWN_GRACE + 15.0) -> None:
        """SIGTERM (unless it already ended); it must exit 0 with no traceback."""
        if self.server.process.returncode is None:
            self.server.process.send_signal(signal.SIGTERM)
        code = await self.server.wait(timeout)
        assert code == 0, f"replica {self.name} exited {code}:\n{self.server.stderr_text}"
        assert_clean_log(self)


def assert_clean_log(replica: Replica) -> None:
    text = replica.server.stderr_text
    for bad in ("Traceback", "tasks still running at exit", "Task was destroyed but it is pending"):
        assert bad not in text, f"replica {replica.name}'s log has {bad!r}:\n{text}"


@dataclass
class Cluster:
    redis: RedisServer
    fake: FakeBackend
    script: StageScript
    replicas: list[Replica]
    proxies: list[GrpcProxy] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self, target: GrpcProxy | Replica) -> grpc.aio.Channel:
        """A new channel to a proxy or straight to a replica, closed with the cluster."""
        options = [("grpc.max_concurrent_streams", 1024), ("grpc.use_local_subchannel_pool", 1)]
        channel = grpc.aio.insecure_channel(target.address, options=options)
        self.channels.append(channel)
        return channel

    def stub(self, target: GrpcProxy | Replica) -> pb_grpc.ToolchainServiceAsyncStub:
        return pb_grpc.ToolchainServiceStub(self.channel(target))

    async def add_proxy(self, upstreams: Sequence[str] | None = None) -> GrpcProxy:
        proxy = await start_grpc_proxy(upstreams or [r.address for r in self.replicas])
        self.proxies.append(proxy)
        return proxy

    def logs(self) -> str:
        parts = [f"--- replica {r.name} ({r.address}) stderr:\n{r.server.stderr_text}" for r in self.replicas]
        parts += [f"--- nginx {p.address} error log:\n{p.log_text()}" for p in self.proxies]
        parts.append(f"--- redis:\n{''.join(self.redis.output)}")
        return "\n".join(parts)

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """Print every process's log when the block fails (pytest shows it)."""
        try:
            yield
        except BaseException:
            print(self.logs())
            raise


def replica_env(fake: FakeBackend, redis_url: str, name: str, **settings: str) -> dict[str, str]:
    values = {
        "shutdown_grace": str(SHUTDOWN_GRACE),
        "log_format": "json",
        "max_concurrent_stages": "1000",
        "cluster__redis_url": redis_url,
        "cluster__replica_id": name,
        "cluster__resume_grace_seconds": str(RESUME_GRACE),
        "cluster__event_log_ttl_seconds": str(EVENT_LOG_TTL),
        "cluster__heartbeat_seconds": "0.5",
    }
    values.update(settings)
    return serve_env(fake, **values)


@contextlib.asynccontextmanager
async def open_cluster(*, proxies: int = 1, **settings: str) -> AsyncIterator[Cluster]:
    """Redis, REPLICAS replicas on one fake backend, `proxies` nginx in front of them;
    everything stopped and checked on the way out (`settings`: more TOOLCHAIN_* values)."""
    script = StageScript()
    async with contextlib.AsyncExitStack() as stack:
        fake = await stack.enter_async_context(FakeBackend(handler=script, record=False))
        redis = await start_redis()
        stack.push_async_callback(redis.stop)
        names = [f"replica-{i}" for i in range(REPLICAS)]
        started = await asyncio.gather(
            *(start_serve(replica_env(fake, redis.url, name, **settings), timeout=60) for name in names),
            return_exceptions=True,
        )
        replicas: list[Replica] = []
        for name, server in zip(names, started, strict=True):
            if isinstance(server, ServerProcess):
                replicas.append(Replica(name, server))
                stack.push_async_callback(server.close)  # after stop(): kills only a leftover
        failed = [error for error in started if isinstance(error, BaseException)]
        if failed:
            raise failed[0]
        cluster = Cluster(redis, fake, script, replicas)
        stack.push_async_callback(_stop_replicas, cluster)
        stack.push_async_callback(_close_proxies, cluster)
        stack.push_async_callback(_close_channels, cluster)
        for _ in range(proxies):
            await cluster.add_proxy()
        yield cluster


async def _close_channels(cluster: Cluster) -> None:
    for channel in cluster.channels:
        await channel.close(None)


async def _close_proxies(cluster: Cluster) -> None:
    errors: list[BaseException] = []
    for proxy in cluster.proxies:
        try:
            await close_grpc_proxy(proxy)
        except AssertionError as error:
            errors.append(error)
    if errors:
        raise errors[0]


async def _stop_replicas(cluster: Cluster) -> None:
    results = await asyncio.gather(*(r.stop() for r in cluster.replicas), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
