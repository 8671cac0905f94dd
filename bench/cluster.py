"""Cross-replica CancelStage latency: two real `toolchain serve` replicas sharing a real
redis-server, one fake backend; each stage streams on replica A and is cancelled by a
CancelStage sent to replica B.

    .venv/bin/python -m bench.cluster                 # 300 cancels, 20 other streams running
    .venv/bin/python -m bench.cluster -n 1000 --background 50

Reported, per cancel: the CancelStage call (B asks A over Redis pub/sub and waits for its
answer) and, what a caller waits for, the time from sending CancelStage to the Cancel event
at the stream's reader on A. The issue's target: p99 of the latter within 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import grpc
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from tests.fakes.openai_backend import FakeBackend, stage_handler
from tests.fakes.redis_server import start_redis
from tests.fakes.server_process import ServerProcess, serve_env, start_serve

TARGET_P99_MS = 100.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _stream_until_end(stub: pb_grpc.ToolchainServiceAsyncStub, stop: asyncio.Event) -> None:
    """Background load: stages streaming on A until told to stop."""
    while not stop.is_set():
        call = stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=pb.StageRequest(user_prompt="2+3?")))
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError:
            pass


async def _one(
    a: pb_grpc.ToolchainServiceAsyncStub, b: pb_grpc.ToolchainServiceAsyncStub
) -> tuple[float, float]:
    stage_id = f"bench-{uuid.uuid4()}"
    call = a.StreamSynthesis(
        pb.StreamSynthesisRequest(stage=pb.StageRequest(stage_id=stage_id, user_prompt="2+3?")), timeout=60
    )
    first = await call.read()
    assert first is not grpc.aio.EOF  # type: ignore[attr-defined]
    sent = time.perf_counter()
    await b.CancelStage(pb.CancelStageRequest(stage_id=stage_id), timeout=10)
    answered = time.perf_counter()
    last = None
    try:
        while (response := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            last = response.event  # type: ignore[attr-defined]  # grpc-stubs: read() is untyped
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED:
            raise
    arrived = time.perf_counter()
    if last is None or last.WhichOneof("event") != "cancel":
        raise AssertionError(f"stage {stage_id} did not end with a Cancel event: {last}")
    return answered - sent, arrived - sent


async def main(count: int, background: int) -> int:
    redis = await start_redis()
    fake = FakeBackend(handler=stage_handler(chunks=200, chunk_delay=0.02), record=False)
    replicas: list[ServerProcess] = []
    channels: list[grpc.aio.Channel] = []
    stop = asyncio.Event()
    loads: list[asyncio.Task[None]] = []
    try:
        async with fake:
            for name in ("bench-a", "bench-b"):
                env = serve_env(
                    fake, cluster__redis_url=redis.url, cluster__replica_id=name, log_level="WARNING"
                )
                replicas.append(await start_serve(env))
            channels = [grpc.aio.insecure_channel(r.address) for r in replicas]
            a: pb_grpc.ToolchainServiceAsyncStub = pb_grpc.ToolchainServiceStub(channels[0])
            b: pb_grpc.ToolchainServiceAsyncStub = pb_grpc.ToolchainServiceStub(channels[1])
            loads = [asyncio.create_task(_stream_until_end(a, stop)) for _ in range(background)]
            calls, ends = [], []
            for _ in range(count):
                call_s, end_s = await _one(a, b)
                calls.append(call_s * 1000)
                ends.append(end_s * 1000)
            stop.set()
            for task in loads:
                task.cancel()
            await asyncio.gather(*loads, return_exceptions=True)
    finally:
        for channel in channels:
            await channel.close(None)
        for replica in replicas:
            replica.process.terminate()
            await replica.wait(30)
        await redis.stop()
    print(f"cross-replica CancelStage, {count} cancels, {background} other streams on replica A")
    print("| measure | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    for name, values in (("CancelStage call on B", calls), ("CancelStage sent -> Cancel event on A", ends)):
        row = (statistics.median(values), _percentile(values, 0.99), max(values))
        print(f"| {name} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} |")
    p99 = _percentile(ends, 0.99)
    verdict = "PASS" if p99 <= TARGET_P99_MS else "MISS"
    print(f"target: Cancel event within {TARGET_P99_MS:.0f} ms p99: {verdict} ({p99:.1f} ms)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", "--count", type=int, default=300, help="cancels to measure")
    parser.add_argument("--background", type=int, default=20, help="other streams running on replica A")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.count, args.background)))
