"""The tool registry: specs and instructions for the model, validation, execution.

Every call is validated before anything runs: an unknown or disabled tool, arguments
that are not a JSON object, or arguments that violate the tool's schema end as an
outcome in the summary and are never executed. Valid calls run concurrently, each under
its timeout; a failing, hanging or misbehaving tool does not stop the others.

A result must be JSON: it is normalised through JSON (tuples become lists, keys strings)
and must encode as UTF-8, so whatever a tool returns, the response that carries it can be
built. A result whose JSON text is longer than `max_result_bytes` is truncated: it becomes
a string, the start of that text (cut at a character boundary) followed by
"[truncated: N more bytes]", and the call is OK with `truncated` set; the model is shown
the same string. A tool's unexpected exception is logged as one line (its traceback only
at DEBUG) and reported with its message, never its traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from toolchain_service import tracing
from toolchain_service.backends.base import ToolHint
from toolchain_service.config import ToolSettings
from toolchain_service.events import ToolCall, ToolCallResult, ToolOutcome
from toolchain_service.tools.base import InvalidArguments, Tool, ToolFailure
from toolchain_service.utf8 import valid

log = logging.getLogger(__name__)

_Validated = tuple[Tool[Any], Any]


def _json_int(text: str) -> int:
    value = int(text)
    float(value)  # OverflowError beyond a double: a protobuf Value cannot hold it
    return value


def truncated_text(text: str, limit: int) -> str:
    """The start of `text` that fits, with its marker, in `limit` UTF-8 bytes, cut at a
    character boundary, followed by "[truncated: N more bytes]" (N: the bytes left out)."""
    data = text.encode("utf-8")
    marker_room = len(f"[truncated: {len(data)} more bytes]")  # N is at most the whole size
    kept = data[: max(0, limit - marker_room)].decode("utf-8", errors="ignore")
    return f"{kept}[truncated: {len(data) - len(kept.encode('utf-8'))} more bytes]"


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool[Any]], settings: ToolSettings) -> None:
        self._tools: dict[str, Tool[Any]] = {}
        for tool in tools:
            if tool.name in self._tools:
                raise ValueError(f"two tools are named {tool.name!r}")
            self._tools[tool.name] = tool
        self._settings = settings
        self._closed = False
        self.specs = lru_cache(maxsize=256)(self._specs)
        self.instructions = lru_cache(maxsize=256)(self._instructions)
        self.hints = lru_cache(maxsize=256)(self._hints)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._tools))

    def tools(self) -> list[Tool[Any]]:
        return [self._tools[n] for n in self.names()]

    def get(self, name: str) -> Tool[Any] | None:
        return self._tools.get(name)

    def timeout_of(self, tool: Tool[Any]) -> float:
        return tool.timeout if tool.timeout is not None else self._settings.timeout

    def _specs(self, enabled: tuple[str, ...]) -> list[dict[str, Any]]:
        return [self._tools[n].spec() for n in enabled]

    def _hints(self, enabled: tuple[str, ...]) -> dict[str, ToolHint]:
        """Grammar schemas and example exchanges, for backends that constrain calls."""
        hints = {}
        for name in enabled:
            tool = self._tools[name]
            prompt, arguments = tool.example if tool.example is not None else ("", None)
            hints[name] = ToolHint(tool.grammar_schema(), prompt, arguments)
        return hints

    def _instructions(self, enabled: tuple[str, ...]) -> str:
        """Appended to the system prompt, as the legacy handler did, so that models
        without native tool calling can still answer with JSON tool calls."""
        if not enabled:
            return ""
        lines = ["You can call these tools:"]
        for name in enabled:
            tool = self._tools[name]
            schema = json.dumps(tool.parameters_schema(), separators=(",", ":"))
            lines.append(f"- {name}: {tool.description} Arguments schema: {schema}")
            if tool.instructions:
                lines.append(f"  {tool.instructions}")
        lines.append(
            "To call a tool, answer with a tool call, or with only the JSON object "
            '{"name": <tool name>, "arguments": {...}}. Otherwise answer in plain text.'
        )
        return "\n".join(lines)

    def validate(self, call: ToolCall, enabled: Sequence[str]) -> _Validated | ToolCallResult:
        if call.problem:
            return ToolCallResult(call, ToolOutcome.INVALID_ARGUMENTS, error=call.problem)
        tool = self._tools.get(call.name)
        if tool is None:
            return ToolCallResult(
                call,
                ToolOutcome.UNKNOWN_TOOL,
                error=f"no tool named {call.name!r}; available: {', '.join(enabled)}",
            )
        if call.name not in enabled:
            return ToolCallResult(
                call,
                ToolOutcome.UNKNOWN_TOOL,
                error=f"tool {call.name!r} is not enabled for this stage; enabled: {', '.join(enabled)}",
            )
        text = call.arguments.strip() or "{}"
        try:
            raw = json.loads(text)
        except ValueError as exc:
            return ToolCallResult(
                call, ToolOutcome.INVALID_ARGUMENTS, error=f"arguments are not valid JSON: {exc}"
            )
        if not isinstance(raw, dict):
            return ToolCallResult(
                call, ToolOutcome.INVALID_ARGUMENTS, error="arguments must be a JSON object"
            )
        try:
            args = tool.parse_arguments(text)
        except InvalidArguments as exc:
            return ToolCallResult(call, ToolOutcome.INVALID_ARGUMENTS, error=valid(str(exc)[:1000]))
        return tool, args

    async def run(self, calls: Sequence[ToolCall], enabled: Sequence[str]) -> tuple[ToolCallResult, ...]:
        """Validate every call, execute the valid ones concurrently, keep the model's order."""
        limit = self._settings.max_calls_per_stage
        results: list[ToolCallResult | None] = [None] * len(calls)
        pending: list[tuple[int, ToolCall, _Validated]] = []
        for position, call in enumerate(calls):
            if position >= limit:
                results[position] = ToolCallResult(
                    call,
                    ToolOutcome.SKIPPED,
                    error=f"not executed: more than {limit} tool calls in one answer",
                )
                continue
            checked = self.validate(call, enabled)
            if isinstance(checked, ToolCallResult):
                results[position] = checked
            else:
                pending.append((position, call, checked))
        if len(pending) == 1:
            position, call, (tool, args) = pending[0]
            results[position] = await self._execute(call, tool, args)
        elif pending:
            done = await asyncio.gather(
                *(self._execute(call, tool, args) for _, call, (tool, args) in pending)
            )
            for (position, _, _), result in zip(pending, done, strict=True):
                results[position] = result
        return tuple(r for r in results if r is not None)

    async def _execute(self, call: ToolCall, tool: Tool[Any], args: Any) -> ToolCallResult:
        if not tracing.enabled():
            return await self._execute_untraced(call, tool, args)
        attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool.name}
        with tracing.span(f"execute_tool {tool.name}", attributes) as span:
            result = await self._execute_untraced(call, tool, args)
            span.set_attribute("gen_ai.tool.call.id", call.id)
            span.set_attribute("toolchain.tool.outcome", result.outcome.name.lower())
            return result

    async def _execute_untraced(self, call: ToolCall, tool: Tool[Any], args: Any) -> ToolCallResult:
        timeout = self.timeout_of(tool)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                value = await tool.execute(args)
        except TimeoutError:
            return ToolCallResult(
                call,
                ToolOutcome.TIMED_OUT,
                error=f"tool did not finish within {timeout:g} s",
                duration=time.perf_counter() - started,
            )
        except ToolFailure as exc:
            return ToolCallResult(
                call,
                ToolOutcome.FAILED,
                error=valid(str(exc)[:1000]),
                duration=time.perf_counter() - started,
            )
        except Exception as exc:  # a tool's bug must not end the stage or leak a traceback
            message = valid(str(exc)[:300]) or "no message"
            log.warning("tool %s failed unexpectedly: %s", tool.name, message)
            log.debug("tool %s failure", tool.name, exc_info=True)
            return ToolCallResult(
                call,
                ToolOutcome.FAILED,
                error=f"tool failed unexpectedly: {message}",
                duration=time.perf_counter() - started,
            )
        elapsed = time.perf_counter() - started
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
            size = len(text.encode("utf-8"))  # UnicodeEncodeError: a lone surrogate
            value = json.loads(text, parse_int=_json_int)
        except (TypeError, ValueError, OverflowError, RecursionError):
            return ToolCallResult(
                call,
                ToolOutcome.FAILED,
                error="tool returned a result that is not JSON-serialisable",
                duration=elapsed,
            )
        if size > self._settings.max_result_bytes:
            cut = truncated_text(text, self._settings.max_result_bytes)
            return ToolCallResult(call, ToolOutcome.OK, result=cut, duration=elapsed, truncated=True)
        return ToolCallResult(call, ToolOutcome.OK, result=value, duration=elapsed)

    async def aclose(self) -> None:
        """Close every tool, once (closing again does nothing)."""
        if self._closed:
            return
        self._closed = True
        for tool in self._tools.values():
            await tool.aclose()
