"""What every benchmark child process shares: uvloop, the fd limit, and the way it
stops (SIGTERM, SIGINT, or its stdin closing because the parent went away)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop (as production does), after raising the fd limit."""
    raise_fd_limit()
    import uvloop

    return uvloop.run(main)


def announce(line: str) -> None:
    """One protocol line to the parent (stdout, flushed)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


#: Set by `bench.run` in its children's environment: stdin is a pipe from the parent.
PARENT_PIPE_ENV = "BENCH_PARENT_PIPE"


async def wait_for_stop() -> None:
    """Return on SIGTERM, SIGINT or, under `bench.run`, EOF on stdin (the parent closed it
    or died), so that no child outlives an interrupted benchmark."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if os.environ.get(PARENT_PIPE_ENV) != "1":
        await stop.wait()
        return
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            stop.set()

    with contextlib.suppress(OSError, ValueError, NotImplementedError):
        loop.add_reader(fd, readable)
    await stop.wait()


async def read_command() -> str:
    """The next line the parent sends on stdin ("" at EOF), without blocking the loop."""
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()
