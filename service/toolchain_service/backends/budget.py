"""One cap on the bytes all stages hold between their backends and their callers.

A streamed stage reads its backend a chunk at a time and asks for the next chunk only once
every event made of the last one has been written to its caller (a write waits while the
caller's HTTP/2 window is full). So the bytes of a chunk are held from its read until the
stage asks for more: for a caller that reads, a moment; for one that does not read, until
it reads again or `stream_stall_seconds` ends its stream. `ByteBudget` sums those bytes
over every stage of the process. While the sum is at `max_buffered_bytes`, a stage that
wants its next chunk waits before reading it: it reads no more from its backend (which
then sees TCP backpressure) until other stages hand theirs on, or its deadline ends it.
While stages wait for room, streams whose reader has left an event unread for a second
count as stalled (`stages.PRESSURE_STALL`, instead of `stream_stall_seconds`): they end,
READER_STALLED, at once, and give their bytes back, so a crowd of stalled readers cannot
hold up the ones that read.

Waiting for room counts against no backend timeout (the time is not the backend's). A
stage that ends, however it ends, gives back what it held (`Account.close`, called by the
stage's own `finally`, never left to garbage collection).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class ByteBudget:
    """The cap (`limit` bytes; 0: none) and what all stages hold now (`used`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        #: Stages waiting for room now.
        self.waiting = 0
        #: Set while `used` is under the limit (made in the running loop on first need).
        self._room: asyncio.Event | None = None

    def full(self) -> bool:
        """At the cap: stages that want more wait."""
        return bool(self.limit) and self.used >= self.limit

    def pressed(self) -> bool:
        """At the cap, with stages waiting for room."""
        return self.waiting > 0 and self.full()

    def account(self) -> Account:
        return Account(self)

    def take(self, size: int) -> None:
        self.used += size
        if self._room is not None and self.used >= self.limit:
            self._room.clear()

    def give(self, size: int) -> None:
        self.used -= size
        if self._room is not None and self.used < self.limit:
            self._room.set()

    async def wait_for_room(self) -> None:
        self.waiting += 1
        try:
            while self.used >= self.limit:
                if self._room is None:
                    self._room = asyncio.Event()
                await self._room.wait()
        finally:
            self.waiting -= 1


class Account:
    """What one stage's backend stream holds of the budget."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self.held = 0

    async def chunks(self, raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`raw`, each chunk held from its read until the next is asked for; the next is
        read only while the budget has room."""
        budget = self._budget
        while True:
            self.close()
            if budget.full():
                await budget.wait_for_room()
            try:
                chunk = await anext(raw)
            except StopAsyncIteration:
                return
            self.held = len(chunk)
            budget.take(self.held)
            yield chunk

    def close(self) -> None:
        """Give back what is held (idempotent)."""
        if self.held:
            self._budget.give(self.held)
            self.held = 0
