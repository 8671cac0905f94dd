"""Which HTTP client is leanest? CPU per request and per stage of each candidate against
the fake backend (`bench.backend`), each client in a fresh process of its own.

    python -m bench.http_clients                       # all candidates, C=1 and C=50, 3 rounds
    python -m bench.http_clients --clients aiohttp,raw -n 3000 -c 1,50,200 --rounds 5

Measures, in the client's process (`time.process_time`: all its threads, µs per operation,
median of the rounds; the candidates alternate within each round):

* `json`: one unstreamed tool-phase request (the lean floor's body), the body read and
  `json.loads`-ed;
* `sse`: one streamed tool-phase request (7 events and [DONE]), split into SSE events by
  hand (`bench.lean_floor.split_events`) and each `json.loads`-ed;
* `sse/wire`: the same, with the service's `wire.sse_data` as the SSE parser;
* `stage`: one whole StreamSynthesis stage of the lean floor (`bench.lean_floor.Lean`):
  two streamed requests (8 + 24 events), the tool, the response check.

C workers run back to back after a warm-up; the `loop` row is the same workers around an
operation that only yields once (what every row carries besides the client). The clients
are `bench.lean_floor.CLIENTS`: aiohttp, httpx2 (the service's), httpcore2 (httpx2's
transport alone), `raw`, a hand-written asyncio-streams HTTP/1.1 client, and, when they
are importable (they are not project dependencies: e.g. `pip install --target DIR
pyreqwest==0.15.1 aiosonic==1.3.3` and `PYTHONPATH=DIR`), pyreqwest and aiosonic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import common, scenario

MEASURES = ("json", "sse", "sse/wire", "stage")
_DISTRIBUTIONS = {
    "httpx2": "httpx2",
    "httpcore2": "httpcore2",
    "aiohttp": "aiohttp",
    "pyreqwest": "pyreqwest",
}


async def _timed(op: Callable[[], Awaitable[None]], concurrency: int, count: int, warmup: int) -> float:
    """CPU µs per operation of `count` operations on `concurrency` workers, after `warmup`."""

    async def workers(total: int) -> None:
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await op()

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    await workers(warmup)
    cpu = time.process_time()
    await workers(count)
    return (time.process_time() - cpu) * 1e6 / max(1, count)


async def _worker(args: argparse.Namespace) -> int:
    from toolchain_service.backends import wire

    from bench import lean_floor

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    out: dict[str, dict[str, float]] = {}
    if args.worker == "loop":

        async def nothing() -> None:
            await asyncio.sleep(0)

        for c in concurrencies:
            out[f"loop C={c}"] = {"us": await _timed(nothing, c, args.requests * 10, args.warmup)}
        common.announce("RESULT " + json.dumps(out))
        return 0
    client = lean_floor.make_client(args.worker, args.url, None)
    lean = lean_floor.Lean(client, args.url, None)
    messages = lean._messages()
    json_body = lean._tool_body(messages, False)
    sse_body = lean._tool_body(messages, True)
    events = scenario.expected("StreamTools", args.chunks).tool_chunks + 1  # + the usage chunk
    stage = lean.stage("StreamSynthesis", args.chunks)

    async def one_json() -> None:
        obj = json.loads(await client.post(json_body))
        if obj["choices"][0]["finish_reason"] != "tool_calls":
            raise RuntimeError(f"unexpected answer {obj!r:.200}")

    async def one_sse() -> None:
        buffer, seen, done = b"", 0, False
        async for chunk in client.stream(sse_body):
            payloads, buffer = lean_floor.split_events(buffer + chunk if buffer else chunk)
            for payload in payloads:
                if payload == b"[DONE]":
                    done = True
                else:
                    json.loads(payload)
                    seen += 1
        if seen != events or not done:
            raise RuntimeError(f"{seen} events (done: {done}), expected {events}")

    async def one_sse_wire() -> None:
        seen, done = 0, False
        async for payload in wire.sse_data(client.stream(sse_body), 8 << 20):
            if payload is wire.DONE:
                done = True
            else:
                wire.loads(payload)
                seen += 1
        if seen != events or not done:
            raise RuntimeError(f"{seen} events (done: {done}), expected {events}")

    async def one_stage() -> None:
        await stage()

    ops: dict[str, tuple[Callable[[], Awaitable[None]], int]] = {
        "json": (one_json, args.requests),
        "sse": (one_sse, args.requests),
        "sse/wire": (one_sse_wire, args.requests),
        "stage": (one_stage, max(1, args.requests // 4)),
    }
    for measure in args.measures.split(","):
        op, count = ops[measure]
        for c in concurrencies:
            out[f"{measure} C={c}"] = {"us": await _timed(op, c, count, args.warmup)}
    await client.aclose()
    common.announce("RESULT " + json.dumps(out))
    return 0


def _version(client: str) -> str:
    if client == "raw":
        return f"asyncio (Python {sys.version.split()[0]})"
    try:
        return metadata.version(client)
    except metadata.PackageNotFoundError:
        return "?"


def render(results: dict[str, dict[str, list[float]]], concurrencies: Sequence[int]) -> str:
    columns = [f"{m} C={c}" for m in MEASURES for c in concurrencies]
    headers = ["client", "version", *columns]
    rows: list[list[str]] = []
    for client, measures in results.items():
        cells = [client, _version(client) if client != "loop" else "-"]
        for column in columns:
            key = column if client != "loop" else f"loop C={column.rsplit('=', 1)[1]}"
            values = measures.get(key)
            cells.append(f"{statistics.median(values):.0f}" if values else "")
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def main(argv: Sequence[str] | None = None) -> int:
    from bench import lean_floor

    parser = argparse.ArgumentParser(prog="python -m bench.http_clients", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients",
        default=",".join(c for c in lean_floor.CLIENTS if lean_floor.available(c)),
        help="comma-separated (default: every candidate that is importable)",
    )
    parser.add_argument("-n", "--requests", type=int, default=2000, help="requests per measure (stages: n/4)")
    parser.add_argument("-c", "--concurrency", default="1,50", help="comma-separated")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=scenario.DEFAULT_CHUNKS)
    parser.add_argument("--measures", default=",".join(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--json", default="", help="also write the raw results to this file")
    args = parser.parse_args(argv)
    if args.worker:
        return common.run(_worker(args))

    from bench.procs import Child

    clients = [c for c in args.clients.split(",") if c]
    unknown = [c for c in clients if c not in lean_floor.CLIENTS]
    if unknown:
        parser.error(f"unknown clients {unknown}; known: {sorted(lean_floor.CLIENTS)}")
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    results: dict[str, dict[str, list[float]]] = {name: {} for name in [*clients, "loop"]}
    common_args = ["-n", str(args.requests), "-c", ",".join(map(str, concurrencies))]
    common_args += ["--warmup", str(args.warmup), "--chunks", str(args.chunks)]
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        logs = Path(tmp)
        backend = Child("backend", "bench.backend", ["--chunks", str(args.chunks)], logs)
        try:
            url = f"http://127.0.0.1:{backend.expect('READY', 60)}/v1"
            for round_ in range(args.rounds):
                for name in [*clients, "loop"]:
                    print(f"round {round_ + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                    worker = Child(
                        f"{round_}-{name}",
                        "bench.http_clients",
                        ["--worker", name, "--url", url, *common_args],
                        logs,
                    )
                    try:
                        got: dict[str, dict[str, float]] = json.loads(worker.expect("RESULT", 600))
                    finally:
                        worker.stop()
                    for key, value in got.items():
                        results[name].setdefault(key, []).append(value["us"])
        finally:
            backend.stop()
    print(
        f"CPU µs per operation in the client's process (median of {args.rounds} rounds;"
        f" json/sse: n={args.requests} requests, stage: n={max(1, args.requests // 4)}"
        " StreamSynthesis stages)"
    )
    print(render(results, concurrencies))
    if args.json:
        raw: dict[str, Any] = {"results": results, "args": vars(args)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(raw, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
