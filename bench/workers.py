"""Throughput of `toolchain serve --workers N` for N = 1, 2, ...: the real command, against
the benchmark's fake backend, driven by the benchmark's load generator.

    python -m bench.workers                            # N = 1,2; StreamSynthesis, C=50, 1000 stages
    python -m bench.workers --workers 1,2,4 -c 100 -n 3000 --channels 32

Each row starts `python -m toolchain_client serve --workers N` (settings from TOOLCHAIN_*
variables set here: the fake backend as the default, production defaults otherwise, INFO
JSON logs to a file), warms up, measures N stages at concurrency C on `--channels`
channels (one TCP connection each: the kernel spreads connections, not calls, over the
workers, so a few channels can load them unevenly; the row shows how the measured
stages fell), and stops the server with SIGTERM. CPU ms per stage: the service (the
supervisor and its workers), the load generator and the fake backend, from /proc.

All of it runs on this machine: the load generator and the fake backend take their CPU
from the same cores as the workers, so on a 2-core machine a second worker has little
left to win; the report says how many cores there were and how busy they were.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import scenario
from bench.procs import Child, ChildFailed, proc_cpu_seconds, system_busy_seconds

LISTENING = "toolchain server listening on "


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Row:
    workers: int
    concurrency: int
    requests: int
    status: str = "ok"
    error: str = ""
    stages_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per measured stage, by process role
    busy_pct: float = 0.0  # the whole machine over the window
    other_pct: float = 0.0  # of it, CPU outside this benchmark's processes
    per_worker: list[int] = field(default_factory=list)  # stages each worker ended after warm-up


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _service_env(url: str, port: int, workers: int) -> None:
    """The service's settings, as TOOLCHAIN_* variables of this process (its children
    inherit them): scenario.service_settings on a fixed port, with `workers`."""
    for name in [n for n in os.environ if n.startswith("TOOLCHAIN_")]:
        del os.environ[name]
    os.environ.update(
        {
            "TOOLCHAIN_ADDRESS": f"127.0.0.1:{port}",
            "TOOLCHAIN_WORKERS": str(workers),
            "TOOLCHAIN_DEFAULT_BACKEND": "fake",
            "TOOLCHAIN_BACKENDS": json.dumps({"fake": {"base_url": url, "default_model": scenario.MODEL}}),
            "TOOLCHAIN_TOOLS__WEATHER_URL": f"{url}/weather-unused",
            "TOOLCHAIN_SHUTDOWN_GRACE": "1",
            "TOOLCHAIN_LOG_FORMAT": "json",
        }
    )


def run_row(
    args: argparse.Namespace, number: int, workers: int, url: str, log_dir: Path, backend: Child
) -> Row:
    row = Row(workers, args.concurrency, args.requests)
    print(f"  workers={workers} C={args.concurrency} N={args.requests} ...", file=sys.stderr, flush=True)
    _service_env(url, free_port(), workers)
    service = Child(f"{number:02d}-serve-{workers}", "toolchain_client", ["serve"], log_dir)
    loadgen: Child | None = None
    pids: list[int] = []
    ended_before: Counter[int] = Counter()
    try:
        target = service.expect(LISTENING, 120).split()[0]
        listening = [r for r in _records(service.log_path) if r.get("message", "").startswith(LISTENING)]
        pids = [int(r["pid"]) for r in listening if "pid" in r] or [service.pid]
        roles = {"service": [service.pid, *(p for p in pids if p != service.pid)], "backend": [backend.pid]}
        warmup = max(20, min(2 * args.concurrency, args.concurrency + 100))
        loadgen = Child(
            f"{number:02d}-loadgen-{workers}",
            "bench.loadgen",
            [
                "--target",
                target,
                "--rpc",
                args.rpc,
                "-c",
                str(args.concurrency),
                "-n",
                str(args.requests),
                "--warmup",
                str(warmup),
                "--channels",
                str(args.channels),
            ],
            log_dir,
        )
        roles["loadgen"] = [loadgen.pid]
        loadgen.expect("ARMED", 120)
        ended_before = _ended(service.log_path)

        def cpu() -> dict[str, float]:
            return {role: sum(proc_cpu_seconds(pid) for pid in ps) for role, ps in roles.items()}

        busy0, cpus = system_busy_seconds()
        cpu0, wall0 = cpu(), time.perf_counter()
        loadgen.send("GO")
        loadgen.expect("FINISHED", 300)
        cpu1, wall1 = cpu(), time.perf_counter()
        busy1, _ = system_busy_seconds()
        loadgen.send("REPORT")
        report: dict[str, Any] = json.loads(loadgen.expect("RESULT", 60))
        errors = int(report["errors"]) + int(report["warmup_errors"])
        if errors or int(report["ok"]) != args.requests:
            row.status, row.error = "FAILED", f"{errors} errors; first: {report['first_error']}"
        measured = max(1, int(report["measured"]))
        row.stages_per_s = float(report["stages_per_s"])
        row.latency_ms = {k: float(report["latency"][k]) for k in ("p50", "p99")}
        row.cpu_ms = {role: (cpu1[role] - cpu0[role]) * 1000.0 / measured for role in cpu0}
        capacity = max(1e-9, wall1 - wall0) * cpus
        ours = sum(cpu1[role] - cpu0[role] for role in cpu0)
        row.busy_pct = (busy1 - busy0) / capacity * 100.0
        row.other_pct = max(0.0, busy1 - busy0 - ours) / capacity * 100.0
    except (ChildFailed, OSError) as exc:  # OSError: a process of the row is gone from /proc
        row.status, row.error = "FAILED", str(exc)
    finally:
        if loadgen is not None:
            loadgen.stop()
        service.stop(20)
    if workers > 1 and row.status == "ok":  # stopped: every stage line is written
        ended = _ended(service.log_path)
        row.per_worker = [ended[pid] - ended_before[pid] for pid in pids]
    return row


def _ended(log: Path) -> Counter[int]:
    """Stage lines so far, by the pid of the worker that wrote them."""
    return Counter(int(r["pid"]) for r in _records(log) if r.get("event") == "stage_end" and "pid" in r)


def report_text(rows: Sequence[Row], args: argparse.Namespace) -> str:
    cpus = os.cpu_count()
    lines = [
        f"{args.rpc}, C={args.concurrency}, {args.requests} measured stages per row,"
        f" {args.channels} channels; {cpus} CPUs shared by the workers, the load generator"
        " and the fake backend",
        f"{'workers':>7}  {'stages/s':>8}  {'p50 ms':>7}  {'p99 ms':>7}  {'svc':>6}  {'load':>6}  {'be':>6}"
        f"  {'busy%':>5}  {'other%':>6}  stages per worker",
    ]
    for row in rows:
        if row.status != "ok":
            lines.append(f"{row.workers:>7}  FAILED: {row.error.splitlines()[0]}")
            continue
        lines.append(
            f"{row.workers:>7}  {row.stages_per_s:8.1f}"
            f"  {row.latency_ms['p50']:7.1f}  {row.latency_ms['p99']:7.1f}"
            f"  {row.cpu_ms['service']:6.2f}  {row.cpu_ms['loadgen']:6.2f}  {row.cpu_ms['backend']:6.2f}"
            f"  {row.busy_pct:5.0f}  {row.other_pct:6.0f}  {'/'.join(map(str, row.per_worker)) or '-'}"
        )
    lines += [
        "svc / load / be: CPU ms per stage of the service (supervisor + workers), load generator, backend",
        "busy%: the machine's CPUs over the window; other%: of it, processes not of this benchmark",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (1,2)")
    parser.add_argument("--rpc", choices=scenario.RPCS, default="StreamSynthesis")
    parser.add_argument("-c", "--concurrency", type=int, default=50)
    parser.add_argument("-n", "--requests", type=int, default=1000, help="measured stages per row")
    parser.add_argument("--channels", type=int, default=16, help="gRPC channels (TCP connections)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--logs", default="", help="directory for the children's logs (default: a temp dir)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        log_dir = Path(args.logs) if args.logs else Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        backend = Child("backend", "bench.backend", ["--chunks", str(scenario.DEFAULT_CHUNKS)], log_dir)
        try:
            url = f"http://127.0.0.1:{backend.expect('READY', 60)}/v1"
            rows = [run_row(args, i, n, url, log_dir, backend) for i, n in enumerate(counts)]
        finally:
            backend.stop()
    print(report_text(rows, args), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([asdict(row) for row in rows], indent=2), encoding="utf-8")
    return 0 if rows and all(row.status == "ok" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
