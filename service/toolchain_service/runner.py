"""The stage runner: one async generator of domain events behind all four RPCs.

    run(spec) ─▶ ChunkEvent* (tool phase) ─▶ ToolSummaryEvent ─▶ ChunkEvent* (synthesis)
             ─▶ DoneEvent | ErrorEvent           (CancelledError always propagates)

Phase 1 asks the model for tool calls (tools + tool_choice="auto"), streamed when the
caller streams and the backend can stream tool calls, otherwise unstreamed and replayed
as one chunk. Calls come from structured tool_calls or, failing those, from JSON in the
content. The registry validates every call and runs the valid ones. Phase 2 sends the
assistant message with its tool calls and one tool message per call back to the model.

Transient backend failures (BackendUnavailable) are retried with jittered exponential
backoff while nothing of that phase has reached the caller and the deadline allows;
both phases are idempotent (tools run between them, never inside a retried call).
Unary callers get the same events and fold them; they never see chunks of a phase
twice because retries happen only before the first chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

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
    ToolCallDelta,
    ToolCallResult,
    ToolOutcome,
    ToolSummaryEvent,
    Usage,
)
from toolchain_service.toolcalls import ToolCallAssembler, parse_content_calls
from toolchain_service.tools.registry import ToolRegistry

log = logging.getLogger(__name__)


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


def _tool_message_content(result: ToolCallResult) -> str:
    if result.outcome == ToolOutcome.OK:
        return json.dumps(result.result, ensure_ascii=False)
    return json.dumps({"error": result.error, "outcome": result.outcome.name.lower()})


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

    async def run(self, spec: StageSpec, deadline: float | None = None) -> AsyncGenerator[StageEvent, None]:
        """The stage's events; `deadline` is a `time.monotonic()` instant or None."""
        phase = Phase.UNSPECIFIED
        try:
            backend = self.backends.resolve(spec.backend)
            model = self.backends.resolve_model(backend, spec.model)
            enabled = self.enabled_tools(spec.tools)
            instructions = self.tools.instructions(enabled)
            system = f"{spec.system_prompt}\n\n{instructions}".strip() if instructions else spec.system_prompt
            messages: list[dict[str, Any]] = []
            if system:
                messages.append({"role": "system", "content": system})
            messages.append({"role": "user", "content": spec.user_prompt})

            phase = Phase.TOOL
            started = time.monotonic()
            tool_stats = PhaseStats(model=model)
            request = ChatRequest(
                model=model,
                messages=messages,
                max_tokens=spec.tool_phase.max_tokens,
                temperature=spec.tool_phase.temperature,
                tools=self.tools.specs(enabled) or None,
            )
            out = _PhaseOutput()
            streamed = spec.stream and backend.capabilities.streams_tool_calls
            async for event in self._call(backend, request, Phase.TOOL, out, tool_stats, deadline, streamed):
                yield event

            calls = out.assembler.calls()
            text = out.text()
            if not calls:
                calls = parse_content_calls(text)
                if calls:
                    text = ""
            results = await self.tools.run(calls, enabled) if calls else ()
            tool_stats.duration = time.monotonic() - started
            yield ToolSummaryEvent(results)

            if not spec.synthesis or not calls:
                yield DoneEvent(tool_stats, None, text)
                return

            phase = Phase.SYNTHESIS
            started = time.monotonic()
            synthesis_stats = PhaseStats(model=model)
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": r.call.id,
                            "type": "function",
                            "function": {"name": r.call.name, "arguments": r.call.arguments},
                        }
                        for r in results
                    ],
                }
            )
            messages.extend(
                {"role": "tool", "tool_call_id": r.call.id, "content": _tool_message_content(r)}
                for r in results
            )
            request = ChatRequest(
                model=model,
                messages=messages,
                max_tokens=spec.synthesis_phase.max_tokens,
                temperature=spec.synthesis_phase.temperature,
            )
            out = _PhaseOutput()
            async for event in self._call(
                backend, request, Phase.SYNTHESIS, out, synthesis_stats, deadline, spec.stream
            ):
                yield event
            synthesis_stats.duration = time.monotonic() - started
            yield DoneEvent(tool_stats, synthesis_stats, out.text())
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
    ) -> AsyncGenerator[ChunkEvent, None]:
        """One model call with retries; yields chunks (only when the stage streams)."""
        attempt = 0
        while True:
            if deadline is not None:
                request.timeout = deadline - time.monotonic()
            try:
                if streamed:
                    async with aclosing(backend.stream(request)) as deltas:
                        async for delta in deltas:
                            chunk = self._absorb(
                                out, phase, delta.content, delta.tool_calls, delta.finish_reason, delta.usage
                            )
                            if chunk is not None:
                                out.emitted = True
                                yield chunk
                else:
                    completion = await backend.complete(request)
                    chunk = self._absorb_completion(out, phase, completion)
                    if chunk is not None:
                        yield chunk
                break
            except BackendUnavailable:
                delay = self._backoff(backend, attempt, deadline)
                if out.emitted or delay is None:
                    raise
                attempt += 1
                stats.retries = attempt
                log.info(
                    "retrying %s phase on backend %s in %.2fs (attempt %d)",
                    phase.name,
                    backend.name,
                    delay,
                    attempt,
                )
                await asyncio.sleep(delay)
        stats.finish_reason = out.finish_reason
        stats.usage = out.usage

    @staticmethod
    def _backoff(backend: ChatBackend, attempt: int, deadline: float | None) -> float | None:
        policy = backend.retry
        if attempt >= policy.max_retries:
            return None
        delay = min(policy.max_backoff, policy.initial_backoff * 2.0**attempt) * random.uniform(0.5, 1.0)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay

    @staticmethod
    def _absorb(
        out: _PhaseOutput,
        phase: Phase,
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
        return ChunkEvent(phase, content, forwarded, finish_reason)

    def _absorb_completion(
        self, out: _PhaseOutput, phase: Phase, completion: Completion
    ) -> ChunkEvent | None:
        deltas = tuple(
            ToolCallDelta(index, call.id, call.name, call.arguments)
            for index, call in enumerate(completion.tool_calls)
        )
        return self._absorb(
            out, phase, completion.content, deltas, completion.finish_reason, completion.usage
        )
