"""The closed-loop harness both drivers (the gRPC load generator and the floor) run.

C workers run stages back to back. Warm-up stages run until the parent says GO; from
then on the next N stage *starts* are measured and the workers stop; the window is GO to
the last measured stage's end. The parent reads every process's CPU time at GO and at
FINISHED, so warm-up and set-up never count. Protocol on stdout/stdin:

    child: ARMED        (warm-up done)        parent: GO
    child: FINISHED     (window closed)       parent: REPORT
    child: RESULT {json}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import checks, common
from bench.scenario import percentile

#: A stage: returns (first-event instant, last-event instant) in perf_counter seconds,
#: after checking the response; raises on any failure.
Stage = Callable[[], Awaitable[tuple[float, float]]]


@dataclass
class Summary:
    """Order statistics of one measure, in milliseconds."""

    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    mean: float = 0.0

    @classmethod
    def of(cls, seconds: list[float]) -> Summary:
        if not seconds:
            return cls()
        values = sorted(s * 1000.0 for s in seconds)
        return cls(
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            max=values[-1],
            mean=sum(values) / len(values),
        )


@dataclass
class Report:
    """What a driver sends back at the end of a row."""

    measured: int = 0
    ok: int = 0
    errors: int = 0
    warmup_errors: int = 0
    first_error: str = ""
    wall_s: float = 0.0
    stages_per_s: float = 0.0
    latency: Summary = field(default_factory=Summary)
    ttfe: Summary = field(default_factory=Summary)
    max_in_flight: int = 0
    #: Events per streamed stage (the checks count them; 0 for unary rows and floors).
    events_per_stage: float = 0.0
    warmup_stages: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    details = getattr(exc, "details", None)
    if callable(details):  # grpc.aio.AioRpcError
        with contextlib.suppress(Exception):  # best effort only
            text = f"{type(exc).__name__}: {exc.code().name}: {details()}"  # type: ignore[attr-defined]
    if text.endswith(":"):
        text += " " + "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text[:500]


class Harness:
    def __init__(self, stage: Stage, concurrency: int, requests: int, warmup: int) -> None:
        self.stage = stage
        self.concurrency = concurrency
        self.remaining = requests
        self.warmup = warmup
        self.measuring = False
        self.armed = asyncio.Event()
        self.warm_done = 0
        self.in_flight = 0
        self.report = Report()
        self.latencies: list[float] = []
        self.ttfes: list[float] = []

    def _fail(self, exc: BaseException, measured: bool) -> None:
        if measured:
            self.report.errors += 1
        else:
            self.report.warmup_errors += 1
        if not self.report.first_error:
            self.report.first_error = describe(exc)

    async def _worker(self) -> None:
        report = self.report
        while True:
            measured = self.measuring
            if measured:
                if self.remaining <= 0:
                    return
                self.remaining -= 1
                self.in_flight += 1
                report.max_in_flight = max(report.max_in_flight, self.in_flight)
            started = time.perf_counter()
            try:
                first, last = await self.stage()
            except Exception as exc:
                self._fail(exc, measured)
                if not measured:
                    await asyncio.sleep(0.01)  # a dead target must not spin
            else:
                if measured:
                    report.ok += 1
                    self.latencies.append(last - started)
                    self.ttfes.append(first - started)
            if measured:
                report.measured += 1
                self.in_flight -= 1
            else:
                self.warm_done += 1
                if self.warm_done >= self.warmup:
                    self.armed.set()

    async def run(self) -> Report:
        """The whole protocol; returns after RESULT was printed."""
        if self.warmup <= 0:
            self.armed.set()
        workers = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]
        await self.armed.wait()
        common.announce("ARMED")
        if await common.read_command() != "GO":
            for task in workers:
                task.cancel()
            raise SystemExit(2)
        go = time.perf_counter()
        checks.Counts.reset()
        self.report.warmup_stages = self.warm_done
        self.measuring = True
        await asyncio.gather(*workers)
        report = self.report
        report.wall_s = time.perf_counter() - go
        report.stages_per_s = report.measured / report.wall_s if report.wall_s > 0 else 0.0
        report.latency = Summary.of(self.latencies)
        report.ttfe = Summary.of(self.ttfes)
        report.events_per_stage = checks.Counts.per_stream()
        common.announce("FINISHED")
        if await common.read_command() != "REPORT":
            raise SystemExit(2)
        common.announce("RESULT " + json.dumps(asdict(report)))
        return report


async def harness_cpu_ms(concurrency: int, stages: int, check: Callable[[], None]) -> float:
    """CPU ms per stage that the harness itself costs at this concurrency: the same workers
    and bookkeeping around a stage that only yields once and runs the row's response check."""

    async def noop() -> tuple[float, float]:
        await asyncio.sleep(0)
        now = time.perf_counter()
        check()
        return now, now

    harness = Harness(noop, concurrency, stages, 0)
    harness.measuring = True
    cpu = time.process_time()
    await asyncio.gather(*(harness._worker() for _ in range(concurrency)))
    return (time.process_time() - cpu) * 1000.0 / max(1, stages)
