"""Turning model output into whole tool calls.

Two sources, in order of preference:

1. Structured `tool_calls`. Streamed, they arrive as deltas keyed by `index`: the id and
   name come in the first delta or repeated in every delta (llama.cpp's server), the
   arguments in pieces to concatenate. `ToolCallAssembler` joins them, never
   concatenating ids or names, and normalises what is forwarded to the caller so that
   id and name appear once per call. A delta whose id or name contradicts an earlier one
   marks the call as malformed instead of silently picking one.
2. JSON in the content, for models that answer tool calls as text ("Qwen style"): a
   `{"name": ..., "arguments": ...}` object, a list of them, or Hermes/Qwen
   `<tool_call>...</tool_call>` blocks, optionally in a Markdown code fence. A block that
   is not valid JSON becomes a malformed call, so the summary says what went wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from toolchain_service.events import ToolCall, ToolCallDelta
from toolchain_service.utf8 import valid

_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)
_FENCE = re.compile(r"\A```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?```\s*\Z", re.DOTALL)


@dataclass(slots=True)
class _Partial:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    problem: str = ""


class ToolCallAssembler:
    """Accumulates streamed tool-call deltas by index into whole calls."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[int, _Partial] = {}

    def __bool__(self) -> bool:
        return bool(self._calls)

    def add(self, delta: ToolCallDelta) -> ToolCallDelta | None:
        """Record one delta; return what is new in it for the caller (None: nothing)."""
        partial = self._calls.get(delta.index)
        if partial is None:
            partial = self._calls[delta.index] = _Partial()
        new_id = new_name = ""
        if delta.id:
            if not partial.id:
                partial.id = new_id = delta.id
            elif delta.id != partial.id and not partial.problem:
                partial.problem = f"the backend sent conflicting ids for tool call {delta.index}"
        if delta.name:
            if not partial.name:
                partial.name = new_name = delta.name
            elif delta.name != partial.name and not partial.problem:
                partial.problem = f"the backend sent conflicting names for tool call {delta.index}"
        if delta.arguments:
            partial.arguments.append(delta.arguments)
        if not (new_id or new_name or delta.arguments):
            return None
        if new_id == delta.id and new_name == delta.name:
            return delta
        return ToolCallDelta(delta.index, new_id, new_name, delta.arguments)

    def calls(self) -> list[ToolCall]:
        return [
            ToolCall(
                id=p.id or f"call_{index}",
                name=p.name,
                arguments="".join(p.arguments),
                problem=p.problem or ("the backend sent a tool call without a name" if not p.name else ""),
            )
            for index, p in sorted(self._calls.items())
        ]


def _call_from_object(obj: object, position: int) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # an OpenAI-shaped call written as text
        obj = {**obj["function"], "id": obj.get("id")}
    name = obj.get("name")
    if not isinstance(name, str):
        return None
    arguments: Any = obj.get("arguments", obj.get("parameters", {}))
    text = valid(arguments) if isinstance(arguments, str) else json.dumps(arguments)
    call_id = obj.get("id")
    return ToolCall(
        id=valid(call_id) if isinstance(call_id, str) and call_id else f"call_{position}",
        name=valid(name),
        arguments=text,
    )


def parse_content_calls(content: str) -> list[ToolCall]:
    """Tool calls written as JSON in the message content; [] when the content is prose."""
    text = content.strip()
    if not text:
        return []
    if "<tool_call>" in text:
        calls = []
        for position, block in enumerate(_HERMES_BLOCK.findall(text)):
            try:
                parsed = json.loads(block)
            except ValueError:
                calls.append(
                    ToolCall(
                        f"call_{position}",
                        "",
                        block[:2000],
                        problem="the <tool_call> block is not valid JSON",
                    )
                )
                continue
            call = _call_from_object(parsed, position)
            calls.append(
                call
                or ToolCall(
                    f"call_{position}", "", block[:2000], problem='the <tool_call> block has no string "name"'
                )
            )
        return calls
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text or text[0] not in "[{":
        return []
    try:
        parsed = json.loads(text)
    except ValueError:
        return []
    items = parsed if isinstance(parsed, list) else [parsed]
    found = [_call_from_object(item, position) for position, item in enumerate(items)]
    calls = [c for c in found if c is not None]
    if not calls or len(calls) != len(found):
        return []  # JSON, but not tool calls: the model's answer
    return calls
