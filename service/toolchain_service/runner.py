"""The stage runner: one async generator of domain events behind all four RPCs.

    run(spec) ─▶ ( ChunkEvent* (tool round r) ─▶ ToolSummaryEvent (round r) )  r = 1..k
             ─▶ ChunkEvent* (synthesis) ─▶ DoneEvent | ErrorEvent   (CancelledError propagates)

A tool round asks the model for tool calls (the stage's tools; the caller's tool_choice in
round 1, "auto" after), streamed when the caller streams and the backend can stream tool
calls, otherwise unstreamed and replayed as one chunk. Calls come from structured tool_calls
or, failing those, from the content. The registry validates every call and runs the valid
ones. While rounds remain (spec.max_rounds) and the round made calls that ran (or, with
repair, calls that failed validation), the assistant turn and one tool message per call go
back to the model for another round; a round without calls ends the stage with its text.
The synthesis phase (synthesis RPCs, after a round with calls) sends the whole conversation
without tools.

Transient backend failures (BackendUnavailable) are retried with jittered exponential
backoff (at least the backend's Retry-After; a longer Retry-After goes to the caller in
RetryInfo) while nothing of that model call has reached the caller and the deadline allows;
every model call is idempotent (tools run between calls, never inside a retried one). The
retries count in PhaseStats.retries, and in the error when the phase gives up. Unary
callers get the same events and fold them; they never see chunks of a call twice because
retries happen only before its first chunk.

An answer cut by max_tokens (finish_reason "length") in the middle of a tool call makes
that call INVALID_ARGUMENTS with a message saying so, instead of a bare JSON error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from toolchain_service import tracing
from toolchain_service.backends.base import ChatBackend, ChatRequest, Completion
from toolchain_service.backends.registry import BackendRegistry
from toolchain_service.errors import BackendUnavailable, NotFoundError, StageError
from toolchain_service.events import (
    ChunkEvent,
    DoneEvent,
    ErrorEvent,
    Phase,
    PhaseStats,
    StageEvent,
    StageSpec,
    ToolCall,
    ToolCallDelta,
    ToolCallResult,
    ToolOutcome,
    ToolSummaryEvent,
    Usage,
    combined,
)
from toolchain_service.toolcalls import ToolCallAssembler, parse_content_calls
from toolchain_service.tools.registry import ToolRegistry

log = logging.getLogger(__name__)

#: A backend call bound by the caller's deadline may run this much past it, so that the
#: deadline's own cancellation (DEADLINE_EXCEEDED, Cancel event) ends the stage rather
#: than a backend timeout racing it (UNAVAILABLE).
_DEADLINE_GRACE = 0.25


@dataclass(slots=True)
class _PhaseOutput:
    """What one model call produced, however it was called."""

    content: list[str] = field(default_factory=list)
    assembler: ToolCallAssembler = field(default_factory=ToolCallAssembler)
    finish_reason: str = ""
    usage: Usage | None = None
    emitted: bool = False

    def text(self) -> str:
        return "".join(self.content)

    def take_text(self) -> str:
        """The text, its pieces let go: a long answer's Done is then not held twice while
        it waits for its reader (pieces and joined text)."""
        text = self.text()
        self.content = [text] if text else []
        return text

    def reset(self) -> None:
        """Forget a failed attempt that sent nothing to the caller, before a retry."""
        self.content.clear()
        self.assembler = ToolCallAssembler()
        self.finish_reason = ""
        self.usage = None


def _cut_by_max_tokens(calls: list[ToolCall], max_tokens: int) -> list[ToolCall]:
    """Calls of an answer that stopped at max_tokens: its last call, when incomplete, was
    cut rather than malformed; say so, with what to do about it."""
    if not calls:
        return calls
    last = calls[-1]
    if not last.problem and last.arguments.strip():
        try:
            json.loads(last.arguments)
        except ValueError:
            pass
        else:
            return calls
    problem = (
        f"the model's answer was cut by max_tokens ({max_tokens}) before this tool call was "
        "complete; raise tool_phase.max_tokens"
    )
    if last.problem:
        problem = f"{last.problem}: {problem}"
    return [*calls[:-1], dataclasses.replace(last, problem=problem)]


#: Outcomes of calls that ran (a round with none of these changed nothing).
_EXECUTED = frozenset({ToolOutcome.OK, ToolOutcome.FAILED, ToolOutcome.TIMED_OUT})
_NOT_VALID = frozenset({ToolOutcome.INVALID_ARGUMENTS, ToolOutcome.UNKNOWN_TOOL})


def _tool_message_content(result: ToolCallResult, *, repair: bool = False) -> str:
    if result.outcome == ToolOutcome.OK:
        if result.truncated:
            return str(result.result)  # already the marked start of the JSON text
        return json.dumps(result.result, ensure_ascii=False)
    body = {"error": result.error, "outcome": result.outcome.name.lower()}
    if repair and result.outcome in _NOT_VALID:
        body["note"] = "this call was not executed; correct it and call the tool again"
    return json.dumps(body, ensure_ascii=False)


def _unique_ids(calls: list[ToolCall], seen: set[str], round_no: int) -> list[ToolCall]:
    """The calls with ids unique in the conversation: a model that gives no ids gets
    "call_0", "call_1", ... in every round, and a tool message must name one call."""
    out: list[ToolCall] = []
    for position, call in enumerate(calls):
        unique = dataclasses.replace(call, id=f"call_r{round_no}_{position}") if call.id in seen else call
        seen.add(unique.id)
        out.append(unique)
    return out


def _round_messages(results: tuple[ToolCallResult, ...], *, repair: bool) -> list[dict[str, Any]]:
    """The assistant turn of a round's calls and one tool message per call."""
    assistant = {
        "role": "assistant",
        # "", not null: llama.cpp's server rejects a null content (HTTP 500).
        "content": "",
        "tool_calls": [
            {
                "id": r.call.id,
                "type": "function",
                "function": {"name": r.call.name, "arguments": r.call.arguments},
            }
            for r in results
        ],
    }
    tools = [
        {"role": "tool", "tool_call_id": r.call.id, "content": _tool_message_content(r, repair=repair)}
        for r in results
    ]
    return [assistant, *tools]


# Span attributes: built only while tracing is on (one flag check otherwise).
def _phase_attributes(backend: ChatBackend, model: str) -> dict[str, tracing.AttributeValue] | None:
    if not tracing.enabled():
        return None
    return {"toolchain.backend": backend.name, "gen_ai.request.model": model}


def _call_attributes(
    backend: ChatBackend, request: ChatRequest, attempt: int, streamed: bool
) -> dict[str, tracing.AttributeValue] | None:
    if not tracing.enabled():
        return None
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": request.model,
        "gen_ai.request.max_tokens": request.max_tokens,
        "gen_ai.request.temperature": request.temperature,
        "toolchain.backend": backend.name,
        "toolchain.backend.kind": backend.info.kind,
        "toolchain.attempt": attempt,
        "toolchain.streamed": streamed,
    }


def _record_phase(span: tracing.SpanLike, stats: PhaseStats, tool_calls: int) -> None:
    span.set_attribute("gen_ai.response.finish_reasons", stats.finish_reason)
    span.set_attribute("toolchain.retries", stats.retries)
    span.set_attribute("toolchain.tool_calls", tool_calls)
    if stats.usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", stats.usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", stats.usage.completion_tokens)


class StageRunner:
    def __init__(self, backends: BackendRegistry, tools: ToolRegistry) -> None:
        self.backends = backends
        self.tools = tools

    def enabled_tools(self, requested: tuple[str, ...]) -> tuple[str, ...]:
        available = self.tools.names()
        if not requested:
            return available
        unknown = [n for n in requested if n not in available]
        if unknown:
            raise NotFoundError(f"unknown tools {', '.join(unknown)}; available: {', '.join(available)}")
        return tuple(dict.fromkeys(requested))

    @staticmethod
    def _offered(
        spec: StageSpec, backend: ChatBackend, enabled: tuple[str, ...], round_no: int
    ) -> tuple[tuple[str, ...], str]:
        """The tools offered in a round and the backend's tool choice. The caller's choice
        binds the first round only; later rounds are "auto", so that it cannot loop. A
        backend that cannot force a choice is asked with "auto" (the proto's fallback)."""
        choice = spec.tool_choice
        if round_no > 1 or choice.mode == "auto":
            return enabled, "auto"
        if choice.mode == "none":
            return (), "auto"
        forced = backend.capabilities.forces_tool_choice
        if choice.mode == "tool":
            return (choice.tool,), choice.tool if forced else "auto"
        return enabled, "required" if forced else "auto"

    async def run(self, spec: StageSpec, deadline: float | None = None) -> AsyncGenerator[StageEvent, None]:
        """The stage's events; `deadline` is a `time.monotonic()` instant or None."""
        phase = Phase.UNSPECIFIED
        try:
            backend = self.backends.resolve(spec.backend)
            model = self.backends.resolve_model(backend, spec.model)
            enabled = self.enabled_tools(spec.tools)
            if spec.tool_choice.mode == "tool" and spec.tool_choice.tool not in enabled:
                raise NotFoundError(
                    f"tool_choice names {spec.tool_choice.tool!r}, which this stage does not offer; "
                    f"offered: {', '.join(enabled)}"
                )
            constrained = backend.capabilities.constrains_tool_calls
            no_tools_ever = spec.tool_choice.mode == "none" and spec.max_rounds == 1
            instructions = "" if constrained or no_tools_ever else self.tools.instructions(enabled)
            system = f"{spec.system_prompt}\n\n{instructions}".strip() if instructions else spec.system_prompt
            messages: list[dict[str, Any]] = []
            if system:
                messages.append({"role": "system", "content": system})
            messages.append({"role": "user", "content": spec.user_prompt})

            phase = Phase.TOOL
            rounds: list[PhaseStats] = []
            calls: list[ToolCall] = []
            seen_ids: set[str] = set()
            text = ""
            exhausted = False
            for round_no in range(1, spec.max_rounds + 1):
                offered, choice = self._offered(spec, backend, enabled, round_no)
                started = time.monotonic()
                stats = PhaseStats(model=model, round=round_no)
                request = ChatRequest(
                    model=model,
                    messages=messages,
                    max_tokens=spec.tool_phase.max_tokens,
                    temperature=spec.tool_phase.temperature,
                    tools=self.tools.specs(offered) or None,
                    tool_hints=self.tools.hints(offered) if constrained and offered else None,
                    tool_choice=choice,
                )
                out = _PhaseOutput()
                streamed = spec.stream and (not offered or backend.capabilities.streams_tool_calls)
                with tracing.span("tool_phase", _phase_attributes(backend, model)) as span:
                    async with aclosing(
                        self._call(backend, request, Phase.TOOL, out, stats, deadline, streamed, round_no)
                    ) as chunks:
                        async for event in chunks:
                            yield event

                    calls = out.assembler.calls()
                    text = out.take_text()
                    if not calls and not constrained and offered:
                        # calls written in the content, read by the backend's tool parser;
                        # the text keeps what is not call markup
                        calls, text = parse_content_calls(text, backend.info.tool_parser, offered)
                    if out.finish_reason == "length":
                        calls = _cut_by_max_tokens(calls, spec.tool_phase.max_tokens)
                    calls = _unique_ids(calls, seen_ids, round_no)
                    results = await self.tools.run(calls, offered) if calls else ()
                    results = tuple(dataclasses.replace(r, round=round_no) for r in results)
                    stats.duration = time.monotonic() - started
                    if span.is_recording():
                        _record_phase(span, stats, len(calls))
                rounds.append(stats)
                yield ToolSummaryEvent(results, round_no)
                if not calls:
                    break
                messages.extend(_round_messages(results, repair=spec.repair))
                if not spec.repair and not any(r.outcome in _EXECUTED for r in results):
                    break  # nothing ran: another round would only repeat it (repair is off)
                exhausted = round_no == spec.max_rounds > 1  # one round ends by design, not for want

            tool_stats = combined(rounds)
            if not spec.synthesis or not calls:
                yield DoneEvent(tool_stats, None, text, tuple(rounds), exhausted)
                return

            phase = Phase.SYNTHESIS
            started = time.monotonic()
            synthesis_stats = PhaseStats(model=model)
            request = ChatRequest(
                model=model,
                messages=messages,
                max_tokens=spec.synthesis_phase.max_tokens,
                temperature=spec.synthesis_phase.temperature,
            )
            out = _PhaseOutput()
            synthesis_round = len(rounds) + 1
            with tracing.span("synthesis_phase", _phase_attributes(backend, model)) as span:
                async with aclosing(
                    self._call(
                        backend,
                        request,
                        Phase.SYNTHESIS,
                        out,
                        synthesis_stats,
                        deadline,
                        spec.stream,
                        synthesis_round,
                    )
                ) as chunks:
                    async for event in chunks:
                        yield event
                synthesis_stats.duration = time.monotonic() - started
                if span.is_recording():
                    _record_phase(span, synthesis_stats, 0)
            yield DoneEvent(tool_stats, synthesis_stats, out.take_text(), tuple(rounds), exhausted)
        except StageError as exc:
            if exc.phase == Phase.UNSPECIFIED:
                exc.phase = phase
            yield ErrorEvent(exc)
        except Exception:  # a bug of ours: log it, tell the caller without internals
            log.exception("stage %s failed unexpectedly", spec.stage_id)
            error = StageError(f"internal error in stage {spec.stage_id!r}; the server log has the details")
            error.phase = phase
            yield ErrorEvent(error)

    async def _call(
        self,
        backend: ChatBackend,
        request: ChatRequest,
        phase: Phase,
        out: _PhaseOutput,
        stats: PhaseStats,
        deadline: float | None,
        streamed: bool,
        round_no: int,
    ) -> AsyncGenerator[ChunkEvent, None]:
        """One model call with retries; yields chunks (only when the stage streams)."""
        attempt = 0
        while True:
            if deadline is not None:
                request.timeout = deadline - time.monotonic() + _DEADLINE_GRACE
            try:
                with tracing.span(
                    f"chat {request.model}",
                    _call_attributes(backend, request, attempt, streamed),
                    client=True,
                ):
                    if streamed:
                        async with aclosing(backend.stream(request)) as deltas:
                            async for delta in deltas:
                                chunk = self._absorb(
                                    out,
                                    phase,
                                    round_no,
                                    delta.content,
                                    delta.tool_calls,
                                    delta.finish_reason,
                                    delta.usage,
                                )
                                if chunk is not None:
                                    out.emitted = True
                                    yield chunk
                    else:
                        completion = await backend.complete(request)
                        chunk = self._absorb_completion(out, phase, round_no, completion)
                        if chunk is not None:
                            yield chunk
                break
            except BackendUnavailable as exc:
                delay = None if out.emitted else self._backoff(backend, attempt, deadline, exc.retry_after)
                if delay is None:
                    exc.after_retries(attempt)
                    raise
                out.reset()
                attempt += 1
                stats.retries = attempt
                log.info(
                    "retrying %s phase on backend %s in %.2fs (attempt %d): %s",
                    phase.name,
                    backend.name,
                    delay,
                    attempt,
                    exc,
                )
                await asyncio.sleep(delay)
        stats.finish_reason = out.finish_reason
        stats.usage = out.usage

    @staticmethod
    def _backoff(
        backend: ChatBackend, attempt: int, deadline: float | None, retry_after: float | None
    ) -> float | None:
        """Seconds to wait before the next attempt; None: give up now."""
        policy = backend.retry
        if attempt >= policy.max_retries:
            return None
        delay = min(policy.max_backoff, policy.initial_backoff * 2.0**attempt) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            if retry_after > policy.max_backoff:
                return None  # longer than a retry here may wait: the caller gets RetryInfo
            delay = max(delay, retry_after)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay

    @staticmethod
    def _absorb(
        out: _PhaseOutput,
        phase: Phase,
        round_no: int,
        content: str,
        tool_calls: tuple[ToolCallDelta, ...],
        finish_reason: str,
        usage: Usage | None,
    ) -> ChunkEvent | None:
        if usage is not None:
            out.usage = usage
        if finish_reason:
            out.finish_reason = finish_reason
        forwarded: tuple[ToolCallDelta, ...] = ()
        if tool_calls:
            news = [n for n in (out.assembler.add(d) for d in tool_calls) if n is not None]
            forwarded = tuple(news)
        if content:
            out.content.append(content)
        if not (content or forwarded or finish_reason):
            return None  # a role-only or usage-only chunk: nothing for the caller
        return ChunkEvent(phase, content, forwarded, finish_reason, round_no)

    def _absorb_completion(
        self, out: _PhaseOutput, phase: Phase, round_no: int, completion: Completion
    ) -> ChunkEvent | None:
        deltas = tuple(
            ToolCallDelta(index, call.id, call.name, call.arguments)
            for index, call in enumerate(completion.tool_calls)
        )
        return self._absorb(
            out, phase, round_no, completion.content, deltas, completion.finish_reason, completion.usage
        )
