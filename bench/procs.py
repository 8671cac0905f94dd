"""Parent-side process handling: start a child, wait for its protocol lines, read its CPU
time and memory from /proc, stop it. Linux only (the benchmark reads /proc)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from bench.common import PARENT_PIPE_ENV

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ChildFailed(Exception):
    """A child died, timed out or said something unexpected; the message has its log tail."""


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid`, in seconds (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_status_kb(pid: int, key: str) -> int:
    """A `kB` value of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: current RSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def system_busy_seconds() -> tuple[float, int]:
    """(busy CPU seconds of the whole machine since boot, number of CPUs) from /proc/stat."""
    cpus = 0
    busy = 0
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith("cpu "):
                values = [int(v) for v in line.split()[1:]]
                idle = values[3] + (values[4] if len(values) > 4 else 0)
                busy = sum(values[:8]) - idle  # guest time is already in user
            elif line.startswith("cpu"):
                cpus += 1
    return busy / CLOCK_TICKS, max(1, cpus)


@dataclass
class Snapshot:
    wall: float
    busy: float
    cpu: dict[str, float]


class Child:
    """A benchmark child process with a line protocol on stdout and commands on stdin."""

    def __init__(
        self, name: str, module: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        """`env`: variables set for the child on top of this process's environment."""
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ) | (env or {})
        env[PARENT_PIPE_ENV] = "1"
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.argv = [sys.executable, "-m", module, *args]
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._buffer = b""
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 15) -> str:
        if not self._log.closed:  # stop() closes it; what it wrote is on disk by then
            self._log.flush()
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _failure(self, what: str) -> ChildFailed:
        code = self.proc.poll()
        state = f"exited with {code}" if code is not None else "still running"
        tail = self.log_tail()
        return ChildFailed(
            f"{self.name} ({state}): {what}" + (f"\n--- {self.log_path}:\n{tail}" if tail else "")
        )

    def expect(self, prefix: str, timeout: float) -> str:
        """The rest of the next stdout line starting with `prefix` (other lines are kept)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\n", 1)
                line = raw.decode("utf-8", errors="replace").rstrip("\r")
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
                self.lines.append(line)
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._failure(f"no {prefix!r} line within {timeout:.0f}s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    self.proc.wait(5)
                    raise self._failure(f"closed its stdout before {prefix!r}")
                self._buffer += data

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._failure(f"cannot send {line!r}") from None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def status_kb(self, key: str) -> int:
        return proc_status_kb(self.pid, key)

    def stop(self, timeout: float = 10.0) -> None:
        """Close stdin (the child's stop signal), then SIGTERM, then SIGKILL."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def snapshot(children: dict[str, Child]) -> Snapshot:
    """CPU seconds of each child, the machine's busy seconds and the wall clock, now."""
    busy, _ = system_busy_seconds()
    cpu = {role: child.cpu_seconds() for role, child in children.items()}
    cpu["parent"] = proc_cpu_seconds(os.getpid())
    return Snapshot(time.perf_counter(), busy, cpu)
