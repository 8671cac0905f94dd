"""A supervised model process: llama.cpp's `llama-server`, out of the service's process.

    start() ─▶ spawn ─▶ wait for GET /health = 200 ─▶ READY ─┬─▶ exits (crash, OOM kill)
                 ▲                                           └─▶ watchdog: /health silent
                 │                                               `watchdog_timeout` twice ─▶ SIGKILL
                 └──────────── backoff (doubling, capped) ◀──── DOWN ◀─────┘

A native fault in the model (an instruction the CPU advertises but cannot run, an OOM
kill) ends only this child: the service keeps serving every other backend, every request
in flight on the model fails with a connection error that the backend reports as
UNAVAILABLE, and the process is started again with backoff. The child is started in its
own session (a terminal's Ctrl-C goes to the service, which drains) and, on Linux, through
`setsid setpriv --pdeathsig KILL`, so it dies with the service even when the service is
SIGKILLed (see `_isolated`).

`listeners` are called (on the event loop) on every change of `ready`, so health can
follow at once. `generation` counts starts; `exit_since(generation)` tells a request that
failed whether the process it used has died since (and how), waiting briefly for the exit
to be reaped, so that its error can say "the model process was killed by SIGSEGV" rather
than "the connection was cut".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from toolchain_service.errors import BackendError

log = logging.getLogger(__name__)


def _isolated(command: list[str]) -> tuple[list[str], dict[str, Any]]:
    """How to start `command` in a session of its own that dies with this process: on Linux
    with util-linux, `setsid setpriv --pdeathsig KILL -- command` (no Python code runs in
    the forked child, which has the locks of gRPC's threads); elsewhere a plain start in a
    new session (the child then outlives a SIGKILLed service)."""
    setsid, setpriv = shutil.which("setsid"), shutil.which("setpriv")
    if sys.platform.startswith("linux") and setsid and setpriv:
        return [setsid, setpriv, "--pdeathsig", "KILL", "--", *command], {}
    return command, {"start_new_session": True}


def describe_exit(returncode: int) -> str:
    """'killed by SIGSEGV' or 'exited with status 1'."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class ProcessPolicy:
    start_timeout: float = 120.0
    watchdog_interval: float = 2.0
    watchdog_timeout: float = 5.0
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    #: A process that stayed up this long resets the backoff.
    stable_after: float = 60.0


@dataclass(frozen=True, slots=True)
class Exit:
    generation: int
    returncode: int
    how: str


class StartupFailed(Exception):
    """The first start did not reach READY; the message says why (with the log tail)."""


class ModelProcess:
    """One supervised child process serving HTTP on 127.0.0.1:`port`."""

    def __init__(
        self,
        name: str,
        command: Callable[[int], Sequence[str]],
        policy: ProcessPolicy,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self._command = command
        self._policy = policy
        self._env = env
        self.port = 0
        self.generation = 0
        self.restarts = 0
        self.ready = False
        self.pid: int | None = None
        self.last_exit: Exit | None = None
        self.listeners: list[Callable[[], None]] = []
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._log_tail: collections.deque[str] = collections.deque(maxlen=40)
        self._closing = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return "\n".join(self._log_tail)

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the process and wait until it serves; later deaths restart it."""
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._supervise(first), name=f"model-process-{self.name}")
        try:
            await first
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop_process()
        self._set_ready(False)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the running process (operators' and tests' way to force a restart)."""
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(sig)

    # -- supervision ---------------------------------------------------------------------

    async def _supervise(self, first: asyncio.Future[None]) -> None:
        failures = 0
        while not self._closing:
            started = time.monotonic()
            try:
                await self._spawn()
                await self._wait_ready()
            except Exception as exc:  # _NotReady, or a bug: either way this start failed
                if not isinstance(exc, _NotReady):
                    log.exception("model process %s: starting failed unexpectedly", self.name)
                await self._stop_process()
                if not first.done():
                    first.set_exception(StartupFailed(str(exc)))
                    return
                log.error("model process %s did not start: %s", self.name, exc)
            else:
                self._set_ready(True)
                if not first.done():
                    first.set_result(None)
                log.info(
                    "model process %s serving on port %d (pid %s, start %d)",
                    self.name,
                    self.port,
                    self.pid,
                    self.generation,
                )
                await self._watch()
            self._set_ready(False)
            if self._closing:
                return
            if time.monotonic() - started >= self._policy.stable_after:
                failures = 0
            delay = min(self._policy.max_backoff, self._policy.initial_backoff * 2.0**failures)
            failures += 1
            self.restarts += 1
            log.warning(
                "model process %s: restarting in %.1f s (restart %d)", self.name, delay, self.restarts
            )
            await asyncio.sleep(delay)

    async def _spawn(self) -> None:
        self.port = free_port()
        self.generation += 1
        self._exited = asyncio.Event()
        self._log_tail.clear()
        try:
            command, how = _isolated(list(self._command(self.port)))
        except BackendError as exc:
            raise _NotReady(exc.message) from None
        try:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env,
                **how,
            )
        except OSError as exc:
            raise _NotReady(f"cannot run {command[0]}: {exc.strerror or exc}") from None
        self.pid = self._process.pid
        self._pump_task = asyncio.create_task(
            self._pump(self._process, self.generation), name=f"model-log-{self.name}"
        )

    async def _pump(self, process: asyncio.subprocess.Process, generation: int) -> None:
        """Keep the log's tail, log it at DEBUG, and record the exit when it comes (in
        chunks, not lines: a line longer than a reader's limit must not stop the pump)."""
        assert process.stdout is not None
        pending = b""
        try:
            while chunk := await process.stdout.read(1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > 1 << 16:
                    lines, pending = [*lines, pending], b""
                for raw in lines:
                    line = raw[:2000].decode("utf-8", "replace").rstrip()
                    self._log_tail.append(line)
                    log.debug("model %s: %s", self.name, line)
        except OSError:  # the pipe broke: the exit still counts
            pass
        returncode = await process.wait()
        self.last_exit = Exit(generation, returncode, describe_exit(returncode))
        if self.ready and not self._closing:  # a failed start is reported by whoever waited for it
            log.error("model process %s (pid %s) %s", self.name, process.pid, self.last_exit.how)
        self._exited.set()

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._policy.start_timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if self._exited.is_set():
                    how = self.last_exit.how if self.last_exit else "exited"
                    raise _NotReady(f"the model process {how} while starting:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"{self.base_url}/health")
                    if response.status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise _NotReady(
                        f"the model process did not serve within {self._policy.start_timeout:g} s:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await self._exited.wait()

    async def _watch(self) -> None:
        """Until the process exits; a process whose /health stays silent is killed."""
        silent = 0
        async with httpx.AsyncClient(timeout=self._policy.watchdog_timeout) as client:
            while not self._exited.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._policy.watchdog_interval):
                        await self._exited.wait()
                    break
                try:
                    response = await client.get(f"{self.base_url}/health")
                    silent = 0 if response.status_code == 200 else silent + 1
                except httpx.HTTPError:
                    silent += 1
                if silent >= 2 and not self._exited.is_set():
                    log.error(
                        "model process %s (pid %s): /health silent for %d probes; killing it",
                        self.name,
                        self.pid,
                        silent,
                    )
                    self._set_ready(False)
                    self.kill(signal.SIGKILL)
                    await self._exited.wait()

    async def _stop_process(self) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                async with asyncio.timeout(10):
                    await self._exited.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self._process = None

    def _set_ready(self, ready: bool) -> None:
        if ready == self.ready:
            return
        self.ready = ready
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:  # a listener's bug must not stop supervision
                log.exception("model process %s: a state listener failed", self.name)

    async def exit_since(self, generation: int, wait: float = 1.0) -> Exit | None:
        """How the process of `generation` ended, if it did (waiting up to `wait` s)."""
        if self.generation == generation and not self._exited.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._exited.wait()
        exit_ = self.last_exit
        if exit_ is not None and exit_.generation >= generation:
            return exit_
        return None


class _NotReady(Exception):
    pass


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
