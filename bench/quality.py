"""Quality of the embedded model's tool stage: right tool, valid calls, correct answers.

    python -m bench.quality [--prompts bench/quality_prompts.json] [--markdown] [--limit N] [--json OUT]

Everything runs in this process on 127.0.0.1: a fake Open-Meteo-compatible weather server
(aiohttp; every answer is 17.5 °C, 60 % humidity, 12 km/h wind, "partly cloudy"), the
service (`start_server` with the default settings' backend: SmolLM2-135M-Instruct on a
supervised llama-server) and a grpc.aio channel with the generated stubs. Each prompt of
the set is one StreamSynthesis stage, one at a time, both phases at temperature 0 (tool
phase max_tokens 128, synthesis 96), so a run is reproducible on one build of the model.

Per prompt it records whether a tool was called, whether it was the expected one (for a
prompt that needs no tool: whether no call was made), whether every call passed validation
(`schema_valid`: no INVALID_ARGUMENTS / UNKNOWN_TOOL outcome) and ran (`executed_ok`), and
whether the final text (Done.text) satisfies the prompt's answer rule. The rules are
mechanical and case-insensitive: `contains` (a substring), `regex` (re.search) or
`any_text` (non-empty after stripping). Timings: time to the first event and to the first
chunk (of either phase) from the call; tokens/s per phase = completion tokens / the phase's
duration as the server reports it (prompt evaluation included; the tool phase's also
includes running the tool).

A stage that ends with an Error or Cancel event (or a failed call) counts as wrong on every
count and is listed under "errors". The exit status is 1 when any call the model made was
schema-invalid (the product promises 100 % valid calls on the embedded model, by grammar),
else 0. On a busy 2-core machine the timings are noisy; the quality columns are not (the
model runs at temperature 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = _ROOT / "bench" / "quality_prompts.json"
TOOL_NAMES = ("calculator", "get_weather", "current_time")
TOOL_MAX_TOKENS = 128
SYNTHESIS_MAX_TOKENS = 96
#: Seconds one stage may take; far above what a 135M model needs, it only stops a hang.
CALL_TIMEOUT = 300.0
#: What the fake weather server answers, whatever it is asked (the fields get_weather reads).
FAKE_WEATHER = {
    "current": {"temperature_2m": 17.5, "relative_humidity_2m": 60, "wind_speed_10m": 12.0, "weather_code": 2}
}


# -- the prompt set ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    tools: tuple[str, ...]  # offered; () offers every tool
    expect_tool: str | None
    rule: str  # contains | regex | any_text
    value: str


def load_prompts(path: Path) -> list[Prompt]:
    """The prompt set, checked up front: a typo in the file should fail before the model
    has spent minutes on the prompts before it."""
    entries = json.loads(path.read_text(encoding="utf-8"))
    prompts: list[Prompt] = []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i} ({entry.get('id', '?')})"
        answer = entry.get("answer", {})
        prompt = Prompt(
            id=str(entry["id"]),
            prompt=str(entry["prompt"]),
            tools=tuple(entry.get("tools", ())),
            expect_tool=entry.get("expect_tool"),
            rule=str(answer.get("rule", "")),
            value=str(answer.get("value", "")),
        )
        if prompt.rule not in ("contains", "regex", "any_text"):
            raise SystemExit(f"{where}: answer.rule must be contains, regex or any_text")
        if prompt.rule == "regex":
            re.compile(prompt.value)
        unknown = [t for t in (*prompt.tools, prompt.expect_tool) if t is not None and t not in TOOL_NAMES]
        if unknown:
            raise SystemExit(f"{where}: unknown tool names {unknown}")
        if prompt.expect_tool and prompt.tools and prompt.expect_tool not in prompt.tools:
            raise SystemExit(f"{where}: expect_tool {prompt.expect_tool} is not offered")
        prompts.append(prompt)
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{path}: duplicate ids")
    return prompts


def answer_matches(prompt: Prompt, text: str) -> bool:
    if prompt.rule == "any_text":
        return bool(text.strip())
    if prompt.rule == "contains":
        return prompt.value.casefold() in text.casefold()
    return re.search(prompt.value, text, re.IGNORECASE) is not None


# -- one stage ----------------------------------------------------------------------------------


@dataclass
class Call:
    tool_name: str
    arguments: str
    outcome: str  # the ToolOutcome name
    error: str


def _is_valid(call: Call) -> bool:
    return call.outcome not in ("TOOL_OUTCOME_INVALID_ARGUMENTS", "TOOL_OUTCOME_UNKNOWN_TOOL")


@dataclass
class Record:
    id: str
    prompt: str
    tools: list[str]
    expect_tool: str | None
    calls: list[Call] = field(default_factory=list)
    text: str = ""
    error: str = ""  # the Error / Cancel event or the failed call; "" when Done arrived
    tool_called: bool = False
    right_tool: bool = False
    schema_valid: bool = True
    executed_ok: bool = False
    answer_correct: bool = False
    tool_prompt_tokens: int | None = None
    tool_completion_tokens: int | None = None
    synthesis_completion_tokens: int | None = None
    ttfe_s: float | None = None
    ttft_s: float | None = None  # to the first chunk event, of either phase
    tool_tokens_per_s: float | None = None
    synthesis_tokens_per_s: float | None = None
    total_s: float = 0.0
    model: str = ""

    @property
    def tool_needed(self) -> bool:
        return self.expect_tool is not None


def _stage_request(prompt: Prompt) -> Any:
    from toolchain_proto.v1 import toolchain_pb2 as pb

    return pb.StreamSynthesisRequest(
        stage=pb.StageRequest(
            user_prompt=prompt.prompt,
            tools=prompt.tools,
            tool_phase=pb.PhaseOptions(max_tokens=TOOL_MAX_TOKENS, temperature=0.0),
            synthesis_phase=pb.PhaseOptions(max_tokens=SYNTHESIS_MAX_TOKENS, temperature=0.0),
        )
    )


def _rate(tokens: int, stats: Any) -> float | None:
    seconds = stats.duration.ToTimedelta().total_seconds()
    return tokens / seconds if seconds > 0 else None


async def run_prompt(stub: Any, prompt: Prompt) -> Record:
    import grpc
    from toolchain_proto.v1 import toolchain_pb2 as pb

    record = Record(prompt.id, prompt.prompt, list(prompt.tools), prompt.expect_tool)
    invalid = (pb.TOOL_OUTCOME_INVALID_ARGUMENTS, pb.TOOL_OUTCOME_UNKNOWN_TOOL)
    done: Any = None
    started = time.perf_counter()
    try:
        async for response in stub.StreamSynthesis(_stage_request(prompt), timeout=CALL_TIMEOUT):
            elapsed = time.perf_counter() - started
            event = response.event
            kind = event.WhichOneof("event")
            if record.ttfe_s is None:
                record.ttfe_s = elapsed
            if kind == "chunk" and record.ttft_s is None:
                record.ttft_s = elapsed
            elif kind == "tool_summary":
                results = event.tool_summary.results
                record.calls = [
                    Call(r.tool_name, r.arguments, pb.ToolOutcome.Name(r.outcome), r.error) for r in results
                ]
                record.tool_called = bool(results)
                record.schema_valid = all(r.outcome not in invalid for r in results)
                record.executed_ok = bool(results) and all(r.outcome == pb.TOOL_OUTCOME_OK for r in results)
                if prompt.expect_tool is None:
                    record.right_tool = not results
                else:
                    record.right_tool = bool(results) and results[0].tool_name == prompt.expect_tool
            elif kind == "done":
                done = event.done
            elif kind == "error":
                error = event.error
                record.error = f"Error event: {error.reason or error.code}: {error.message}"
            elif kind == "cancel":
                record.error = f"Cancel event: {pb.CancelReason.Name(event.cancel.reason)}"
    except grpc.aio.AioRpcError as exc:
        record.error = record.error or f"call failed: {exc.code().name}: {exc.details()}"
    record.total_s = time.perf_counter() - started
    if done is None:
        # Without Done nothing about the stage is known to be right, whatever the summary said.
        record.right_tool = record.executed_ok = record.answer_correct = False
        record.error = record.error or "the stream ended without a terminal event"
        return record
    record.text = done.text
    # A tool-needing prompt is answered correctly only through its tool: a made-up clock
    # time or a guessed product that happens to match the rule does not count.
    through_tool = not record.tool_needed or (record.right_tool and record.executed_ok)
    record.answer_correct = through_tool and answer_matches(prompt, done.text)
    record.model = done.tool_phase.model
    if done.tool_phase.HasField("usage"):
        usage = done.tool_phase.usage
        record.tool_prompt_tokens = usage.prompt_tokens
        record.tool_completion_tokens = usage.completion_tokens
        record.tool_tokens_per_s = _rate(usage.completion_tokens, done.tool_phase)
    if done.HasField("synthesis_phase") and done.synthesis_phase.HasField("usage"):
        tokens = done.synthesis_phase.usage.completion_tokens
        record.synthesis_completion_tokens = tokens
        record.synthesis_tokens_per_s = _rate(tokens, done.synthesis_phase)
    return record


# -- the report -----------------------------------------------------------------------------------


def _pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({part / whole:.0%})" if whole else "n/a"


def _median(values: Sequence[float | int | None], fmt: str) -> str:
    present = [v for v in values if v is not None]
    return format(statistics.median(present), fmt) if present else "n/a"


def _count(records: Sequence[Record], test: Callable[[Record], bool]) -> int:
    return sum(1 for r in records if test(r))


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _seconds(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _per_prompt_table(records: Sequence[Record]) -> str:
    headers = ["id", "offered", "expect", "called", "right", "valid", "ran", "answer", "ptok", "ttok"]
    headers += ["ttfe s", "ttft s", "tool t/s", "synth t/s", "text"]
    rows = []
    for r in records:
        called = ",".join(c.tool_name for c in r.calls) or "-"
        ran = _yes(r.executed_ok) if r.tool_called else "-"
        text = ("ERROR " + r.error) if r.error else r.text
        rows.append(
            [
                r.id,
                ",".join(r.tools) or "all",
                r.expect_tool or "-",
                called,
                _yes(r.right_tool),
                _yes(r.schema_valid),
                ran,
                _yes(r.answer_correct),
                str(r.tool_prompt_tokens) if r.tool_prompt_tokens is not None else "-",
                str(r.tool_completion_tokens) if r.tool_completion_tokens is not None else "-",
                _seconds(r.ttfe_s),
                _seconds(r.ttft_s),
                f"{r.tool_tokens_per_s:.1f}" if r.tool_tokens_per_s is not None else "-",
                f"{r.synthesis_tokens_per_s:.1f}" if r.synthesis_tokens_per_s is not None else "-",
                # One line per prompt: the answer's start is enough to see what went wrong.
                " ".join(text.split())[:60],
            ]
        )
    legend = (
        "ptok/ttok: tool-phase prompt/completion tokens; ttfe/ttft: seconds from the call to the "
        "first event/chunk; t/s: completion tokens per second of the phase"
    )
    return _plain_table(headers, rows) + "\n" + legend


def summarize(records: Sequence[Record]) -> list[tuple[str, str]]:
    """The overall figures, as (metric, value) pairs for either output format."""
    needing = [r for r in records if r.tool_needed]
    no_tool = [r for r in records if not r.tool_needed]
    calls = [c for r in records for c in r.calls]
    valid_calls = sum(1 for c in calls if _is_valid(c))
    return [
        ("prompts (tool-needing / no-tool)", f"{len(records)} ({len(needing)} / {len(no_tool)})"),
        ("tool-needing: tool called", _pct(_count(needing, lambda r: r.tool_called), len(needing))),
        (
            "tool-needing: right tool (first call)",
            _pct(_count(needing, lambda r: r.right_tool), len(needing)),
        ),
        ("tool-needing: executed OK", _pct(_count(needing, lambda r: r.executed_ok), len(needing))),
        ("no-tool: no call made", _pct(_count(no_tool, lambda r: r.right_tool), len(no_tool))),
        ("schema-valid calls (of all calls made)", _pct(valid_calls, len(calls))),
        ("answers correct (by rule)", _pct(_count(records, lambda r: r.answer_correct), len(records))),
        ("stages that failed (error/cancel)", str(_count(records, lambda r: bool(r.error)))),
        ("median tool-phase prompt tokens", _median([r.tool_prompt_tokens for r in records], ".0f")),
        ("median time to first event (s)", _median([r.ttfe_s for r in records], ".2f")),
        ("median time to first chunk, TTFT (s)", _median([r.ttft_s for r in records], ".2f")),
        ("median tool-phase tokens/s", _median([r.tool_tokens_per_s for r in records], ".1f")),
        ("median synthesis tokens/s", _median([r.synthesis_tokens_per_s for r in records], ".1f")),
    ]


def breakdown(records: Sequence[Record]) -> tuple[list[str], list[list[str]]]:
    """One row per expected tool (and one for the prompts that need none)."""
    headers = ["expected", "prompts", "tool called", "right tool", "executed OK", "valid calls"]
    headers += ["answers correct", "median prompt tok", "median TTFT s", "median synth t/s"]
    rows = []
    for expected in (*TOOL_NAMES, None):
        group = [r for r in records if r.expect_tool == expected]
        if not group:
            continue
        calls = [c for r in group for c in r.calls]
        valid = sum(1 for c in calls if _is_valid(c))
        rows.append(
            [
                expected or "none",
                str(len(group)),
                _pct(_count(group, lambda r: r.tool_called), len(group)),
                # For the no-tool group "right" means that no call was made.
                _pct(_count(group, lambda r: r.right_tool), len(group)),
                _pct(_count(group, lambda r: r.executed_ok), len(group)) if expected else "-",
                _pct(valid, len(calls)),
                _pct(_count(group, lambda r: r.answer_correct), len(group)),
                _median([r.tool_prompt_tokens for r in group], ".0f"),
                _median([r.ttft_s for r in group], ".2f"),
                _median([r.synthesis_tokens_per_s for r in group], ".1f"),
            ]
        )
    return headers, rows


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, load average {os.getloadavg()[0]:.1f} at the end"


def model_description(records: Sequence[Record]) -> str:
    from toolchain_service.backends.local_model import find_bundled_model, find_server_binary

    names = sorted({r.model for r in records if r.model}) or ["?"]
    gguf = find_bundled_model()
    return (
        f"{', '.join(names)} ({gguf.name if gguf else 'no bundled GGUF'}) on "
        f"{find_server_binary() or 'llama-server'}, temperature 0, "
        f"max_tokens tool {TOOL_MAX_TOKENS} / synthesis {SYNTHESIS_MAX_TOKENS}"
    )


def report(records: Sequence[Record], markdown: bool) -> str:
    summary = summarize(records)
    headers, rows = breakdown(records)
    parts = [_per_prompt_table(records), ""]
    if markdown:
        parts += [
            f"Machine: {machine()}  ",
            f"Model: {model_description(records)}",
            "",
            _markdown_table(["metric", "value"], [list(pair) for pair in summary]),
            "",
            _markdown_table(headers, rows),
        ]
    else:
        parts += [
            f"machine: {machine()}",
            f"model:   {model_description(records)}",
            "",
            _plain_table(["metric", "value"], [list(pair) for pair in summary]),
            "",
            _plain_table(headers, rows),
        ]
    failed = [r for r in records if r.error]
    if failed:
        parts += ["", "errors (the service ended these stages without Done):"]
        parts += [f"  {r.id}: {r.error}" for r in failed]
    invalid = [(r.id, c) for r in records for c in r.calls if not _is_valid(c)]
    parts.append("")
    if invalid:
        parts.append(f"FAIL: {len(invalid)} schema-invalid call(s); the embedded model promises none:")
        parts += [f"  {rid}: {c.tool_name} {c.arguments} -> {c.outcome}: {c.error}" for rid, c in invalid]
    else:
        parts.append("every call the model made was schema-valid (the embedded model's promise): OK")
    return "\n".join(parts)


# -- the run ------------------------------------------------------------------------------------


async def _start_weather() -> tuple[web.AppRunner, str, list[int]]:
    """The fake forecast API; the list counts its requests (a check that calls reached it)."""
    hits = [0]

    async def forecast(request: web.Request) -> web.Response:
        hits[0] += 1
        return web.json_response(FAKE_WEATHER)

    app = web.Application()
    app.router.add_get("/v1/forecast", forecast)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/v1/forecast", hits


async def _run(prompts: Sequence[Prompt]) -> list[Record]:
    import grpc
    from toolchain_proto.v1 import toolchain_pb2 as pb
    from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc
    from toolchain_service.config import Settings, ToolSettings
    from toolchain_service.transport.server import start_server

    records: list[Record] = []
    runner, weather_url, hits = await _start_weather()
    try:
        settings = Settings(address="127.0.0.1:0", tools=ToolSettings(weather_url=weather_url))
        print("starting the service and its model process ...", file=sys.stderr, flush=True)
        server = await start_server(settings)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.ToolchainServiceStub(channel)
                await channel.channel_ready()
                # Untimed warm-up: the first request pays for loading the model's weights into
                # the caches and fills the prompt cache with the shared instructions, which
                # would otherwise make the first prompt's timings an outlier.
                await stub.RunTools(
                    pb.RunToolsRequest(
                        stage=pb.StageRequest(user_prompt="Hi.", tool_phase=pb.PhaseOptions(max_tokens=8))
                    ),
                    timeout=CALL_TIMEOUT,
                )
                for i, prompt in enumerate(prompts, 1):
                    record = await run_prompt(stub, prompt)
                    records.append(record)
                    calls = ",".join(
                        f"{c.tool_name}:{c.outcome.removeprefix('TOOL_OUTCOME_')}" for c in record.calls
                    )
                    print(
                        f"[{i}/{len(prompts)}] {prompt.id}: calls [{calls}] answer "
                        f"{'ok' if record.answer_correct else 'WRONG'} ({record.total_s:.1f}s)"
                        + (f" ERROR {record.error}" if record.error else ""),
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            await server.stop(0)
    finally:
        await runner.cleanup()
    weather_calls = sum(
        1 for r in records for c in r.calls if c.tool_name == "get_weather" and c.outcome == "TOOL_OUTCOME_OK"
    )
    if weather_calls and not hits[0]:
        print("warning: get_weather ran but the fake weather server saw no request", file=sys.stderr)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="the prompt set (JSON)")
    parser.add_argument("--markdown", action="store_true", help="summary and breakdown as Markdown tables")
    parser.add_argument("--limit", type=int, default=0, help="run only the first N prompts")
    parser.add_argument("--json", type=Path, help="write every per-prompt record to this file")
    args = parser.parse_args(argv)

    from toolchain_service.backends.local_model import find_server_binary

    if find_server_binary() is None:
        raise SystemExit("llama-server is neither beside this Python nor on PATH: run bash .ci/setup")
    prompts = load_prompts(args.prompts)
    if args.limit > 0:
        prompts = prompts[: args.limit]
    records = asyncio.run(_run(prompts))
    print(report(records, args.markdown))
    if args.json:
        payload = {
            "machine": machine(),
            "model": model_description(records),
            "summary": dict(summarize(records)),
            "records": [{**asdict(r), "tool_needed": r.tool_needed} for r in records],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    invalid = any(not _is_valid(c) for r in records for c in r.calls)
    return 1 if invalid else 0


if __name__ == "__main__":
    raise SystemExit(main())
