"""Profile the service process (or a floor) under load and print where its CPU goes.

    python -m bench.profile                          # service, StreamSynthesis, C=50, 20 s
    python -m bench.profile --rpc RunTools --seconds 30 --native
    python -m bench.profile --process lean           # the lean floor, for comparison
    python -m bench.profile --process sdk            # the typed-SDK loop

Starts the fake backend, the service (`bench.service_proc`) and the load generator as
`bench.run` does, lets the load warm up, then samples the service's process with py-spy
(out of process and non-blocking, so the profile costs the service next to nothing;
`--native` adds the C frames of grpc and uvloop but pauses the process per sample) while the load
runs. Prints the hottest functions by own time and by inclusive time, and the time by
area (gRPC, HTTP client, JSON, protobuf, logging, ...), each as a share of the samples
in which the process was running Python. The raw collapsed stacks are kept in
bench/results/ (flamegraph.pl or speedscope read them).

py-spy is a local tool, not a project dependency: `.venv/bin/pip install py-spy==0.4.3`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench import scenario
from bench.procs import ROOT, Child

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

#: Areas by the path of the frame's file, first match wins (checked leaf to root).
AREAS: tuple[tuple[str, str], ...] = (
    ("toolchain_service/observe", "service: metrics + stage log"),
    ("prometheus_client", "service: metrics + stage log"),
    ("logging/", "service: metrics + stage log"),
    ("toolchain_service/transport/convert", "service: events -> protobuf"),
    ("toolchain_service/backends", "service: backend client (wire, openai_http)"),
    ("toolchain_service/tools", "service: tools (validate + run)"),
    ("toolchain_service/", "service: runner, servicer, other"),
    ("grpc/", "grpc.aio (Cython + Python)"),
    ("grpc_health", "grpc.aio (Cython + Python)"),
    ("openai/", "openai client"),
    ("httpx", "httpx / httpcore / h11 / anyio"),
    ("httpcore", "httpx / httpcore / h11 / anyio"),
    ("h11/", "httpx / httpcore / h11 / anyio"),
    ("anyio/", "httpx / httpcore / h11 / anyio"),
    ("aiohttp/", "aiohttp / yarl / multidict"),
    ("yarl/", "aiohttp / yarl / multidict"),
    ("multidict/", "aiohttp / yarl / multidict"),
    ("bench/lean_floor", "bench: lean floor loop"),
    ("pydantic", "pydantic"),
    ("google/protobuf", "protobuf (Python side)"),
    ("json/", "json"),
    ("asyncio/", "asyncio / uvloop"),
    ("uvloop", "asyncio / uvloop"),
)


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


def parse_frame(frame: str) -> tuple[str, str]:
    """(function, file) of one py-spy frame `func (file:line)`."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    return match.group("func"), match.group("file")


def short(path: str) -> str:
    for marker in ("site-packages/", "service/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3.":
                path = path.split("/", 1)[-1]
            break
    return path


def short_line(frame: str) -> str:
    """`func (file:line)` with the file shortened (the own-time listing keeps lines)."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    line = match.group("line")
    return f"{match.group('func')} ({short(match.group('file'))}{':' + line if line else ''})"


def area_of(path: str) -> str:
    for needle, area in AREAS:
        if needle in path:
            return area
    return "other"


#: Leaf functions of a thread that waits (py-spy cannot tell idle threads with --native).
IDLE_LEAVES = frozenset(
    {
        "epoll_wait",
        "epoll_pwait",
        "poll",
        "select",
        "PyThread_acquire_lock_timed",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "sem_wait",
        "sem_timedwait",
        "nanosleep",
        "clock_nanosleep",
    }
)


def sample_area(frames: list[tuple[str, str]]) -> str:
    """The area a sample's CPU time belongs to: its innermost frame that names one, with
    the frames py-spy shows when the time is in C below a Python frame made explicit."""
    func, path = frames[-1]
    if func == "Thread.run" and path.endswith("threading.py"):
        return "threads in C code (the grpc.aio poller thread)"
    if func == "Runner.run" and "asyncio/runners" in path:
        return "event loop in C (uvloop I/O, grpc Cython callbacks)"
    if "libc.so" in path or path.startswith("libpthread"):
        for _, caller_path in reversed(frames[:-1]):
            if caller_path.endswith(".py"):  # the Python code that made the call
                return f"libc (syscalls, malloc) under {area_of(caller_path)}"
        return "libc (syscalls, malloc)"
    if "cygrpc" in path:
        return "grpc.aio (Cython + Python)"
    if path in {"loop.c", "core.c", "loop-watcher.c", "stream.c", "tcp.c", "uv-common.c"}:
        return "asyncio / uvloop"
    fallback = "other"
    for _, frame_path in reversed(frames):
        candidate = area_of(frame_path)
        if candidate != "other" and not candidate.startswith("asyncio"):
            return candidate
        if fallback == "other":
            fallback = candidate
    return fallback


def analyse(raw: str, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        kept = [
            f.strip() for f in stack.split(";") if not f.strip().startswith(("process ", "thread ", "0x"))
        ]
        frames = [parse_frame(f) for f in kept]
        line_frames = [short_line(f) for f in kept]
        if not frames:
            continue
        if frames[-1][0] in IDLE_LEAVES:
            idle += count
            continue
        total += count
        names = [f"{func} ({short(path)})" for func, path in frames]
        leaf = line_frames[-1] if line_frames else names[-1]
        own[leaf] += count
        for name in set(names):
            inclusive[name] += count
        areas[sample_area(frames)] += count
    if total == 0:
        return "no samples (was the process idle, or could py-spy not read it?)"

    def block(title: str, counter: Counter[str], limit: int) -> list[str]:
        lines = [title]
        for name, count in counter.most_common(limit):
            lines.append(f"  {100.0 * count / total:5.1f}%  {name}")
        return lines

    out = [
        f"{total} busy samples ({idle} idle ones dropped); shares are of the busy samples. Without"
        " --native, a Python frame's own time includes the C code it calls (e.g. grpc's Cython"
        " context.write and its sendmsg)."
    ]
    out += block("\nby area (innermost frame that names one):", areas, 20)
    out += block(f"\ntop {top} by own time (leaf frame and line):", own, top)
    out += block(f"\ntop {top} by inclusive time:", inclusive, top)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--process", choices=("service", "lean", "sdk"), default="service")
    parser.add_argument("--rpc", choices=scenario.RPCS, default="StreamSynthesis")
    parser.add_argument("-c", "--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--native", action="store_true", help="include C frames (grpc core, uvloop)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the raw stacks")
    args = parser.parse_args(argv)

    spy = py_spy()
    if spy is None:
        print("py-spy not found: .venv/bin/pip install py-spy==0.4.3", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw_path = out_dir / f"profile-{args.process}-{args.rpc}-c{args.concurrency}.txt"
    load = [
        "--rpc",
        args.rpc,
        "-c",
        str(args.concurrency),
        "-n",
        str(10**9),
        "--warmup",
        str(2 * args.concurrency),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        logs = Path(tmp)
        children: list[Child] = []
        try:
            backend = Child("backend", "bench.backend", ["--chunk-delay", str(args.chunk_delay)], logs)
            children.append(backend)
            url = f"http://127.0.0.1:{backend.expect('READY', 60)}/v1"
            if args.process == "service":
                service = Child("service", "bench.service_proc", ["--backend-url", url], logs)
                children.append(service)
                target = f"127.0.0.1:{service.expect('READY', 120)}"
                driver = Child("loadgen", "bench.loadgen", ["--target", target, *load], logs)
                profiled = service
            else:
                module = "bench.lean_floor" if args.process == "lean" else "bench.floor"
                driver = Child(args.process, module, ["--backend-url", url, "--calibrate", "0", *load], logs)
                profiled = driver
            children.append(driver)
            driver.expect("ARMED", 120)
            driver.send("GO")
            time.sleep(1.0)
            before = profiled.cpu_seconds()
            command = [
                spy,
                "record",
                "--pid",
                str(profiled.pid),
                "--duration",
                str(max(1, round(args.seconds))),
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "--output",
                str(raw_path),
            ]
            # Native frames need the process paused per sample; Python frames alone do not.
            command.append("--native" if args.native else "--nonblocking")
            print(f"profiling {args.process} ({args.rpc}, C={args.concurrency}) for {args.seconds:.0f} s ...")
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            busy = (profiled.cpu_seconds() - before) / max(1.0, args.seconds)
            if result.returncode != 0 or not raw_path.exists():
                print(f"py-spy failed ({result.returncode}):\n{result.stderr[-2000:]}", file=sys.stderr)
                return 1
        finally:
            for child in reversed(children):
                child.stop()
    print(f"{args.process} used {busy:.2f} CPU cores on average while sampled; raw stacks: {raw_path}")
    print(analyse(raw_path.read_text(encoding="utf-8"), args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
