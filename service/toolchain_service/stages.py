"""Running stages by id: duplicate detection, the concurrency limit, and cancellation
from anywhere (CancelStage, the deadline, server shutdown).

Cancelling a stage cancels the task that serves it, the way `asyncio.timeout` does:
the `CancelledError` lands wherever the stage is waiting (the backend's HTTP stream, a
tool) and unwinds it, closing what it opened; the door that owns the task sees the
recorded reason, calls `uncancel()`, and reports the cancellation to its caller. A
cancellation without a recorded reason is the client going away and simply propagates.

A stream's door marks the time it hands an event to grpc (`writing`): a cancellation
that arrives then waits for that write (up to WRITE_GRACE) and lands right after it, in
`written`, so the door can still send its Cancel event. Cancelling in the middle of the
write would leave it pending in grpc, where no other event can follow it.
"""

from __future__ import annotations

import asyncio

from toolchain_service.errors import NotFoundError, Overloaded, StageAlreadyRunning, Unavailable
from toolchain_service.events import CancelReason

#: Seconds a cancellation waits for a write in progress (a reader that does not read can
#: hold one back for ever: then the cancellation lands in the write, and the stream ends
#: with its status alone).
WRITE_GRACE = 1.0


class StageHandle:
    __slots__ = ("_deadline_timer", "_deferred", "active", "reason", "stage_id", "task", "writing")

    def __init__(self, stage_id: str, task: asyncio.Task[object]) -> None:
        self.stage_id = stage_id
        self.task = task
        self.reason = CancelReason.UNSPECIFIED
        self.active = True
        #: The door is handing an event to grpc.
        self.writing = False
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deferred: asyncio.TimerHandle | None = None

    def cancel(self, reason: CancelReason) -> bool:
        """Cancel the stage once; False when it already ended or was cancelled."""
        if not self.active or self.reason != CancelReason.UNSPECIFIED:
            return False
        self.reason = reason
        if self.writing:
            loop = asyncio.get_running_loop()
            self._deferred = loop.call_later(WRITE_GRACE, self.task.cancel)
        else:
            self.task.cancel()
        return True

    def written(self) -> None:
        """Called by the door (in the stage's task) after each write: a cancellation that
        waited for the write lands here."""
        self.writing = False
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
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None


class StageManager:
    def __init__(self, max_concurrent: int) -> None:
        self._running: dict[str, StageHandle] = {}
        self._max = max_concurrent
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    def __len__(self) -> int:
        return len(self._running)

    def open(self, stage_id: str) -> StageHandle:
        """Register the current task as stage `stage_id` (the edge has already made a UUID
        for a caller who sent none)."""
        if self.draining:
            raise Unavailable("the server is shutting down; send the stage to another instance")
        if len(self._running) >= self._max:
            raise Overloaded(
                f"the server is running its maximum of {self._max} stages; retry shortly", retry_after=1.0
            )
        if stage_id in self._running:
            raise StageAlreadyRunning(
                f"a stage with stage_id {stage_id!r} is already running; choose another id or leave it empty"
            )
        task = asyncio.current_task()
        assert task is not None
        handle = self._running[stage_id] = StageHandle(stage_id, task)
        self._idle.clear()
        return handle

    def close(self, handle: StageHandle) -> None:
        handle.finish()
        if self._running.get(handle.stage_id) is handle:
            del self._running[handle.stage_id]
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

    def cancel(self, stage_id: str) -> None:
        handle = self._running.get(stage_id)
        if handle is None or not handle.cancel(CancelReason.CANCEL_STAGE):
            raise NotFoundError(f"no running stage has stage_id {stage_id!r}")

    def cancel_all(self, reason: CancelReason) -> int:
        return sum(handle.cancel(reason) for handle in list(self._running.values()))
