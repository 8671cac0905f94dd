"""Running stages by id: duplicate detection, the concurrency limit, and cancellation
from anywhere (CancelStage, the deadline, server shutdown).

Cancelling a stage cancels the task that serves it, the way `asyncio.timeout` does:
the `CancelledError` lands wherever the stage is waiting (the backend's HTTP stream, a
tool) and unwinds it, closing what it opened; the door that owns the task sees the
recorded reason, calls `uncancel()`, and reports the cancellation to its caller. A
cancellation without a recorded reason is the client going away and simply propagates.

A stream's door marks the time it hands an event to grpc (`writing`, the monotonic time
the write began; 0 when none is in progress): a cancellation
that arrives then waits for that write (up to WRITE_GRACE) and lands right after it, in
`written`, so the door can still send its Cancel event. Cancelling in the middle of the
write would leave it pending in grpc, where no other event can follow it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from toolchain_service.backends.budget import ByteBudget
from toolchain_service.errors import (
    NotFoundError,
    NotOwned,
    Overloaded,
    StageAlreadyRunning,
    StageError,
    Unavailable,
)
from toolchain_service.events import CancelReason

if TYPE_CHECKING:
    from toolchain_service.relay import Relay

#: Seconds a cancellation waits for a write in progress (a reader that does not read can
#: hold one back for ever: then the cancellation lands in the write, and the stream ends
#: with its status alone).
WRITE_GRACE = 1.0
#: While the stages' buffered bytes are at max_buffered_bytes and stages wait for room, a
#: stream whose event has waited this long for its reader counts as stalled (instead of
#: stream_stall_seconds), so stalled readers give their bytes back before reading streams
#: wait long for room.
PRESSURE_STALL = 1.0


class StageHandle:
    __slots__ = (
        "_deadline_timer",
        "_deferred",
        "_grace_timer",
        "active",
        "pressed",
        "principal",
        "readers",
        "reason",
        "relay",
        "shared",
        "stage_id",
        "task",
        "writing",
    )

    def __init__(self, stage_id: str, task: asyncio.Task[object], principal: str = "") -> None:
        self.stage_id = stage_id
        self.task = task
        #: Who started it (auth on: a token's or a client certificate's identity; else "").
        self.principal = principal
        self.reason = CancelReason.UNSPECIFIED
        self.active = True
        #: Since when the door has been handing an event to grpc (0.0: it is not).
        self.writing = 0.0
        #: Its reader counted as stalled sooner because the buffered bytes were at their cap.
        self.pressed = False
        #: A logged stream's hand-over to its live reader, whose writes are watched instead.
        self.relay: Relay[Any] | None = None
        #: Streams reading a logged stage live: its own, and resumed ones (cluster mode).
        self.readers = 0
        #: Registered in the replicas' shared registry (which hears of its end).
        self.shared = False
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deferred: asyncio.TimerHandle | None = None
        self._grace_timer: asyncio.TimerHandle | None = None

    def attach(self) -> bool:
        """A reader follows the stage: the resume grace period, if running, stops."""
        if not self.active:
            return False
        self.readers += 1
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        return True

    def detach(self, grace: float) -> bool:
        """A reader went away; with none left, the stage is cancelled (DISCONNECTED) unless
        a reader attaches within `grace` seconds."""
        if not self.active:
            return False
        self.readers = max(0, self.readers - 1)
        if self.readers == 0 and self._grace_timer is None:
            loop = asyncio.get_running_loop()
            self._grace_timer = loop.call_later(grace, self.cancel, CancelReason.DISCONNECTED)
        return True

    def cancel(self, reason: CancelReason) -> bool:
        """Cancel the stage once; False when it already ended or was cancelled. A write in
        progress is waited for (up to WRITE_GRACE), except a stalled reader's: no grace
        will finish a write stuck behind a reader that does not read."""
        if not self.active or self.reason != CancelReason.UNSPECIFIED:
            return False
        self.reason = reason
        if self.writing and reason != CancelReason.READER_STALLED:
            loop = asyncio.get_running_loop()
            self._deferred = loop.call_later(WRITE_GRACE, self.task.cancel)
        else:
            self.task.cancel()
        return True

    def written(self) -> None:
        """Called by the door (in the stage's task) after each write: a cancellation that
        waited for the write lands here."""
        self.writing = 0.0
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
            raise asyncio.CancelledError

    def cancel_at_deadline(self, seconds: float | None) -> None:
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self._deadline_timer = loop.call_later(max(0.0, seconds), self.cancel, CancelReason.DEADLINE)

    def finish(self) -> None:
        """The stage reached its terminal event: nothing may cancel it any more."""
        self.active = False
        for timer in (self._deadline_timer, self._grace_timer):
            if timer is not None:
                timer.cancel()
        self._deadline_timer = self._grace_timer = None
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None


class LoopLoad:
    """How busy the event loop's thread is: the share of wall-clock time it spent on the
    CPU (`time.thread_time` deltas, sampled by a task on the loop every `interval` seconds),
    smoothed exponentially over about `window` seconds. grpc's poller thread and other
    threads are not counted: the loop is what takes in new calls, one per turn."""

    def __init__(self, window: float = 0.5, interval: float = 0.05) -> None:
        self.busy = 0.0
        self._window = window
        self._interval = interval

    async def watch(self) -> None:
        cpu, wall = time.thread_time(), time.monotonic()
        while True:
            await asyncio.sleep(self._interval)
            now_cpu, now_wall = time.thread_time(), time.monotonic()
            elapsed = now_wall - wall
            if elapsed > 0:
                sample = min(1.0, (now_cpu - cpu) / elapsed)
                self.busy += min(1.0, elapsed / self._window) * (sample - self.busy)
            cpu, wall = now_cpu, now_wall


class StageManager:
    def __init__(
        self,
        max_concurrent: int,
        resume_grace: float = 0.0,
        max_loop_busy: float = 0.0,
        budget: ByteBudget | None = None,
    ) -> None:
        self._running: dict[str, StageHandle] = {}
        self._max = max_concurrent
        #: Adaptive admission: while stages run and the loop's thread is at least this busy
        #: (`load.busy`, a fraction), new stages are refused; 0: off.
        self.max_loop_busy = max_loop_busy
        self.load = LoopLoad()
        #: Seconds a logged stage with no reader left waits for one (cluster mode).
        self.resume_grace = resume_grace
        #: The bytes the stages hold for their callers, against max_buffered_bytes (or None).
        self.budget = budget
        #: Told the id of each shared stage that ends (the registry marks it ended).
        self.on_close: Callable[[str], None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    def __len__(self) -> int:
        return len(self._running)

    def open(self, stage_id: str, principal: str = "") -> StageHandle:
        """Register the current task as stage `stage_id` (the edge has already made a UUID
        for a caller who sent none), started by `principal`."""
        if self.draining:
            raise Unavailable("the server is shutting down; send the stage to another instance")
        if len(self._running) >= self._max:
            raise Overloaded(
                f"the server is running its maximum of {self._max} stages; retry shortly", retry_after=1.0
            )
        if self.max_loop_busy and self._running and self.load.busy >= self.max_loop_busy:
            # Taken in, this stage would slow every running one and the intake of new calls
            # (grpc.aio takes one per loop turn): refused now, the caller retries elsewhere.
            raise Overloaded(
                f"the server is at its load limit (event loop {self.load.busy:.0%} busy, limit"
                f" {self.max_loop_busy:.0%}, {len(self._running)} stages running); retry shortly",
                retry_after=1.0,
            )
        if stage_id in self._running:
            raise StageAlreadyRunning(
                f"a stage with stage_id {stage_id!r} is already running; choose another id or leave it empty"
            )
        task = asyncio.current_task()
        assert task is not None
        handle = self._running[stage_id] = StageHandle(stage_id, task, principal)
        self._idle.clear()
        return handle

    def close(self, handle: StageHandle) -> None:
        handle.finish()
        if self._running.get(handle.stage_id) is handle:
            del self._running[handle.stage_id]
            if handle.shared and self.on_close is not None:
                self.on_close(handle.stage_id)
            if not self._running:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no stage runs; False when `timeout` seconds passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def get(self, stage_id: str) -> StageHandle | None:
        return self._running.get(stage_id)

    def cancel(self, stage_id: str, principal: str = "") -> None:
        """CancelStage: with auth on (`principal` set), only the principal's own stages."""
        handle = self._running.get(stage_id)
        if handle is not None and handle.principal != principal:
            handle = None
        if handle is None or not handle.cancel(CancelReason.CANCEL_STAGE):
            raise not_running(stage_id, principal)

    def control(self, op: str, stage_id: str) -> bool:
        """Another replica's request about a stage of this one (the registry's control
        channel; the asking replica checked the caller's principal): True when the stage
        runs here and it was done."""
        handle = self._running.get(stage_id)
        if handle is None:
            return False
        if op == "cancel":
            return handle.cancel(CancelReason.CANCEL_STAGE)
        if op == "attach":
            return handle.attach()
        return handle.detach(self.resume_grace)

    async def watch_stalls(self, limit: float) -> None:
        """Stop the streams whose reader has not taken an event for `limit` seconds: the
        stage is cancelled (READER_STALLED, landing in the stuck write), or, for a logged
        stream, its reader is detached and the stage goes on for ResumeStage. While the
        buffered bytes are at their cap, PRESSURE_STALL seconds count as stalled."""
        interval = min(1.0, limit / 4)
        pressured = min(limit, PRESSURE_STALL)
        while True:
            await asyncio.sleep(min(interval, pressured / 4) if self._pressed() else interval)
            pressed = self._pressed()
            self._stop_stalled(time.monotonic() - (pressured if pressed else limit), pressed)

    def _pressed(self) -> bool:
        budget = self.budget
        return budget is not None and budget.pressed()

    def _stop_stalled(self, stuck: float, pressed: bool = False) -> None:
        # A function of its own, so that no handle stays referenced by the watcher's frame
        # while it sleeps (an ended stage must be freed when it ends).
        for handle in list(self._running.values()):
            relay = handle.relay
            if relay is not None:
                if 0 < relay.writing < stuck:
                    handle.pressed = pressed
                    relay.stall()
            elif 0 < handle.writing < stuck and handle.cancel(CancelReason.READER_STALLED):
                handle.pressed = pressed

    def cancel_all(self, reason: CancelReason) -> int:
        return sum(handle.cancel(reason) for handle in list(self._running.values()))


def not_running(stage_id: str, principal: str) -> StageError:
    """No running stage of the caller's has this id. With auth on, another principal's
    stage and no stage look the same (PERMISSION_DENIED), so nobody learns of others'."""
    if principal:
        return NotOwned(f"no running stage of yours has stage_id {stage_id!r}")
    return NotFoundError(f"no running stage has stage_id {stage_id!r}")
