"""The gRPC load generator (its own process): C callers on a few grpc.aio channels, through
the generated stubs, every response checked (`bench.checks`).

    python -m bench.loadgen --target 127.0.0.1:PORT --rpc StreamSynthesis -c 50 -n 2000
    python -m bench.loadgen --target 127.0.0.1:PORT --record FILE   # one response per RPC

The first form speaks the `bench.driver` protocol; `--record` runs each stage RPC once,
checks it and writes the serialised responses (what the ceiling server replays).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from bench import checks, common, scenario
from bench.driver import Harness, Stage


def default_channels(concurrency: int) -> int:
    """A few channels (one TCP connection each): up to 4, then one per 128 callers."""
    return max(1, min(concurrency, 4), math.ceil(concurrency / 128))


def open_channels(target: str, count: int) -> list[grpc.aio.Channel]:
    # A local subchannel pool per channel: otherwise equal channels share one connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]


def stage_request() -> pb.StageRequest:
    return pb.StageRequest(user_prompt=scenario.USER_PROMPT)


def make_stage(
    stub: pb_grpc.ToolchainServiceAsyncStub, rpc: str, chunks: int, deadline: float | None
) -> Stage:
    exp = scenario.expected(rpc, chunks)
    stage = stage_request()
    if rpc == "RunTools":
        tools_request = pb.RunToolsRequest(stage=stage)

        async def run_tools() -> tuple[float, float]:
            response = await stub.RunTools(tools_request, timeout=deadline)
            now = time.perf_counter()
            checks.check_tools_response(response, exp)
            return now, now

        return run_tools
    if rpc == "RunSynthesis":
        synthesis_request = pb.RunSynthesisRequest(stage=stage)

        async def run_synthesis() -> tuple[float, float]:
            response = await stub.RunSynthesis(synthesis_request, timeout=deadline)
            now = time.perf_counter()
            checks.check_synthesis_response(response, exp)
            return now, now

        return run_synthesis
    if rpc == "StreamTools":
        stream_tools_request = pb.StreamToolsRequest(stage=stage)

        async def stream_tools() -> tuple[float, float]:
            events: list[pb.StageEvent] = []
            first = 0.0
            async for response in stub.StreamTools(stream_tools_request, timeout=deadline):
                if not events:
                    first = time.perf_counter()
                events.append(response.event)
            last = time.perf_counter()
            checks.check_events(events, exp)
            return first, last

        return stream_tools
    if rpc == "StreamSynthesis":
        stream_synthesis_request = pb.StreamSynthesisRequest(stage=stage)

        async def stream_synthesis() -> tuple[float, float]:
            events: list[pb.StageEvent] = []
            first = 0.0
            async for response in stub.StreamSynthesis(stream_synthesis_request, timeout=deadline):
                if not events:
                    first = time.perf_counter()
                events.append(response.event)
            last = time.perf_counter()
            checks.check_events(events, exp)
            return first, last

        return stream_synthesis
    raise ValueError(f"unknown rpc {rpc!r}")


async def _drive(args: argparse.Namespace) -> int:
    channels = open_channels(args.target, args.channels or default_channels(args.concurrency))
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 30.0)
    deadline = args.deadline if args.deadline > 0 else None
    stages = [
        make_stage(pb_grpc.ToolchainServiceStub(channel), args.rpc, args.chunks, deadline)
        for channel in channels
    ]
    cursor = iter(range(1 << 62))

    async def stage() -> tuple[float, float]:  # callers take the channels in turn
        return await stages[next(cursor) % len(stages)]()

    harness = Harness(stage, args.concurrency, args.requests, args.warmup)
    await harness.run()
    for channel in channels:
        await channel.close(None)
    return 0


async def _record(args: argparse.Namespace) -> dict[str, Any]:
    """One checked stage of each RPC, serialised, to a JSON file of base64 messages."""
    (channel,) = open_channels(args.target, 1)
    stub = pb_grpc.ToolchainServiceStub(channel)
    stage = stage_request()
    out: dict[str, Any] = {"chunks": args.chunks}
    tools = await stub.RunTools(pb.RunToolsRequest(stage=stage), timeout=30)
    checks.check_tools_response(tools, scenario.expected("RunTools", args.chunks))
    synthesis = await stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage), timeout=30)
    checks.check_synthesis_response(synthesis, scenario.expected("RunSynthesis", args.chunks))
    out["RunTools"] = [base64.b64encode(tools.SerializeToString()).decode()]
    out["RunSynthesis"] = [base64.b64encode(synthesis.SerializeToString()).decode()]
    stream_tools = [r async for r in stub.StreamTools(pb.StreamToolsRequest(stage=stage), timeout=30)]
    checks.check_events([r.event for r in stream_tools], scenario.expected("StreamTools", args.chunks))
    stream_synthesis = [
        r async for r in stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage), timeout=30)
    ]
    checks.check_events(
        [r.event for r in stream_synthesis], scenario.expected("StreamSynthesis", args.chunks)
    )
    out["StreamTools"] = [base64.b64encode(r.SerializeToString()).decode() for r in stream_tools]
    out["StreamSynthesis"] = [base64.b64encode(r.SerializeToString()).decode() for r in stream_synthesis]
    await channel.close(None)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the service or the ceiling")
    parser.add_argument("--rpc", choices=scenario.RPCS, default="StreamSynthesis")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--channels", type=int, default=0, help="0: default_channels(concurrency)")
    parser.add_argument("--chunks", type=int, default=scenario.DEFAULT_CHUNKS)
    parser.add_argument("--deadline", type=float, default=60.0, help="per-call deadline in s; 0: none")
    parser.add_argument("--record", default="", help="write one response of each RPC to this file")
    args = parser.parse_args(argv)
    if args.record:
        recorded = common.run(_record(args))
        Path(args.record).write_text(json.dumps(recorded), encoding="utf-8")
        return 0
    return common.run(_drive(args))


if __name__ == "__main__":
    raise SystemExit(main())
