"""Synthesis tokens per second on the embedded model: through the service vs llama.cpp alone.

    python -m bench.local_model [--reps 5] [--max-tokens 256] [--threads N]

The service runs in its own process, as production runs it (uvloop, `start_server`, the
default local backend: SmolLM2-135M-Instruct in llama.cpp, with `--threads` CPU threads),
and is called with StreamSynthesis. Its process records the ChatRequests that the runner
hands the backend (a pass-through wrapper: nothing is added on the streaming path), so the
baseline replays the very messages the runner built, not a reconstruction of them.

The baseline is llama-cpp-python alone in this process: `Llama(...)` on the same GGUF file
with the same n_ctx, n_threads and chat_format, the recorded messages adapted as the local
backend adapts them (`adapt_messages`), `create_chat_completion(stream=True)` with the same
max_tokens and temperature 0. Before each timed synthesis it runs the same tool-phase
request (untimed), so the prompt cache holds what it holds in the service.

Two rates per side, in completion tokens per second:

* decode: from the first synthesis chunk to the end (the service: to Done), counting the
  tokens after the first one: what streaming costs per token;
* phase: from the start of the synthesis phase (the service: the ToolSummary's arrival; the
  baseline: the call) to the end, counting every token: prompt evaluation included.

Runs alternate between the two sides after one untimed warm-up each; the table shows every
run with its ratio service / llama.cpp, then the median and the best of each column. The
target (the service's decode rate at least 95% of llama.cpp's) is judged on the median of
the runs' own ratios: the two runs of a pair run back to back, so slow drifts of the machine
cancel out. With llama.cpp's threads on every core, any other busy process slows a run a lot
(the table says NOISY then; measure on a quiet machine). At
temperature 0 both sides must write the same text from the same prompt; the table says
whether they did.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: A calculator call, then a synthesis that runs to max_tokens at temperature 0.
PROMPT = (
    "Use the calculator to compute 12*7, then write a very long essay about the history of multiplication."
)
TOOLS = ("calculator",)
TOOL_MAX_TOKENS = 64
TARGET = 0.95
_ROOT = Path(__file__).resolve().parents[1]


# -- the service's process -----------------------------------------------------------------


async def _serve(threads: int, capture: Path) -> int:
    from toolchain_service.backends.base import ChatRequest, Completion, ModelDelta
    from toolchain_service.config import BackendSettings, Settings
    from toolchain_service.transport.server import start_server

    settings = Settings(
        address="127.0.0.1:0", backends={"local": BackendSettings(kind="local", n_threads=threads)}
    )
    running = await start_server(settings)
    backend = running.backends.resolve("")

    def record(phase: str, request: ChatRequest) -> None:
        line = {
            "phase": phase,
            "messages": request.messages,
            "tools": request.tools,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        with capture.open("a", encoding="utf-8") as sink:
            sink.write(json.dumps(line) + "\n")

    # Pass-through wrappers: they record the request, then hand back the backend's own
    # coroutine or generator, so the measured streaming path is the backend's unchanged.
    stream = backend.stream
    complete = backend.complete

    def recording_stream(request: ChatRequest) -> AsyncGenerator[ModelDelta, None]:
        record("tool" if request.tools else "synthesis", request)
        return stream(request)

    def recording_complete(request: ChatRequest) -> Coroutine[Any, Any, Completion]:
        record("tool" if request.tools else "synthesis", request)
        return complete(request)

    backend.stream = recording_stream  # type: ignore[method-assign]
    backend.complete = recording_complete  # type: ignore[method-assign]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # stdin is a pipe from the benchmark: EOF means it is gone, whatever killed it.
    def parent_gone() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    loop.add_reader(sys.stdin.fileno(), parent_gone)
    print(f"READY {running.port}", flush=True)
    await stop.wait()
    await running.stop(0)
    return 0


@dataclass
class _Service:
    process: subprocess.Popen[str]
    target: str
    capture: Path

    def last_requests(self) -> dict[str, dict[str, Any]]:
        """The last recorded tool-phase and synthesis requests."""
        found: dict[str, dict[str, Any]] = {}
        for line in self.capture.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            found[entry["phase"]] = entry
        return found


def _start_service(threads: int, capture: Path) -> _Service:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.local_model",
            "--serve",
            "--threads",
            str(threads),
            "--capture",
            str(capture),
        ],
        cwd=_ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,  # closed when this process ends: the service then stops
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("READY "):
        process.kill()
        raise SystemExit(f"the service did not start (it said {line!r}); see its stderr above")
    return _Service(process, f"127.0.0.1:{line.split()[1]}", capture)


def _stop_service(service: _Service) -> None:
    if service.process.stdin is not None:
        service.process.stdin.close()
    service.process.send_signal(signal.SIGTERM)
    try:
        service.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        service.process.kill()
        service.process.wait()


# -- measurements ----------------------------------------------------------------------------


@dataclass
class Run:
    """One synthesis phase, timed."""

    tokens: int  # completion tokens (end-of-turn token not counted)
    prompt_tokens: int
    first_to_end: float  # seconds from the first content chunk to the end
    phase: float  # seconds from the start of the phase to the end
    text: str

    @property
    def decode_rate(self) -> float:
        return (self.tokens - 1) / self.first_to_end if self.first_to_end > 0 else float("nan")

    @property
    def phase_rate(self) -> float:
        return self.tokens / self.phase if self.phase > 0 else float("nan")


def _stage(max_tokens: int) -> Any:
    from toolchain_proto.v1 import toolchain_pb2 as pb

    return pb.StreamSynthesisRequest(
        stage=pb.StageRequest(
            user_prompt=PROMPT,
            tools=TOOLS,
            tool_phase=pb.PhaseOptions(max_tokens=TOOL_MAX_TOKENS, temperature=0.0),
            synthesis_phase=pb.PhaseOptions(max_tokens=max_tokens, temperature=0.0),
        )
    )


async def _service_run(target: str, max_tokens: int) -> Run:
    import grpc
    from toolchain_proto.v1 import toolchain_pb2 as pb
    from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ToolchainServiceStub(channel)
        await channel.channel_ready()
        summary_at = first_at = done_at = 0.0
        done: pb.Done | None = None
        async for response in stub.StreamSynthesis(_stage(max_tokens)):
            now = time.perf_counter()
            event = response.event
            kind = event.WhichOneof("event")
            if kind == "tool_summary":
                summary_at = now
                outcomes = [r.outcome for r in event.tool_summary.results]
                if pb.TOOL_OUTCOME_OK not in outcomes:
                    raise SystemExit(f"the model's tool call did not run: {event.tool_summary}")
            elif kind == "chunk" and event.chunk.phase == pb.PHASE_SYNTHESIS and event.chunk.content:
                first_at = first_at or now
            elif kind == "done":
                done_at, done = now, event.done
            elif kind in ("error", "cancel"):
                raise SystemExit(f"the stage failed: {event}")
    if done is None or not done.HasField("synthesis_phase") or not first_at:
        raise SystemExit("the stage ended without a streamed synthesis phase")
    usage = done.synthesis_phase.usage
    return Run(
        usage.completion_tokens, usage.prompt_tokens, done_at - first_at, done_at - summary_at, done.text
    )


class _Counter:
    """A logits processor that counts sampled tokens (llama.cpp calls it once per token)
    and notes the prompt length; it changes no score."""

    def __init__(self) -> None:
        self.calls = 0
        self.prompt_tokens = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if not self.calls:
            self.prompt_tokens = len(input_ids)
        self.calls += 1
        return scores


class _Baseline:
    """llama-cpp-python alone, loaded as the local backend loads it."""

    def __init__(self, threads: int) -> None:
        from llama_cpp import Llama
        from toolchain_service.backends.local_llama import DEFAULT_CHAT_FORMAT, bundled_model_path
        from toolchain_service.config import BackendSettings

        defaults = BackendSettings(kind="local")
        self.n_ctx = defaults.n_ctx
        self.chat_format = defaults.chat_format or DEFAULT_CHAT_FORMAT
        self.model_path = bundled_model_path()
        # Any: it is given adapted message dicts, not its own TypedDicts.
        self.llama: Any = Llama(
            model_path=str(self.model_path),
            n_ctx=self.n_ctx,
            n_threads=threads,
            chat_format=self.chat_format,
            verbose=False,
        )

    def tool_phase(self, request: dict[str, Any]) -> None:
        """The tool-phase request, untimed: it leaves the prompt cache as the service's does."""
        from toolchain_service.backends.local_llama import adapt_messages

        self.llama.create_chat_completion(
            messages=adapt_messages(request["messages"], True),
            tools=request["tools"],
            tool_choice="auto",
            max_tokens=request["max_tokens"],
            temperature=request["temperature"],
            stream=False,
        )

    def synthesis(self, request: dict[str, Any]) -> Run:
        from llama_cpp import LogitsProcessorList
        from toolchain_service.backends.local_llama import adapt_messages

        messages = adapt_messages(request["messages"], False)
        counter = _Counter()
        pieces: list[str] = []
        finish = ""
        first_at = 0.0
        started = time.perf_counter()
        chunks: Iterator[dict[str, Any]] = self.llama.create_chat_completion(
            messages=messages,
            max_tokens=request["max_tokens"],
            temperature=request["temperature"],
            stream=True,
            logits_processor=LogitsProcessorList([counter]),
        )
        for chunk in chunks:
            choice = chunk["choices"][0]
            content = choice["delta"].get("content")
            if content:
                first_at = first_at or time.perf_counter()
                pieces.append(content)
            finish = choice.get("finish_reason") or finish
        ended = time.perf_counter()
        tokens = counter.calls - 1 if finish == "stop" else counter.calls  # as the backend counts
        return Run(tokens, counter.prompt_tokens, ended - first_at, ended - started, "".join(pieces))


# -- the report ------------------------------------------------------------------------------


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(
        cell.rjust(width) if i else cell.ljust(width)
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
    ).rstrip()


def _table(service: list[Run], baseline: list[Run], threads: int, max_tokens: int) -> tuple[str, float]:
    pairs = list(zip(service, baseline, strict=True))
    headers = ["run", "service decode", "llama decode", "ratio", "service phase", "llama phase", "ratio"]
    headers.append("tokens s/l")

    def cells(label: str, rates: Sequence[float], ratios: Sequence[float], tokens: str) -> list[str]:
        sd, ld, sp, lp = rates
        decode = [f"{sd:.1f}", f"{ld:.1f}", f"{ratios[0]:.1%}"]
        phase = [f"{sp:.1f}", f"{lp:.1f}", f"{ratios[1]:.1%}"]
        return [label, *decode, *phase, tokens]

    decode_ratios = [s.decode_rate / b.decode_rate for s, b in pairs]
    phase_ratios = [s.phase_rate / b.phase_rate for s, b in pairs]
    rows = [
        cells(
            str(i + 1),
            (s.decode_rate, b.decode_rate, s.phase_rate, b.phase_rate),
            (decode_ratios[i], phase_ratios[i]),
            f"{s.tokens}/{b.tokens}",
        )
        for i, (s, b) in enumerate(pairs)
    ]
    columns = [[r.decode_rate for r in service], [r.decode_rate for r in baseline]]
    columns += [[r.phase_rate for r in service], [r.phase_rate for r in baseline]]
    # median: of each column, and of the runs' own ratios (each pair ran back to back);
    # best: of each column, and the ratio of the two bests.
    median_ratio = statistics.median(decode_ratios)
    rows.append(
        cells(
            "median",
            [statistics.median(c) for c in columns],
            (median_ratio, statistics.median(phase_ratios)),
            "",
        )
    )
    best = [max(c) for c in columns]
    rows.append(cells("best", best, (best[0] / best[1], best[2] / best[3]), ""))
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    same_text = all(s.text == b.text for s, b in pairs)
    same_prompt = all(s.prompt_tokens == b.prompt_tokens for s, b in pairs)
    spread = max(
        max(r.decode_rate for r in runs) / min(r.decode_rate for r in runs) for runs in (service, baseline)
    )
    lines = [
        f"synthesis tokens/s, SmolLM2-135M-Instruct, {threads} threads, "
        f"max_tokens {max_tokens}, temperature 0",
        "decode: first chunk to end; phase: start of the synthesis phase to end (prompt evaluation included)",
        "",
        _row(headers, widths),
        _row(["-" * w for w in widths], widths),
        *(_row(r, widths) for r in rows),
        "",
        f"same prompt tokens ({service[0].prompt_tokens}): {'yes' if same_prompt else 'NO'}; "
        f"same text: {'yes' if same_text else 'NO'}",
    ]
    if spread > 1.25:
        lines.append(
            f"NOISY: decode rates vary {spread:.1f}x between runs of one side (load average "
            f"{os.getloadavg()[0]:.1f}); other processes are taking the CPU, rerun on a quiet machine"
        )
    lines.append(
        f"target: service decode rate >= {TARGET:.0%} of llama.cpp alone (median of the runs' ratios): "
        + ("met" if median_ratio >= TARGET else "NOT met")
        + f" ({median_ratio:.1%})"
    )
    return "\n".join(lines), median_ratio


def _benchmark(args: argparse.Namespace) -> int:
    threads: int = args.threads
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups below
    with tempfile.TemporaryDirectory(prefix="bench-local-model-") as tmp:
        service = _start_service(threads, Path(tmp) / "requests.jsonl")
        try:
            baseline = _Baseline(threads)
            service_runs: list[Run] = []
            baseline_runs: list[Run] = []
            for rep in range(args.reps + 1):  # the first pair is the warm-up
                run = asyncio.run(_service_run(service.target, args.max_tokens))
                requests = service.last_requests()
                baseline.tool_phase(requests["tool"])
                alone = baseline.synthesis(requests["synthesis"])
                if rep:
                    service_runs.append(run)
                    baseline_runs.append(alone)
                    print(
                        f"run {rep}: service {run.decode_rate:.1f} tok/s, "
                        f"llama.cpp {alone.decode_rate:.1f} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            _stop_service(service)
    report, ratio = _table(service_runs, baseline_runs, threads, args.max_tokens)
    print(report)
    return 1 if args.strict and ratio < TARGET else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.local_model", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed runs per side (default 5)")
    parser.add_argument("--max-tokens", type=int, default=256, help="synthesis max_tokens (default 256)")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="llama.cpp threads, both sides (default: all cores)",
    )
    parser.add_argument("--strict", action="store_true", help=f"exit 1 when the ratio is below {TARGET:.0%}")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the service's process
    parser.add_argument("--capture", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        import uvloop

        return uvloop.run(_serve(args.threads, args.capture))
    return _benchmark(args)


if __name__ == "__main__":
    raise SystemExit(main())
