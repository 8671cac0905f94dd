"""The real `toolchain serve` (python -m toolchain_client serve) as a child process, for
tests of start-up, configuration and signal handling. Its stdout says where it listens
("toolchain server listening on HOST:PORT"); stderr is collected as it comes so the pipe
never fills."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.openai_backend import FakeBackend

LISTENING = "toolchain server listening on "
SERVE = (sys.executable, "-m", "toolchain_client", "serve")


def serve_env(fake: FakeBackend | None = None, **settings: str) -> dict[str, str]:
    """This process's environment without TOOLCHAIN_* variables, plus the given settings
    (keyword `shutdown_grace="1"` becomes TOOLCHAIN_SHUTDOWN_GRACE=1) and, with `fake`,
    a backend "fake" pointing at it as the default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLCHAIN_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["TOOLCHAIN_ADDRESS"] = "127.0.0.1:0"
    if fake is not None:
        env["TOOLCHAIN_DEFAULT_BACKEND"] = "fake"
        env["TOOLCHAIN_BACKENDS"] = json.dumps(
            {"fake": {"base_url": fake.base_url, "default_model": "fake-model", "max_retries": 0}}
        )
    env.update({f"TOOLCHAIN_{key.upper()}": value for key, value in settings.items()})
    return env


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    address: str = ""
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stderr_text(self) -> str:
        return "".join(self.stderr)

    async def wait(self, timeout: float) -> int:
        """The exit code; the process is killed (and the test fails) after `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                code = await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError(
                f"the server did not exit within {timeout}s; stderr:\n{self.stderr_text}"
            ) from None
        for reader in self._readers:
            await reader
        return code

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        for reader in self._readers:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def _pump(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode(errors="replace"))


async def run_to_end(
    *command: str, env: Mapping[str, str] | None = None, timeout: float = 20.0
) -> tuple[int, str, str]:
    """Run a child process to its end without blocking the event loop (the server under
    test may run on it); killed at `timeout`. Returns code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        *command,
        env=dict(os.environ if env is None else env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def run_serve(env: Mapping[str, str], *args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    """Run `serve` to its end (for --print-config and bad configuration): code, stdout, stderr."""
    return await run_to_end(*SERVE, *args, env=env, timeout=timeout)


async def start_serve(
    env: Mapping[str, str], *args: str, timeout: float = 30.0, **kwargs: Any
) -> ServerProcess:
    """Start `serve` and wait for its listening line."""
    process = await asyncio.create_subprocess_exec(
        *SERVE,
        *args,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        **kwargs,
    )
    assert process.stdout is not None and process.stderr is not None
    server = ServerProcess(process)
    server._readers.append(asyncio.create_task(_pump(process.stderr, server.stderr)))
    try:
        async with asyncio.timeout(timeout):
            while line := (await process.stdout.readline()).decode():
                server.stdout.append(line)
                if line.startswith(LISTENING):
                    server.address = line.removeprefix(LISTENING).strip()
                    break
    except TimeoutError:
        await server.close()
        raise AssertionError(
            f"serve did not start within {timeout}s; stderr:\n{server.stderr_text}"
        ) from None
    if not server.address:
        await server.close()
        raise AssertionError(f"serve exited before listening; stderr:\n{server.stderr_text}")
    server._readers.append(asyncio.create_task(_pump(process.stdout, server.stdout)))
    return server
