"""`toolchain serve --workers N`: N server processes on one port (SO_REUSEPORT), so that
one machine's cores serve, each worker an event loop of its own.

    toolchain serve --workers 2   (the supervisor: no gRPC server of its own)
      ├─ worker 0: toolchain serve --worker-index 0   ─┐ the same HOST:PORT, each socket
      └─ worker 1: toolchain serve --worker-index 1   ─┘ with SO_REUSEPORT

The supervisor has validated the settings before it starts anything (a bad configuration
stops it with exit code 2 and one line). Each worker is a fresh interpreter (exec, never a
fork of a process that has gRPC loaded) running the normal `serve` on the same settings;
the supervisor reads each one's stdout until it printed its listening line (and its
metrics line), then prints `toolchain server listening on HOST:PORT (N workers)`. The
kernel spreads new connections over the workers' sockets; a connection (one gRPC
channel) stays on the worker it landed on.

Workers are replicas like any other: with `cluster.redis_url` they share the stage
registry and CancelStage reaches a stage on any of them; without it each is an
independent server, and CancelStage reaches only the stages of the worker its connection
landed on. Per worker I: `metrics_address` on port + I (port 0: a free port each),
`cluster.replica_id` + `-wI` when one is set (empty: each process makes its own), and
`worker` and `pid` fields on every log line.

SIGTERM or SIGINT to the supervisor goes to every worker, which drains as usual; the
supervisor exits 0 when all exited 0, else 1. A worker that exits on its own (a crash, a
kill) is logged and restarted after a backoff (0.5 s, doubling up to 30 s, back to 0.5 s
once a worker has run 30 s). Worker 0 starts first, the others once it listens; a worker
that fails before all of them are listening stops them all, and the supervisor exits with
its code (2 for a configuration problem found while building the parts, such as a missing
API key or the port taken, told once by worker 0's own line). A worker whose supervisor died (its stdin, a
pipe from the supervisor, closes) drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from toolchain_service.config import Settings
from toolchain_service.logs import FIELDS, record_fields

log = logging.getLogger("toolchain.workers")

LISTENING = "toolchain server listening on "
METRICS = "toolchain metrics on "
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: A worker that served this long before it died is restarted after INITIAL_BACKOFF again.
STABLE_AFTER = 30.0

#: The exit code of `serve` on a configuration problem.
EXIT_CONFIG = 2

#: The command line of worker `index`.
WorkerCommand = Callable[[int], Sequence[str]]


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings: metrics port + index (port 0 stays 0) and replica id +
    `-w<index>` when one is set. Settings checked the results' ranges already."""
    if settings.workers == 1:
        return settings
    update: dict[str, Any] = {}
    if settings.metrics_address:
        host, port = settings.metrics_address.rsplit(":", 1)
        if int(port):
            update["metrics_address"] = f"{host}:{int(port) + index}"
    if settings.cluster.replica_id:
        replica_id = f"{settings.cluster.replica_id}-w{index}"
        update["cluster"] = settings.cluster.model_copy(update={"replica_id": replica_id})
    return settings.model_copy(update=update)


class WorkerFields(logging.Filter):
    """Puts `worker` and `pid` on every record (a handler's filter, in a worker), so the
    workers' lines on the one stderr can be told apart."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.fields = {"worker": index, "pid": os.getpid()}

    def filter(self, record: logging.LogRecord) -> bool:
        setattr(record, FIELDS, {**self.fields, **record_fields(record)})
        return True


def exit_with_parent() -> None:
    """In a worker: drain (SIGTERM to itself) once stdin, the supervisor's pipe, closes:
    no worker outlives a supervisor that was killed."""

    def watch() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(0, 4096):
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="toolchain-parent-watch", daemon=True).start()


def _how(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    address: str = ""
    metrics_url: str = ""
    up: bool = False  # listening (and its metrics line read, when metrics are on)
    code: int | None = None  # the exit code at shutdown; None: not running then


@dataclass
class Supervisor:
    settings: Settings
    command: WorkerCommand
    out: TextIO = field(default_factory=lambda: sys.stdout)
    workers: list[_Worker] = field(init=False)
    stopping: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    started: bool = field(init=False, default=False)  # every worker was up once
    startup_failure: int | None = field(init=False, default=None)  # exit code
    _changed: asyncio.Event = field(init=False, default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.workers = [_Worker(i) for i in range(self.settings.workers)]

    def _fields(self, worker: _Worker) -> dict[str, Any]:
        pid = worker.process.pid if worker.process is not None else None
        return {FIELDS: {"worker": worker.index, "pid": pid}}

    def _notify(self) -> None:
        self._changed.set()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop for good: `sig` to every running worker (again on each call)."""
        self.stopping.set()
        self._notify()
        for worker in self.workers:
            process = worker.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stopping.is_set():
            log.info(
                "%s: stopping %d workers (each drains for up to %.1fs)",
                sig.name,
                len(self.workers),
                self.settings.shutdown_grace,
            )
        self.stop(sig)

    async def _run_once(self, worker: _Worker) -> int:
        """Start the worker, follow its stdout to its end, return its exit code."""
        worker.up = False
        process = await asyncio.create_subprocess_exec(
            *self.command(worker.index),
            stdin=asyncio.subprocess.PIPE,  # closes when this process dies: the worker drains
            stdout=asyncio.subprocess.PIPE,
            process_group=0,  # Ctrl-C reaches the supervisor, which forwards it
        )
        worker.process = process
        log.debug("worker %d started (pid %d)", worker.index, process.pid, extra=self._fields(worker))
        if self.stopping.is_set():  # a signal came while it was being started
            process.send_signal(signal.SIGTERM)
        listening = False
        assert process.stdout is not None
        while raw := await process.stdout.readline():
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.startswith(LISTENING):
                worker.address = line.removeprefix(LISTENING).strip()
                listening = True
                worker.up = not self.settings.metrics_address
            elif line.startswith(METRICS) and listening:
                worker.metrics_url = line.removeprefix(METRICS).strip()
                worker.up = True
            else:
                self.out.write(line + "\n")
                self.out.flush()
                continue
            if worker.up:
                if self.started:
                    log.info("worker %d listening again", worker.index, extra=self._fields(worker))
                self._notify()
        code = await process.wait()
        if process.stdin is not None:
            process.stdin.close()
        worker.up = False
        return code

    async def _keep(self, worker: _Worker) -> None:
        """Run the worker until the supervisor stops, restarting it when it dies."""
        failures = 0
        while True:
            started = time.monotonic()
            code = await self._run_once(worker)
            if self.stopping.is_set():
                worker.code = code
                return
            how = _how(code)
            if not self.started:
                if code != EXIT_CONFIG:  # a configuration problem: the worker's line said it
                    log.error(
                        "worker %d %s before all workers were listening: stopping",
                        worker.index,
                        how,
                        extra=self._fields(worker),
                    )
                self.startup_failure = code if code > 0 else 1
                worker.code = code
                self.stop()
                return
            failures = 1 if time.monotonic() - started >= STABLE_AFTER else failures + 1
            delay = min(INITIAL_BACKOFF * 2 ** (failures - 1), MAX_BACKOFF)
            log.error(
                "worker %d %s: restarting it in %.1fs", worker.index, how, delay, extra=self._fields(worker)
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return

    async def _wait_up(self, workers: list[_Worker]) -> bool:
        while not self.stopping.is_set():
            if all(worker.up for worker in workers):
                return True
            self._changed.clear()
            await self._changed.wait()
        return False

    def _announce(self) -> None:
        address = self.workers[0].address
        print(f"{LISTENING}{address} ({len(self.workers)} workers)", file=self.out, flush=True)
        for worker in self.workers:
            if worker.metrics_url:
                print(f"{METRICS}{worker.metrics_url} (worker {worker.index})", file=self.out, flush=True)

    async def run(self) -> int:
        """Start the workers, keep them running until SIGTERM/SIGINT, then wait for their
        drains. The exit code: 0 when every worker exited 0."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        keepers: list[asyncio.Task[None]] = []

        def keep(workers: list[_Worker]) -> None:
            for worker in workers:
                name = f"toolchain-worker-{worker.index}"
                keepers.append(asyncio.create_task(self._keep(worker), name=name))

        try:
            # Worker 0 first: a problem every worker would have (a missing API key, the port
            # taken) is then told once, by worker 0, and no other worker starts.
            keep(self.workers[:1])
            if await self._wait_up(self.workers[:1]):
                keep(self.workers[1:])
                if await self._wait_up(self.workers):
                    self.started = True
                    self._announce()
            await asyncio.gather(*keepers)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for keeper in keepers:  # only when something failed here: no worker is left behind
                keeper.cancel()
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()
                    await worker.process.wait()
        if self.startup_failure is not None:
            return self.startup_failure
        failed = [w for w in self.workers if w.code not in (0, None)]
        for worker in failed:
            assert worker.code is not None
            log.error("worker %d %s at shutdown", worker.index, _how(worker.code), extra=self._fields(worker))
        log.info("all workers stopped")
        return 1 if failed else 0


async def supervise(settings: Settings, command: WorkerCommand) -> int:
    """Run `settings.workers` workers (each `command(index)`) until SIGTERM/SIGINT."""
    return await Supervisor(settings, command).run()
