"""Aggregate tokens per second on the embedded model at 1, 2 and 4 concurrent stages.

    python -m bench.local_model [--concurrency 1,2,4] [--rounds 3] [--max-tokens 128]

The service runs as production runs it (`start_server` with the default settings: the
embedded SmolLM2-135M-Instruct on a supervised llama-server with `parallel` = 4 sequence
slots), called through generated stubs. Each round starts C StreamSynthesis stages at once
on the same prompt (a calculator call, then a synthesis of up to --max-tokens tokens, both
at temperature 0, each phase up to --max-tokens tokens) and waits for all of them. Per round:

* aggregate tokens/s: completion tokens of every phase of every stage (from Done's usage,
  as the model process counted them) / the round's wall time;
* per-stage time to first chunk (TTFC) and time to Done.

The table shows the median round for each C and the ratio of its aggregate rate to C=1's:
the target is at least 1.5x at C=4 (continuous batching: the slots share one forward pass
per token). Every stage must end with Done; any other end fails the run (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass

import grpc

PROMPT = "Use the calculator to compute 12*7, then write a long story about the number."
TARGET = 1.5


@dataclass(frozen=True)
class Stage:
    tokens: int
    ttfc: float
    total: float


@dataclass(frozen=True)
class Round:
    concurrency: int
    wall: float
    stages: tuple[Stage, ...]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    @property
    def rate(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


async def _stage(stub: object, max_tokens: int) -> Stage:
    from toolchain_proto.v1 import toolchain_pb2 as pb

    request = pb.StreamSynthesisRequest(
        stage=pb.StageRequest(
            user_prompt=PROMPT,
            tools=["calculator"],
            tool_phase=pb.PhaseOptions(max_tokens=max_tokens, temperature=0.0),
            synthesis_phase=pb.PhaseOptions(max_tokens=max_tokens, temperature=0.0),
        )
    )
    started = time.monotonic()
    first = 0.0
    async for response in stub.StreamSynthesis(request):  # type: ignore[attr-defined]
        event = response.event
        if event.HasField("chunk") and not first:
            first = time.monotonic() - started
        if event.HasField("error") or event.HasField("cancel"):
            raise RuntimeError(f"a stage did not finish: {event}")
        if event.HasField("done"):
            done = event.done
            tokens = done.tool_phase.usage.completion_tokens + done.synthesis_phase.usage.completion_tokens
            return Stage(tokens, first, time.monotonic() - started)
    raise RuntimeError("a stream ended without a terminal event")


async def _round(stub: object, concurrency: int, max_tokens: int) -> Round:
    started = time.monotonic()
    stages = await asyncio.gather(*(_stage(stub, max_tokens) for _ in range(concurrency)))
    return Round(concurrency, time.monotonic() - started, tuple(stages))


async def run(levels: list[int], rounds: int, max_tokens: int) -> int:
    from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc
    from toolchain_service.backends.local_model import LocalModelBackend
    from toolchain_service.config import Settings, ToolSettings
    from toolchain_service.transport.server import start_server

    settings = Settings(address="127.0.0.1:0", tools=ToolSettings(weather_url="http://127.0.0.1:9/none"))
    server = await start_server(settings)
    backend = server.backends.resolve("")
    assert isinstance(backend, LocalModelBackend)
    channel = grpc.aio.insecure_channel(server.address)
    stub = pb_grpc.ToolchainServiceStub(channel)
    results: dict[int, list[Round]] = {}
    try:
        # Warm-up at the highest level, so that every slot has built its graphs and cached
        # the shared prompt prefix, as the one slot that C=1 uses has after its first round.
        await _round(stub, max(levels), 16)
        for _ in range(rounds):  # interleaved, so slow drifts of the machine touch every level
            for level in levels:
                results.setdefault(level, []).append(await _round(stub, level, max_tokens))
    finally:
        await channel.close(None)
        await server.stop(0)

    print(
        f"embedded model: {backend.model_path.name if backend.model_path else '?'}, "
        f"parallel={backend.parallel}, threads={backend.threads}, max_tokens={max_tokens}, rounds={rounds}"
    )
    header = ("C", "tokens", "wall s", "agg tok/s", "x C=1", "TTFC p50 s", "stage p50 s")
    print("{:>3} {:>7} {:>7} {:>10} {:>6} {:>11} {:>12}".format(*header))
    base = 0.0
    medians: dict[int, float] = {}
    for level in levels:
        ordered = sorted(results[level], key=lambda r: r.rate)
        mid = ordered[len(ordered) // 2]
        medians[level] = mid.rate
        base = base or mid.rate
        ttfc = statistics.median(s.ttfc for r in results[level] for s in r.stages)
        total = statistics.median(s.total for r in results[level] for s in r.stages)
        print(
            f"{level:>3} {mid.tokens:>7} {mid.wall:>7.2f} {mid.rate:>10.1f} {mid.rate / base:>6.2f} "
            f"{ttfc:>11.2f} {total:>12.2f}"
        )
    top = max(levels)
    if 1 in medians and top > 1:
        ratio = medians[top] / medians[1]
        verdict = "PASS" if ratio >= TARGET else "MISS"
        print(f"{verdict}  aggregate tokens/s at C={top} is {ratio:.2f}x C=1 (target >= {TARGET}x)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,2,4", help="comma-separated stage counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of each phase")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    try:
        return asyncio.run(run(levels, args.rounds, args.max_tokens))
    except RuntimeError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
