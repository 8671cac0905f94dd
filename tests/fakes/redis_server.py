"""A real `redis-server` (Debian's package; `.ci/setup` installs it) as a child process on
a free loopback port, with no persistence, for the cluster tests. `stop()` checks how it
ended: a server that crashed, or had to be killed, fails the test that used it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
from dataclasses import dataclass, field

#: Where Debian puts it when /usr/bin is not on PATH.
_CANDIDATES = ("redis-server", "/usr/bin/redis-server")


def redis_binary() -> str:
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("redis-server is not installed: run .ci/setup (apt-get install redis-server)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisServer:
    process: asyncio.subprocess.Process
    port: int
    workdir: tempfile.TemporaryDirectory[str]
    output: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.output.append(line.decode(errors="replace"))

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then the exit status must be 0 (SIGKILL and a failure after `timeout`)."""
        if self.process.returncode is None:
            self.process.terminate()
        try:
            async with asyncio.timeout(timeout):
                code = await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError(f"redis-server did not stop on SIGTERM:\n{''.join(self.output)}") from None
        finally:
            if self._reader is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader
            self.workdir.cleanup()
        if code != 0:
            raise AssertionError(f"redis-server ended with status {code}:\n{''.join(self.output)}")


async def start_redis(timeout: float = 20.0) -> RedisServer:
    """Start redis-server and wait until it answers PING (on its own port, from a socket)."""
    workdir = tempfile.TemporaryDirectory(prefix="toolchain-redis-")
    for _attempt in range(5):  # the free port can be taken between the probe and the bind
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            redis_binary(),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", workdir.name,
            "--loglevel", "warning",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        server = RedisServer(process, port, workdir)
        server._reader = asyncio.create_task(server._read())
        if await _answers(server, timeout):
            return server
        if process.returncode is None:
            process.kill()
        await process.wait()
        await server._reader
    workdir.cleanup()
    raise RuntimeError(f"redis-server did not start:\n{''.join(server.output)}")


async def _answers(server: RedisServer, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end and server.process.returncode is None:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                if (await reader.readline()).startswith(b"+PONG"):
                    return True
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        await asyncio.sleep(0.05)
    return False
