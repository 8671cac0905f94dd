"""The hand-over between a stage that runs in its own task and the stream that writes its
events (cluster mode, where a stage outlives its stream's connection).

The stage task puts each event; the stream door gets them in order and writes them. The
buffer is small and bounded: while the reader is attached and behind, `put` waits, so the
stage stops reading its backend (TCP backpressure) instead of piling events up. Terminal
events never wait. Once the reader detaches (its connection dropped) puts stop waiting
and nothing is kept: the events are in the stage's log, for ResumeStage.

A reader stuck in a write when the stage ends (a caller that stopped reading) is cancelled
after `write_grace` seconds, the way StageHandle defers a cancellation: its door then ends
the call with the terminal event's status alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

Item = TypeVar("Item")


class Relay(Generic[Item]):
    def __init__(self, limit: int, write_grace: float) -> None:
        self._items: deque[Item] = deque()
        self._limit = limit
        self._grace = write_grace
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.attached = True
        self.closed = False
        #: Since when the reader has been in a write (monotonic; 0.0: it is not).
        self.writing = 0.0
        #: The reader was cancelled because it was stuck in a write after the end.
        self.forced = False
        #: The reader was cancelled because it was stuck in a write too long (stall limit).
        self.stalled = False
        #: The last item put (the terminal one, once closed).
        self.last: Item | None = None
        self._reader: asyncio.Task[object] | None = None
        self._force_timer: asyncio.TimerHandle | None = None

    # -- the stage's side --------------------------------------------------------------

    async def put(self, item: Item) -> None:
        """Hand over `item`, waiting while an attached reader is `limit` items behind."""
        while self.attached and len(self._items) >= self._limit:
            self._room.clear()
            await self._room.wait()
        self.put_nowait(item)

    def put_nowait(self, item: Item) -> None:
        self.last = item
        if self.attached:
            self._items.append(item)
            self._readable.set()

    def close(self) -> None:
        """The stage ended (its terminal item is in)."""
        self.closed = True
        self._readable.set()
        if self.writing and self._reader is not None:
            self._force_timer = asyncio.get_running_loop().call_later(self._grace, self._force)

    def stall(self) -> None:
        """The reader has been stuck in a write too long: cancel it (its door detaches)."""
        if self._reader is not None and not self.stalled and not self.forced:
            self.stalled = True
            self._reader.cancel()

    def _force(self) -> None:
        if self.writing and self._reader is not None:
            self.forced = True
            self._reader.cancel()

    # -- the reader's side -------------------------------------------------------------

    async def get(self) -> Item:
        """The next item; the reader must stop after the terminal one."""
        if self._reader is None:
            self._reader = asyncio.current_task()
        while not self._items:
            if self.closed:
                raise EOFError("the stage ended without a terminal event")
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        if len(self._items) < self._limit:
            self._room.set()
        return item

    def written(self) -> None:
        self.writing = 0.0
        if self._force_timer is not None:
            self._force_timer.cancel()
            self._force_timer = None

    def detach(self) -> None:
        """The reader is gone: drop what waits, and let the stage run unhindered."""
        self.attached = False
        self._items.clear()
        self._room.set()
        self.written()
