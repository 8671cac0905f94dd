"""The replicas' shared stage registry and event logs, on Redis (`cluster.redis_url`).

What each replica keeps there (`tc:` is the key prefix):

    tc:replica:{replica}   a liveness beat (PX 3 beats), refreshed every `heartbeat_seconds`
    tc:ctl:{replica}       its pub/sub channel: requests from other replicas (cancel,
                           attach, detach) and their replies, as JSON
    tc:stage:{stage_id}    hash: replica, principal, state (running | ended), streamed
    tc:log:{stage_id}      stream: the serialized StageEvents of a streamed stage, entry
                           id "{sequence}-1", capped at `event_log_max_events`

A stage's two keys live as long as the stage can (its deadline) plus the resume grace and
the log's TTL; when it ends they are marked ended and expire `event_log_ttl_seconds`
later, so Redis holds nothing for a stage past that, even when its replica dies.

Why pub/sub for cancels: a cancel is meaningful only to a live replica, so there is
nothing to keep for one that is gone (PUBLISH says how many listened: none means the
owner is gone, and the stage with it). The events, which must outlive a connection, go
to a Redis stream instead: replayable from any id, trimmed by count, with a TTL.

Writes of events and ends go through one writer task per replica, in order, pipelined:
the live stream never waits for Redis. A Redis failure there is logged and the stage
goes on (its log, and so a later resume, may then miss events: the resume says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from toolchain_service.config import ClusterSettings
from toolchain_service.errors import EventsDropped, OwnerLost, RegistryUnavailable, StageAlreadyRunning

log = logging.getLogger(__name__)

PREFIX = "tc:"
#: Beats a replica may miss before it is presumed dead.
MISSED_BEATS = 3
#: Largest batch of queued writes sent in one pipeline.
_BATCH = 256

Op = Literal["cancel", "attach", "detach"]

# Register a stage unless one with its id runs: KEYS stage, log; ARGV replica, principal,
# ttl ms, streamed (0/1). An ended stage's keys are replaced (its id may be reused).
_REGISTER = """
if redis.call('HGET', KEYS[1], 'state') == 'running' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'state', 'running', 'replica', ARGV[1], 'principal', ARGV[2], 'streamed', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


def stage_key(stage_id: str) -> str:
    return f"{PREFIX}stage:{stage_id}"


def log_key(stage_id: str) -> str:
    return f"{PREFIX}log:{stage_id}"


def replica_key(replica: str) -> str:
    return f"{PREFIX}replica:{replica}"


def channel(replica: str) -> str:
    return f"{PREFIX}ctl:{replica}"


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class StageEntry:
    """A stage as the registry knows it."""

    stage_id: str
    replica: str
    principal: str
    running: bool
    streamed: bool


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    sequence: int
    data: bytes


#: What a replica does with a request about one of its stages (from the control channel):
#: True when the stage runs here and the request was carried out.
Handler = Callable[[Op, str], bool]


class Cluster:
    """One replica's connection to the registry. `start()` before use, `aclose()` after."""

    def __init__(self, settings: ClusterSettings, handler: Handler) -> None:
        self.settings = settings
        self.replica_id = settings.replica_id or default_replica_id()
        self._handler = handler
        timeout = settings.request_timeout
        # The blocking reads of resumed streams wait up to one beat, within the socket timeout.
        self._block_ms = int(1000 * min(settings.heartbeat_seconds, timeout / 2))
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
        )
        self._register = self._redis.register_script(_REGISTER)
        self._writes: asyncio.Queue[tuple[str, tuple[Any, ...]]] = asyncio.Queue()
        #: The TTL (ms) of each registered stage whose log has no event yet.
        self._lifetimes: dict[str, int] = {}
        self._pending: dict[str, asyncio.Future[bool]] = {}
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (a Redis that does not answer stops start-up), then beat, listen, write."""
        try:
            await self._redis.ping()
            await self._beat()
        except RedisError as exc:
            await self._redis.aclose()
            raise ConnectionError(f"cannot reach Redis at {self.settings.redis_url}: {exc}") from None
        subscribed = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._beating(), name="toolchain-cluster-beat"),
            asyncio.create_task(self._listening(subscribed), name="toolchain-cluster-listen"),
            asyncio.create_task(self._writing(), name="toolchain-cluster-write"),
        ]
        await subscribed.wait()
        log.info("cluster: replica %s on %s", self.replica_id, self.settings.redis_url)

    async def aclose(self, flush_timeout: float = 2.0) -> None:
        """Flush queued writes (up to `flush_timeout` s), stop beating (other replicas see
        this one gone at once), close the connections."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(flush_timeout):
                await self._writes.join()
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a stop never waits on Redis for long
            await asyncio.wait(self._tasks, timeout=self.settings.request_timeout)
        self._tasks = []
        with contextlib.suppress(RedisError):
            await self._redis.delete(replica_key(self.replica_id))
        for future in self._pending.values():
            future.cancel()
        await self._redis.aclose()

    async def _beat(self) -> None:
        ttl_ms = int(1000 * self.settings.heartbeat_seconds * MISSED_BEATS)
        await self._redis.set(replica_key(self.replica_id), "1", px=ttl_ms)

    async def _beating(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                await self._beat()
            except RedisError as exc:
                log.warning("cluster: heartbeat failed: %s", exc)

    # -- the registry ------------------------------------------------------------------

    async def _call(self, what: str, command: Awaitable[Any]) -> Any:
        try:
            return await command
        except RedisError as exc:
            raise RegistryUnavailable(
                f"the stage registry (Redis) did not answer while {what}: {exc}; retry shortly"
            ) from None

    async def register(self, stage_id: str, principal: str, lifetime: float, *, streamed: bool) -> None:
        """Claim `stage_id` for this replica for at most `lifetime` seconds (the stage's
        deadline; the resume grace and the log's TTL are added)."""
        kept = self.settings.resume_grace_seconds + self.settings.event_log_ttl_seconds
        ttl_ms = int(1000 * (lifetime + kept))
        claimed = await self._call(
            "registering the stage",
            self._register(
                keys=[stage_key(stage_id), log_key(stage_id)],
                args=[self.replica_id, principal, max(ttl_ms, 1), int(streamed)],
            ),
        )
        if claimed and streamed:
            self._lifetimes[stage_id] = ttl_ms
        if not claimed:
            raise StageAlreadyRunning(
                f"a stage with stage_id {stage_id!r} is already running; choose another id or leave it empty"
            )

    async def lookup(self, stage_id: str) -> StageEntry | None:
        fields: dict[bytes, bytes] = await self._call(
            "looking the stage up", self._redis.hgetall(stage_key(stage_id))
        )
        if not fields or b"replica" not in fields:
            return None
        return StageEntry(
            stage_id=stage_id,
            replica=fields[b"replica"].decode(),
            principal=fields.get(b"principal", b"").decode(),
            running=fields.get(b"state") == b"running",
            streamed=fields.get(b"streamed") == b"1",
        )

    async def alive(self, replica: str) -> bool:
        return bool(await self._call("checking a replica", self._redis.exists(replica_key(replica))))

    # -- writes, queued in order -------------------------------------------------------

    def append(self, stage_id: str, sequence: int, data: bytes) -> None:
        """Queue event `sequence` of a streamed stage for its log."""
        self._writes.put_nowait(("append", (stage_id, sequence, data)))

    def ended(self, stage_id: str) -> None:
        """Queue the end of a stage: its keys expire `event_log_ttl_seconds` from then."""
        self._writes.put_nowait(("ended", (stage_id,)))

    async def _writing(self) -> None:
        ended_ttl_ms = int(1000 * self.settings.event_log_ttl_seconds)
        cap = self.settings.event_log_max_events
        while True:
            batch = [await self._writes.get()]
            while len(batch) < _BATCH and not self._writes.empty():
                batch.append(self._writes.get_nowait())
            pipe = self._redis.pipeline(transaction=False)
            for kind, args in batch:
                if kind == "append":
                    stage_id, sequence, data = args
                    key = log_key(stage_id)
                    pipe.xadd(key, {"e": data}, id=f"{sequence}-1", maxlen=cap, approximate=False)
                    if sequence == 0:  # a new log lives as long as its stage's entry
                        pipe.pexpire(key, self._lifetimes.pop(stage_id, ended_ttl_ms))
                else:
                    (stage_id,) = args
                    self._lifetimes.pop(stage_id, None)
                    pipe.hset(stage_key(stage_id), "state", "ended")
                    pipe.pexpire(stage_key(stage_id), ended_ttl_ms)
                    pipe.pexpire(log_key(stage_id), ended_ttl_ms)
            try:
                for result in await pipe.execute(raise_on_error=False):
                    if isinstance(result, Exception):
                        log.warning("cluster: a registry write failed: %s", result)
            except RedisError as exc:
                log.warning("cluster: %d registry writes lost: %s", len(batch), exc)
            finally:
                for _ in batch:
                    self._writes.task_done()

    # -- reading a log -----------------------------------------------------------------

    async def follow(self, entry: StageEntry, after: int | None) -> AsyncGenerator[LoggedEvent, None]:
        """The logged events of `entry`'s stage after sequence `after` (all when None),
        in order, then the new ones as they come, until the caller stops (at the terminal
        event). Raises EventsDropped when the log no longer has the next one, OwnerLost
        when the owner stopped beating before the stage ended."""
        key = log_key(entry.stage_id)
        expected = 0 if after is None else after + 1
        low = f"{expected}-0"  # inclusive for the first page, then exclusive: "(id"
        replaying = True
        while True:
            if replaying:
                rows: list[Any] = await self._call(
                    "replaying the stage's events", self._redis.xrange(key, min=low, max="+", count=_BATCH)
                )
                replaying = len(rows) == _BATCH
            else:
                reply = await self._call(
                    "following the stage's events",
                    self._redis.xread({key: low.lstrip("(")}, count=_BATCH, block=self._block_ms),
                )
                rows = reply[0][1] if reply else []
            for raw_id, fields in rows:
                sequence = int(raw_id.split(b"-")[0])
                if sequence != expected:
                    raise EventsDropped(
                        f"stage {entry.stage_id!r}: the event log no longer keeps event {expected} "
                        f"(it keeps the last {self.settings.event_log_max_events} events of a stage); "
                        "run the stage again"
                    )
                expected += 1
                low = "(" + raw_id.decode()
                yield LoggedEvent(sequence, fields[b"e"])
            if not rows and not replaying:
                await self._check_owner(entry, expected)

    async def _check_owner(self, entry: StageEntry, expected: int) -> None:
        """Nothing new for a beat: is the stage still running on a live owner, or ended
        with events still to come?"""
        current = await self.lookup(entry.stage_id)
        if current is not None and current.replica != entry.replica:
            raise EventsDropped(f"stage {entry.stage_id!r} was started again; the events asked for are gone")
        if current is not None and not current.running:
            # The terminal event is queued before the end, so it is logged by now.
            last: list[Any] = await self._call(
                "replaying the stage's events", self._redis.xrevrange(log_key(entry.stage_id), count=1)
            )
            if not last or int(last[0][0].split(b"-")[0]) < expected:
                raise EventsDropped(
                    f"stage {entry.stage_id!r} has ended and its log has no event {expected}: "
                    "after_sequence is past its last event, or the log expired"
                )
            return
        if current is None:  # its entry expired: it ended longer than the log's TTL ago
            raise EventsDropped(
                f"stage {entry.stage_id!r} ended more than cluster.event_log_ttl_seconds ago: "
                "its events expired"
            )
        if not await self.alive(entry.replica):
            raise OwnerLost(
                f"the replica running stage {entry.stage_id!r} ({entry.replica}) stopped before the "
                "stage ended; run the stage again"
            )

    # -- requests to other replicas ----------------------------------------------------

    async def ask(self, replica: str, op: Op, stage_id: str) -> bool | None:
        """Send `op` about `stage_id` to `replica` and wait for its answer (whether the
        stage runs there and it was done); None when no replica of that name listens (it
        is gone, and its stages with it)."""
        if replica == self.replica_id:
            return self._handler(op, stage_id)
        request_id = f"{self.replica_id}/{next(self._ids)}"
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message = json.dumps({"op": op, "stage": stage_id, "id": request_id, "from": self.replica_id})
        try:
            published = self._redis.publish(channel(replica), message)
            listeners = await self._call("asking another replica", published)
            if not listeners:
                return None
            try:
                async with asyncio.timeout(self.settings.request_timeout):
                    return await future
            except TimeoutError:
                raise RegistryUnavailable(
                    f"replica {replica}, which runs stage {stage_id!r}, did not answer within "
                    f"{self.settings.request_timeout:g}s; retry shortly"
                ) from None
        finally:
            self._pending.pop(request_id, None)

    def tell(self, replica: str, op: Op, stage_id: str) -> None:
        """`op` without waiting for the answer (a resumed stream that ends detaches so)."""
        if replica == self.replica_id:
            self._handler(op, stage_id)
            return
        task = asyncio.get_running_loop().create_task(self._tell(replica, op, stage_id))
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _tell(self, replica: str, op: Op, stage_id: str) -> None:
        message = json.dumps({"op": op, "stage": stage_id, "from": self.replica_id})
        with contextlib.suppress(RedisError):
            await self._redis.publish(channel(replica), message)

    async def _listening(self, subscribed: asyncio.Event) -> None:
        backoff = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel(self.replica_id))
                subscribed.set()
                backoff = 0.1
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await self._receive(message["data"])
            except RedisError as exc:
                log.warning("cluster: control channel lost (%s); reconnecting in %.1fs", exc, backoff)
            finally:
                with contextlib.suppress(RedisError, TimeoutError):
                    async with asyncio.timeout(self.settings.request_timeout):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _receive(self, data: bytes) -> None:
        try:
            message = json.loads(data)
            op, stage_id = message["op"], message.get("stage", "")
        except (ValueError, KeyError, TypeError):
            log.warning("cluster: ignored a malformed control message %r", data[:200])
            return
        if op == "reply":
            future = self._pending.get(message.get("id", ""))
            if future is not None and not future.done():
                future.set_result(message.get("done") is True)
            return
        if op not in ("cancel", "attach", "detach"):
            log.warning("cluster: ignored an unknown control message %r", op)
            return
        done = self._handler(op, stage_id)
        if "id" in message and "from" in message:
            reply = json.dumps({"op": "reply", "id": message["id"], "done": done})
            with contextlib.suppress(RedisError):
                await self._redis.publish(channel(str(message["from"])), reply)
