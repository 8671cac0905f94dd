"""The benchmark, in one command: the service against its floors and its ceiling.

    python -m bench.run                    # the full run (a few minutes on 2 cores)
    python -m bench.run --quick            # fewer stages per row
    python -m bench.run --smoke            # CI: every row kind, a few hundred stages, < 2 min
    python -m bench.run --requests 3000 --concurrency 1,50 --json bench/results/run.json

Processes (each its own, none shares a CPU budget it does not report):

* the fake backend (`bench.backend`): precomputed answers, keep-alive; one per backend speed;
* service rows: `bench.service_proc` (restarted for every row, so its VmHWM is that row's
  peak RSS) driven by `bench.loadgen`, C callers on a few grpc.aio channels;
* lean rows (the floor): `bench.lean_floor`, one process doing load and the same two phases
  with the leanest HTTP client measured (one pool, `json.loads`, no SDK types);
* sdk rows: `bench.floor`, one process doing load and the two phases with one typed
  `openai.AsyncOpenAI` client: what a user would write instead of calling the service;
* ceiling rows: `bench.ceiling_proc` replaying a real stage's recorded messages with no
  work, driven by the same `bench.loadgen`.

Every row runs the same N measured stages at the same concurrency C after a warm-up, and
every response is checked; a row with any error or failed check is FAILED (exit code 1)
and reports its first error instead of numbers. Targets are reported PASS/MISS and never
change the exit code.

CPU per stage is utime+stime from /proc/<pid>/stat of each process over the measured
window, divided by the stages. A floor process (lean or sdk) also generates its own load,
so its "server" CPU is its total minus the harness's own cost per stage, measured in the
same process with a stage that does nothing but run the same checks (the "client" column
of a floor row). The service's "server" CPU has no load generation in it at all (that is
the load generator's "client" column). Both floors must send the service's very request
bodies: the fake backend counts them by canonical digest, and a floor row whose digests
differ from the service's for the same RPC is FAILED. See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import scenario
from bench.procs import Child, ChildFailed, Snapshot, snapshot, system_busy_seconds

SLOW_DELAY = 0.002
_SHORT = {"service": "svc", "lean": "lean", "sdk": "sdk", "ceiling": "ceil"}
#: The floor row kinds and their processes: the lean loop (the floor) and the typed-SDK loop.
FLOORS = {"lean": "bench.lean_floor", "sdk": "bench.floor"}
#: Row kinds in table order.
KINDS = ("service", "lean", "sdk", "ceiling")


@dataclass
class Plan:
    requests: int
    concurrency: list[int]
    slow_concurrency: int
    slow_requests: int
    slow_reference_requests: int
    slow_delay: float
    first_byte_samples: int
    chunks: int
    deadline: float
    calibrate: int
    ceiling_style: str
    max_connections: int | None
    include_slow: bool
    rpcs: list[str]
    #: "bench": bench.backend (raw asyncio, counts bodies); "tests": tests.fakes.openai_backend.
    backend: str = "bench"
    #: The lean floor's HTTP client ("": bench.lean_floor.DEFAULT_CLIENT).
    lean_client: str = ""


@dataclass
class Row:
    run: str
    kind: str  # service | lean | sdk | ceiling
    rpc: str
    concurrency: int
    requests: int
    status: str = "ok"
    error: str = ""
    stages_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    ttfe_ms: dict[str, float] = field(default_factory=dict)
    #: CPU ms per measured stage: server (service / a floor's work / ceiling), backend, client.
    cpu_ms: dict[str, float] = field(default_factory=dict)
    #: Raw CPU ms per stage by process (the floor's total, before the harness split).
    process_cpu_ms: dict[str, float] = field(default_factory=dict)
    rss_peak_mb: float = 0.0
    other_cpu_pct: float = 0.0
    wall_s: float = 0.0
    max_in_flight: int = 0
    events_per_stage: float = 0.0
    backend_requests: dict[str, int] = field(default_factory=dict)
    backend_connections: int = 0
    ratios: dict[str, float] = field(default_factory=dict)
    #: The HTTP client of a lean row.
    client: str = ""

    @property
    def name(self) -> str:
        return f"{_SHORT[self.kind]} {self.rpc}"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Target:
    name: str
    passed: bool | None  # None: not measurable in this run
    detail: str


class Bench:
    def __init__(self, plan: Plan, log_dir: Path, verbose: bool = True) -> None:
        self.plan = plan
        self.log_dir = log_dir
        self.verbose = verbose
        self.rows: list[Row] = []
        self.first_byte: dict[str, Any] = {}
        self.events: dict[str, Any] = {}
        self.notes: list[str] = []
        self._row_counter = 0

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    # -- children -------------------------------------------------------------------

    def _child(self, role: str, module: str, args: list[str]) -> Child:
        self._row_counter += 1
        return Child(f"{self._row_counter:03d}-{role}", module, args, self.log_dir)

    def start_backend(self, delay: float) -> tuple[Child, str]:
        module = "bench.backend" if self.plan.backend == "bench" else "tests.fakes.openai_backend"
        child = self._child(
            "backend", module, ["--chunks", str(self.plan.chunks), "--chunk-delay", str(delay)]
        )
        port = child.expect("READY", 60)
        return child, f"http://127.0.0.1:{port}/v1"

    def start_service(self, url: str) -> tuple[Child, str]:
        args = ["--backend-url", url]
        if self.plan.max_connections is not None:
            args += ["--max-connections", str(self.plan.max_connections)]
        child = self._child("service", "bench.service_proc", args)
        try:
            port = child.expect("READY", 120)
        except ChildFailed:
            child.stop()
            raise
        return child, f"127.0.0.1:{port}"

    def backend_stats(self, url: str) -> dict[str, Any]:
        """Request counts by body digest and connections (bench.backend only)."""
        if self.plan.backend != "bench":
            return {"counts": {}, "connections": 1}
        base = url.rsplit("/v1", 1)[0]
        with urllib.request.urlopen(f"{base}/bench/stats", timeout=10) as response:
            stats: dict[str, Any] = json.loads(response.read())
        return stats

    def warmup_for(self, concurrency: int) -> int:
        return max(20, min(2 * concurrency, concurrency + 100))

    # -- one row ----------------------------------------------------------------------

    def run_row(self, row: Row, backend: Child, url: str, responses: Path | None) -> Row:
        self.say(f"  {row.run:<9} {row.name:<22} C={row.concurrency:<5} N={row.requests} ...")
        try:
            before = self.backend_stats(url)
        except OSError as exc:
            raise ChildFailed(
                f"the fake backend does not answer its stats: {exc}\n{backend.log_tail()}"
            ) from None
        children: dict[str, Child] = {"backend": backend}
        started: list[Child] = []
        try:
            driver_args = [
                "--rpc",
                row.rpc,
                "-c",
                str(row.concurrency),
                "-n",
                str(row.requests),
                "--warmup",
                str(self.warmup_for(row.concurrency)),
                "--chunks",
                str(self.plan.chunks),
            ]
            if row.kind in FLOORS:
                args = ["--backend-url", url, "--calibrate", str(self.plan.calibrate), *driver_args]
                if self.plan.max_connections is not None:
                    args += ["--max-connections", str(self.plan.max_connections)]
                if row.kind == "lean" and self.plan.lean_client:
                    args += ["--client", self.plan.lean_client]
                driver = self._child(row.kind, FLOORS[row.kind], args)
                started.append(driver)
                children["floor"] = driver
            else:
                if row.kind == "service":
                    server, target = self.start_service(url)
                else:
                    assert responses is not None
                    server = self._child(
                        "ceiling",
                        "bench.ceiling_proc",
                        ["--responses", str(responses), "--style", self.plan.ceiling_style],
                    )
                    target = f"127.0.0.1:{server.expect('READY', 60)}"
                started.append(server)
                children["server"] = server
                driver = self._child(
                    "loadgen",
                    "bench.loadgen",
                    ["--target", target, "--deadline", str(self.plan.deadline), *driver_args],
                )
                started.append(driver)
                children["client"] = driver
            driver.expect("ARMED", 120 + 0.1 * row.concurrency)
            first = snapshot(children)
            driver.send("GO")
            driver.expect("FINISHED", 120 + 0.05 * row.requests)
            last = snapshot(children)
            server_child = children.get("server", children.get("floor"))
            assert server_child is not None
            rss_kb = server_child.status_kb("VmHWM")
            driver.send("REPORT")
            report: dict[str, Any] = json.loads(driver.expect("RESULT", 60))
            self._fill(row, report, first, last, rss_kb)
        except ChildFailed as exc:
            row.status, row.error = "FAILED", str(exc)
        finally:
            for child in reversed(started):
                child.stop()
        try:
            after = self.backend_stats(url)
            counts: dict[str, int] = {}
            for key, count in after["counts"].items():
                delta = count - before["counts"].get(key, 0)
                if delta:
                    counts[key] = delta
            row.backend_requests = counts
            row.backend_connections = max(0, after["connections"] - before["connections"] - 1)  # minus ours
            self.check_bodies(row)
        except OSError as exc:
            self.notes.append(f"backend stats unavailable after {row.name}: {exc}")
            if row.kind in FLOORS and row.ok:
                row.status, row.error = (
                    "FAILED",
                    f"request bodies not verified: backend stats unavailable: {exc}",
                )
        if row.ok:
            self.say(
                f"    {row.stages_per_s:8.1f} stages/s  p50 {row.latency_ms['p50']:.2f} ms"
                f"  p99 {row.latency_ms['p99']:.2f} ms  server CPU {row.cpu_ms['server']:.2f} ms/stage"
            )
        else:
            self.say(f"    FAILED: {row.error.splitlines()[0]}")
        self.rows.append(row)
        return row

    def _fill(self, row: Row, report: dict[str, Any], first: Snapshot, last: Snapshot, rss_kb: int) -> None:
        measured = max(1, int(report["measured"]))
        errors = int(report["errors"]) + int(report["warmup_errors"])
        if errors or int(report["ok"]) != row.requests:
            row.status = "FAILED"
            row.error = (
                f"{errors} errors ({report['warmup_errors']} in warm-up), {report['ok']}/{row.requests} ok;"
                f" first: {report['first_error'] or '(none recorded)'}"
            )
        row.stages_per_s = float(report["stages_per_s"])
        row.latency_ms = dict(report["latency"])
        row.ttfe_ms = dict(report["ttfe"])
        row.wall_s = float(report["wall_s"])
        row.max_in_flight = int(report["max_in_flight"])
        row.events_per_stage = float(report.get("events_per_stage", 0.0))
        per_stage = {role: (last.cpu[role] - first.cpu[role]) * 1000.0 / measured for role in first.cpu}
        row.process_cpu_ms = per_stage
        row.client = str(report["extra"].get("client", ""))
        if row.kind in FLOORS:
            harness = float(report["extra"].get("harness_cpu_ms", 0.0))
            total = per_stage["floor"]
            row.cpu_ms = {
                "server": max(0.0, total - harness),
                "backend": per_stage["backend"],
                "client": harness,
            }
        else:
            row.cpu_ms = {
                "server": per_stage["server"],
                "backend": per_stage["backend"],
                "client": per_stage["client"],
            }
        row.cpu_ms["total"] = row.cpu_ms["server"] + row.cpu_ms["backend"] + row.cpu_ms["client"]
        row.rss_peak_mb = rss_kb / 1024.0
        _, cpus = system_busy_seconds()
        wall = max(1e-9, last.wall - first.wall)
        ours = sum(last.cpu[role] - first.cpu[role] for role in first.cpu)
        row.other_cpu_pct = max(0.0, (last.busy - first.busy - ours) / (wall * cpus) * 100.0)

    # -- runs ---------------------------------------------------------------------------

    def record(self, url: str, path: Path) -> None:
        """One real stage of each RPC, recorded for the ceiling; the sizes go in the report."""
        service, target = self.start_service(url)
        try:
            recorder = self._child(
                "record",
                "bench.loadgen",
                ["--target", target, "--record", str(path), "--chunks", str(self.plan.chunks)],
            )
            code = recorder.proc.wait(120)
            recorder.stop()
            if code != 0 or not path.exists():
                raise ChildFailed(
                    f"recording the ceiling's responses failed ({code}):\n{recorder.log_tail()}"
                )
        finally:
            service.stop()
        raw = json.loads(path.read_text(encoding="utf-8"))
        for rpc in scenario.RPCS:
            sizes = [len(base64.b64decode(m)) for m in raw[rpc]]
            self.events[rpc] = {"messages": len(sizes), "bytes": sum(sizes), "sizes": sizes}

    def measure_first_byte(self, url: str) -> None:
        probe = self._child(
            "firstbyte",
            "bench.floor",
            ["--backend-url", url, "--first-byte", str(self.plan.first_byte_samples)],
        )
        try:
            self.first_byte = json.loads(probe.expect("RESULT", 120))
        finally:
            probe.stop()

    def fast_runs(self) -> None:
        plan = self.plan
        backend, url = self.start_backend(0.0)
        try:
            responses = self.log_dir / "ceiling-responses.json"
            self.say("recording one stage of each RPC for the ceiling ...")
            ceiling_ok = True
            try:
                self.record(url, responses)
            except ChildFailed as exc:
                ceiling_ok = False
                self.notes.append(f"no ceiling rows: {exc}")
                self.say(f"  {exc}")
            self.say("measuring the backend's first byte with a raw client ...")
            try:
                self.measure_first_byte(url)
            except ChildFailed as exc:
                self.notes.append(f"no backend first-byte figure: {exc}")
            for concurrency in plan.concurrency:
                run = "unloaded" if concurrency == 1 else "loaded"
                for rpc in plan.rpcs:
                    for kind in KINDS:
                        if kind == "ceiling" and not ceiling_ok:
                            continue
                        row = Row(run, kind, rpc, concurrency, plan.requests)
                        self.run_row(row, backend, url, responses)
        finally:
            backend.stop()

    def slow_runs(self) -> None:
        plan = self.plan
        backend, url = self.start_backend(plan.slow_delay)
        try:
            for concurrency, requests in (
                (1, plan.slow_reference_requests),
                (plan.slow_concurrency, plan.slow_requests),
            ):
                for kind in ("service", "lean", "sdk"):
                    row = Row("slow", kind, "StreamSynthesis", concurrency, requests)
                    self.run_row(row, backend, url, None)
        finally:
            backend.stop()

    # -- results ------------------------------------------------------------------------

    def find(self, run: str, kind: str, rpc: str, concurrency: int) -> Row | None:
        for row in self.rows:
            if (row.run, row.kind, row.rpc, row.concurrency) == (run, kind, rpc, concurrency):
                return row
        return None

    def compute_ratios(self) -> None:
        for row in self.rows:
            if row.kind != "service" or not row.ok:
                continue
            for kind in FLOORS:
                floor = self.find(row.run, kind, row.rpc, row.concurrency)
                if floor is None or not floor.ok or floor.stages_per_s <= 0:
                    continue
                row.ratios[f"throughput_vs_{kind}"] = row.stages_per_s / floor.stages_per_s
                if floor.latency_ms["p99"] > 0:
                    row.ratios[f"p99_vs_{kind}"] = row.latency_ms["p99"] / floor.latency_ms["p99"]
                row.ratios[f"server_cpu_minus_{kind}_ms"] = row.cpu_ms["server"] - floor.cpu_ms["server"]
            ceiling = self.find(row.run, "ceiling", row.rpc, row.concurrency)
            if ceiling is not None and ceiling.ok and ceiling.stages_per_s > 0:
                row.ratios["throughput_vs_ceiling"] = row.stages_per_s / ceiling.stages_per_s
            lean = self.find(row.run, "lean", row.rpc, row.concurrency)
            if lean is not None and lean.ok and ceiling is not None and ceiling.ok:
                row.ratios["server_cpu_beyond_lean_and_ceiling_ms"] = (
                    row.cpu_ms["server"] - lean.cpu_ms["server"] - ceiling.cpu_ms["server"]
                )

    def check_bodies(self, row: Row) -> None:
        """A floor row must send exactly the service's request bodies (canonical digests
        counted by the fake backend); one that sent any other body is FAILED. The bodies of
        an RPC depend neither on C nor on the backend's speed, so the reference is the
        service row of the same run and C, else any good service row of the RPC."""
        if row.kind not in FLOORS or not row.ok or self.plan.backend != "bench":
            return
        service = self.find(row.run, "service", row.rpc, row.concurrency)
        if service is None or not service.ok or not service.backend_requests:
            service = next(
                (
                    r
                    for r in self.rows
                    if r.kind == "service" and r.rpc == row.rpc and r.ok and r.backend_requests
                ),
                None,
            )
        if service is None:
            self.notes.append(
                f"{row.run} {row.name} C={row.concurrency}: no service row to compare bodies with"
            )
            return
        mine, theirs = set(row.backend_requests), set(service.backend_requests)
        if mine != theirs:
            row.status = "FAILED"
            row.error = (
                f"request bodies differ from the service's ({service.run} C={service.concurrency}):"
                f" {row.kind} sent {sorted(mine)}, the service {sorted(theirs)}"
                " (kind:digest; GET /bench/bodies on the fake backend shows the bodies)"
            )

    def targets(self) -> list[Target]:
        """The issue's targets, against the floor (the lean row); each detail also gives the
        typed-SDK loop's figure (what a user would write instead) for reference."""
        out: list[Target] = []
        loaded = max(self.plan.concurrency)
        tag = f"C={loaded}"

        def rows(rpc: str, concurrency: int) -> tuple[Row | None, Row | None, Row | None]:
            run = "unloaded" if concurrency == 1 else "loaded"
            found = (self.find(run, kind, rpc, concurrency) for kind in ("service", "lean", "sdk"))
            svc, lean, sdk = (row if row is not None and row.ok else None for row in found)
            return svc, lean, sdk

        def versus_sdk(svc: Row, sdk: Row | None, text: str) -> str:
            if sdk is None:
                return ""
            return "; sdk loop: " + text.format(
                thr=svc.stages_per_s / sdk.stages_per_s,
                rate=sdk.stages_per_s,
                p99=svc.latency_ms["p99"] / sdk.latency_ms["p99"],
                cpu=sdk.cpu_ms["server"],
            )

        svc, lean, sdk = rows("StreamSynthesis", loaded)
        if svc and lean:
            thr = svc.stages_per_s / lean.stages_per_s
            p99 = svc.latency_ms["p99"] / lean.latency_ms["p99"]
            out.append(
                Target(
                    f"StreamSynthesis throughput >= 1.0x floor with p99 <= 1.2x floor's ({tag})",
                    thr >= 1.0 and p99 <= 1.2,
                    f"throughput {thr:.2f}x ({svc.stages_per_s:.0f} vs {lean.stages_per_s:.0f}/s),"
                    f" p99 {p99:.2f}x ({svc.latency_ms['p99']:.1f} vs {lean.latency_ms['p99']:.1f} ms)"
                    + versus_sdk(svc, sdk, "{thr:.2f}x ({rate:.0f}/s), p99 {p99:.2f}x"),
                )
            )
            extra = svc.cpu_ms["server"] - lean.cpu_ms["server"]
            out.append(
                Target(
                    f"service CPU per StreamSynthesis stage <= floor's + 1.5 ms ({tag})",
                    extra <= 1.5,
                    f"service {svc.cpu_ms['server']:.2f} ms vs lean floor work {lean.cpu_ms['server']:.2f} ms"
                    f" ({extra:+.2f} ms; floor process total {lean.process_cpu_ms.get('floor', 0):.2f} ms)"
                    + versus_sdk(svc, sdk, "{cpu:.2f} ms"),
                )
            )
        else:
            out.append(Target(f"StreamSynthesis vs floor ({tag})", None, "a row failed or did not run"))
        svc, lean, sdk = rows("RunTools", loaded)
        name = f"RunTools throughput >= 0.9x floor ({tag})"
        if svc and lean:
            thr = svc.stages_per_s / lean.stages_per_s
            out.append(
                Target(
                    name,
                    thr >= 0.9,
                    f"{thr:.2f}x ({svc.stages_per_s:.0f} vs {lean.stages_per_s:.0f}/s)"
                    + versus_sdk(svc, sdk, "{thr:.2f}x ({rate:.0f}/s)"),
                )
            )
        else:
            out.append(Target(name, None, "a row failed or did not run"))
        if self.plan.include_slow:
            c = self.plan.slow_concurrency
            slow = self.find("slow", "service", "StreamSynthesis", c)
            reference = self.find("slow", "service", "StreamSynthesis", 1)
            name = f"{c} streams on the slow backend: no errors, peak RSS <= 300 MB, TTFE p99 <= 2x unloaded"
            if slow is None or reference is None:
                out.append(Target(name, None, "did not run"))
            elif not slow.ok:
                out.append(Target(name, False, f"errors: {slow.error.splitlines()[0]}"))
            elif not reference.ok:
                out.append(Target(name, None, "the unloaded reference row failed"))
            else:
                ratio = slow.ttfe_ms["p99"] / max(1e-9, reference.ttfe_ms["p99"])
                out.append(
                    Target(
                        name,
                        slow.rss_peak_mb <= 300 and ratio <= 2.0,
                        f"no errors, RSS {slow.rss_peak_mb:.0f} MB, TTFE p99 {slow.ttfe_ms['p99']:.1f} ms"
                        f" = {ratio:.1f}x unloaded {reference.ttfe_ms['p99']:.1f} ms"
                        f" (max {slow.max_in_flight} streams in flight)",
                    )
                )
        svc = self.find("unloaded", "service", "StreamSynthesis", 1)
        name = "unloaded TTFE <= backend first byte + 1 ms (StreamSynthesis C=1, p50)"
        if svc is not None and svc.ok and self.first_byte:
            fb = float(self.first_byte["first_event"]["p50"])
            out.append(
                Target(
                    name,
                    svc.ttfe_ms["p50"] <= fb + 1.0,
                    f"TTFE p50 {svc.ttfe_ms['p50']:.2f} ms vs backend first event {fb:.2f} ms"
                    f" ({svc.ttfe_ms['p50'] - fb:+.2f} ms; p99 {svc.ttfe_ms['p99']:.2f} vs"
                    f" {float(self.first_byte['first_event']['p99']):.2f} ms)",
                )
            )
        else:
            out.append(Target(name, None, "no unloaded StreamSynthesis row or no first-byte figure"))
        return out


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def table(rows: Sequence[Row]) -> str:
    headers = [
        "run",
        "row",
        "C",
        "N",
        "stages/s",
        "p50 ms",
        "p99 ms",
        "TTFE50",
        "TTFE99",
        "srv CPU",
        "be CPU",
        "cli CPU",
        "tot CPU",
        "RSS MB",
        "srv-lean",
        "thr/lean",
        "p99/lean",
        "thr/sdk",
        "thr/ceil",
        "ev/stage",
        "other%",
        "status",
    ]
    lines: list[list[str]] = []
    for row in rows:
        if not row.ok and not row.latency_ms:
            cells = [row.run, row.name, str(row.concurrency), str(row.requests)]
            cells += ["-"] * (len(headers) - len(cells) - 1)
            cells.append("FAILED")
            lines.append(cells)
            continue
        ratios = row.ratios
        cells = [
            row.run,
            row.name,
            str(row.concurrency),
            str(row.requests),
            fmt(row.stages_per_s, 1),
            fmt(row.latency_ms["p50"]),
            fmt(row.latency_ms["p99"]),
            fmt(row.ttfe_ms["p50"]),
            fmt(row.ttfe_ms["p99"]),
            fmt(row.cpu_ms["server"]),
            fmt(row.cpu_ms["backend"]),
            fmt(row.cpu_ms["client"]),
            fmt(row.cpu_ms["total"]),
            fmt(row.rss_peak_mb, 0),
            f"{ratios['server_cpu_minus_lean_ms']:+.2f}" if "server_cpu_minus_lean_ms" in ratios else "",
            fmt(ratios["throughput_vs_lean"]) if "throughput_vs_lean" in ratios else "",
            fmt(ratios["p99_vs_lean"]) if "p99_vs_lean" in ratios else "",
            fmt(ratios["throughput_vs_sdk"]) if "throughput_vs_sdk" in ratios else "",
            fmt(ratios["throughput_vs_ceiling"]) if "throughput_vs_ceiling" in ratios else "",
            fmt(row.events_per_stage, 1) if row.events_per_stage else "",
            fmt(row.other_cpu_pct, 0),
            "ok" if row.ok else "FAILED",
        ]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(headers)]
    left = {0, 1, len(headers) - 1}

    def render(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [render(headers), render(["-" * w for w in widths])]
    previous = ""
    for cells, row in zip(lines, rows, strict=True):
        group = f"{row.run}/{row.concurrency}"
        if previous and group != previous:
            out.append("")
        previous = group
        out.append(render(cells))
    return "\n".join(out)


def beyond(bench: Bench) -> list[str]:
    """What the service's process spends per stage beyond the unavoidable: the lean floor's
    work (HTTP, JSON, the tool) plus the ceiling's (gRPC serving the same messages)."""
    lines: list[list[str]] = []
    for svc in bench.rows:
        if svc.kind != "service" or not svc.ok:
            continue
        lean = bench.find(svc.run, "lean", svc.rpc, svc.concurrency)
        found = bench.find(svc.run, "ceiling", svc.rpc, svc.concurrency)
        ceil = found if found is not None and found.ok else None
        sdk = bench.find(svc.run, "sdk", svc.rpc, svc.concurrency)
        if lean is None or not lean.ok:
            continue
        extra = svc.cpu_ms["server"] - lean.cpu_ms["server"]
        cells = [
            svc.run,
            svc.rpc,
            str(svc.concurrency),
            fmt(svc.cpu_ms["server"]),
            fmt(lean.cpu_ms["server"]),
            fmt(ceil.cpu_ms["server"]) if ceil else "",
            f"{extra:+.2f}",
            f"{extra - ceil.cpu_ms['server']:+.2f}" if ceil else "",
            fmt(sdk.cpu_ms["server"]) if sdk is not None and sdk.ok else "",
        ]
        lines.append(cells)
    if not lines:
        return []
    headers = ["run", "RPC", "C", "svc", "lean", "ceil", "svc-lean", "svc-lean-ceil", "sdk"]
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(headers)]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [
        "",
        "service CPU beyond the unavoidable (srv CPU ms per stage: the service; the lean floor's work;"
        " the ceiling's gRPC;",
        "  svc-lean-ceil = what the service spends beyond both; sdk = the typed-SDK loop's work, for scale):",
        render(headers),
        render(["-" * w for w in widths]),
        *(render(cells) for cells in lines),
    ]


def report_text(bench: Bench, targets: Sequence[Target], started: float) -> str:
    plan = bench.plan
    load = os.getloadavg()
    lean_client = next((row.client for row in bench.rows if row.kind == "lean" and row.client), "")
    lines = [
        "",
        f"toolchain-grpc benchmark: {platform.python_implementation()} {platform.python_version()},"
        f" {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f},"
        f" {time.time() - started:.0f} s",
        f"stage: calculator(2+3) + {plan.chunks}-chunk synthesis; N={plan.requests} measured stages per"
        f" row (slow: {plan.slow_requests} at C={plan.slow_concurrency},"
        f" {plan.slow_delay * 1000:.0f} ms between chunks)",
    ]
    if bench.events:
        parts = [
            f"{rpc} {info['messages']} msg / {info['bytes']} B"
            + (f" (event sizes {min(info['sizes'])}-{max(info['sizes'])} B)" if info["messages"] > 1 else "")
            for rpc, info in bench.events.items()
        ]
        lines.append("responses of one stage (what the ceiling replays): " + "; ".join(parts))
    if bench.first_byte:
        fb, fe = bench.first_byte["first_byte"], bench.first_byte["first_event"]
        lines.append(
            f"backend first byte (raw socket, C=1): p50 {fb['p50']:.3f} ms p99 {fb['p99']:.3f} ms;"
            f" first SSE event p50 {fe['p50']:.3f} ms p99 {fe['p99']:.3f} ms"
        )
    lines += [
        "",
        "legend: latency and TTFE (time to first event) in ms. CPU in ms per measured stage:",
        "  rows: svc = the service; lean = the floor: the same two phases in one process with the leanest"
        + (f" HTTP client ({lean_client}), json.loads, no SDK" if lean_client else " HTTP client, no SDK"),
        "    sdk = the same with one typed openai.AsyncOpenAI client (what a user would write instead);"
        " ceil = the ceiling",
        "  srv = the service process | a floor's work (its process total minus its harness) | the ceiling",
        "  be = the fake backend; cli = the load generator | a floor's own harness; tot = srv + be + cli",
        "  RSS = peak RSS (VmHWM) of the srv process, restarted per row",
        "  srv-lean = service srv CPU minus the lean floor's; thr/lean, p99/lean, thr/sdk, thr/ceil ="
        " service row over the lean / sdk / ceiling row of the same RPC and C",
        "  other% = machine CPU used outside the benchmark's processes during the row (others' load)",
        "",
        table(bench.rows),
        *beyond(bench),
        "",
        "targets (against the floor, the lean row):",
    ]
    for target in targets:
        verdict = "n/a " if target.passed is None else ("PASS" if target.passed else "MISS")
        lines.append(f"  {verdict}  {target.name}: {target.detail}")
    failed = [row for row in bench.rows if not row.ok]
    if failed:
        lines += ["", "FAILED rows (first error):"]
        for row in failed:
            lines.append(f"  {row.run} {row.name} C={row.concurrency}: {row.error}")
    churn = [
        f"{row.name} C={row.concurrency}: {row.backend_connections} connections for"
        f" {sum(row.backend_requests.values())} requests"
        for row in bench.rows
        # A pool legitimately grows to C connections; churn is more than that.
        if row.ok
        and row.backend_connections > max(16, row.concurrency, sum(row.backend_requests.values()) // 10)
    ]
    if churn:
        lines += ["", "backend connection churn (keep-alive not reused):", *(f"  {c}" for c in churn)]
    if bench.notes:
        lines += ["", "notes:", *(f"  {n}" for n in bench.notes)]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CI: every row kind, few stages, < 2 minutes")
    parser.add_argument("--quick", action="store_true", help="fewer stages per row (300)")
    parser.add_argument("--requests", "-n", type=int, default=None, help="measured stages per row (1000)")
    parser.add_argument("--concurrency", "-c", default=None, help="comma-separated list (1,50)")
    parser.add_argument(
        "--slow-concurrency", type=int, default=None, help="open streams on the slow backend (1000)"
    )
    parser.add_argument("--slow-requests", type=int, default=None, help="measured stages of that row (2000)")
    parser.add_argument("--slow-delay", type=float, default=SLOW_DELAY, help="seconds between slow chunks")
    parser.add_argument("--no-slow", action="store_true", help="skip the slow-backend run")
    parser.add_argument("--rpc", action="append", choices=scenario.RPCS, help="only these RPCs (repeatable)")
    parser.add_argument("--chunks", type=int, default=scenario.DEFAULT_CHUNKS)
    parser.add_argument("--deadline", type=float, default=60.0, help="gRPC deadline per call, s (0: none)")
    parser.add_argument("--max-connections", type=int, default=None, help="backend pool of service and floor")
    parser.add_argument(
        "--backend",
        choices=("bench", "tests"),
        default="bench",
        help="fake backend: bench.backend (default; checks request bodies) or tests.fakes.openai_backend",
    )
    parser.add_argument("--ceiling-style", choices=("write", "generator"), default="write")
    parser.add_argument(
        "--lean-client",
        default="",
        help="the lean floor's HTTP client (default: bench.lean_floor.DEFAULT_CLIENT)",
    )
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--logs", default="", help="directory for the children's logs (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    # (stages per row, concurrencies, slow C, slow N, slow C=1 N, first-byte samples, calibration)
    presets: dict[str, tuple[int, list[int], int, int, int, int, int]] = {
        "smoke": (40, [1, 8], 100, 200, 20, 50, 500),
        "quick": (300, [1, 50], 1000, 1000, 100, 200, 2000),
        "full": (1000, [1, 50], 1000, 2000, 200, 500, 5000),
    }
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    requests, concurrency, slow_c, slow_n, ref_n, first, calibrate = presets[preset]
    if args.requests is not None:
        requests = args.requests
    if args.concurrency:
        concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return Plan(
        requests=requests,
        concurrency=concurrency,
        slow_concurrency=args.slow_concurrency or slow_c,
        slow_requests=args.slow_requests or slow_n,
        slow_reference_requests=ref_n,
        slow_delay=args.slow_delay,
        first_byte_samples=first,
        chunks=args.chunks,
        deadline=args.deadline,
        calibrate=calibrate,
        ceiling_style=args.ceiling_style,
        max_connections=args.max_connections,
        include_slow=not args.no_slow,
        rpcs=list(args.rpc or scenario.RPCS),
        backend=args.backend,
        lean_client=args.lean_client,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from bench.common import raise_fd_limit

    args = parse_args(argv)
    plan = make_plan(args)
    raise_fd_limit()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        log_dir = Path(args.logs) if args.logs else Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        bench = Bench(plan, log_dir, verbose=not args.quiet)
        try:
            bench.fast_runs()
            if plan.include_slow:
                bench.slow_runs()
        except ChildFailed as exc:  # the backend itself failed: nothing else can run
            bench.notes.append(f"aborted: {exc}")
        except KeyboardInterrupt:
            bench.notes.append("interrupted")
        if plan.backend != "bench":
            bench.notes.append("request bodies not compared: the tests' fake backend does not count them")
        bench.compute_ratios()
        targets = bench.targets()
        print(report_text(bench, targets, started), flush=True)
        if args.json:
            out = {
                "meta": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "loadavg_end": os.getloadavg(),
                    "seconds": time.time() - started,
                    "plan": asdict(plan),
                },
                "events": bench.events,
                "first_byte": bench.first_byte,
                "rows": [asdict(row) | {"name": row.name} for row in bench.rows],
                "targets": [asdict(t) for t in targets],
                "notes": bench.notes,
            }
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")
        aborted = any(n.startswith(("aborted", "interrupted")) for n in bench.notes)
        return 1 if aborted or any(not row.ok for row in bench.rows) or not bench.rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
