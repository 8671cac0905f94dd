"""Turning model output into whole tool calls.

Two sources:

1. Structured `tool_calls`. Streamed, they arrive as deltas keyed by `index`: the id and
   name come in the first delta or repeated in every delta (llama.cpp's server), the
   arguments in pieces to concatenate. `ToolCallAssembler` joins them, never
   concatenating ids or names, and normalises what is forwarded to the caller so that
   id and name appear once per call. A delta whose id or name contradicts an earlier one
   marks the call as malformed instead of silently picking one.
2. Calls written in the message content, read by the parser the backend is configured
   with (`BackendSettings.tool_parser`), as vLLM picks one tool parser per model family:

   ============  ==========================================================================
   native        nothing: only structured `tool_calls` are calls
   json          the answer (or a Markdown fence that is all of it) opens with `{"name":
                 ..., "arguments"|"parameters": {...}}` or a list of those, names offered
   hermes        Hermes 2 Pro / Qwen 2.5 `<tool_call>{...}</tool_call>` blocks, anywhere
   mistral       `[TOOL_CALLS] [{...}, ...]` (before v11) or `[TOOL_CALLS]name{...}` (v11+)
   llama3_json   Llama 3.1 `{"name": ..., "parameters": {...}}`, several joined by `;`,
                 after `<|python_tag|>`, or without it opening the answer, names offered
   pythonic      Llama 3.2 / ToolACE `[get_weather(city="Paris"), ...]`, literals only,
                 the whole answer (names offered) or inside `<|python_start|>` (Llama 4)
   ============  ==========================================================================

   Several joined by `+` are tried in order; the first that finds a call wins. Each
   returns the calls and the content without their markup (the model's own words).

The rule that keeps a model's plain answer from becoming a call: text without call
markup (`json`, `llama3_json` without `<|python_tag|>`, `pythonic` without
`<|python_start|>`) is a call only when it is call-shaped throughout and every name is a
tool offered to the model; `{"name": "Paris", "country": "France"}` is an answer, and so
is `{"name": "x"}` without arguments. Inside markup the model has said it is calling, so
the name need not be offered (an unknown one is UNKNOWN_TOOL later), and a call that
cannot be read (not JSON, no name, not closed, cut short, non-literal Python arguments)
is returned with a `problem`: reported, never executed. Markup around no call at all
(the tags named in prose, `[TOOL_CALLS]` before plain text) stays text.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeGuard

from toolchain_service.events import ToolCall, ToolCallDelta
from toolchain_service.utf8 import valid


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


# -- calls written in the content ----------------------------------------------------------


class ContentCalls(NamedTuple):
    """What a parser found: the calls, and the content without their markup."""

    calls: list[ToolCall]
    text: str


#: parse(content, names of the tools offered) -> the calls found and the text left over.
ContentParser = Callable[[str, Collection[str]], ContentCalls]

#: How much of an unreadable call's text its summary keeps.
_KEEP = 2000
#: Longer answers are not parsed as Python (ast on megabytes of brackets is slow).
_MAX_PYTHONIC_CHARS = 64 << 10

_FENCE = re.compile(r"\A```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)\n?```\Z", re.DOTALL)
_EMPTY_FENCE = re.compile(r"\A```[a-zA-Z0-9_-]*\s*```\Z")
_NAME_FIELD = re.compile(r'"name"\s*:\s*"([^"\\]{1,200})"')
_STARTS_A_CALL = re.compile(r'\A\[?\s*\{\s*"name"\s*:\s*"([^"\\]{1,200})"')
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|(?=<tool_call>)|\Z)", re.DOTALL)
_MISTRAL_MARK = "[TOOL_CALLS]"
_MISTRAL_V11 = re.compile(
    r"\s*([A-Za-z0-9_.:-]{1,200})\s*(?:\[CALL_ID\]\s*([A-Za-z0-9]{1,64})\s*)?(?:\[ARGS\]\s*)?(?=\{)"
)
_PYTHON_TAG = "<|python_tag|>"
_LLAMA_END = re.compile(r"\s*(?:<\|eom_id\|>|<\|eot_id\|>)\s*\Z")
_PYTHON_START, _PYTHON_END = "<|python_start|>", "<|python_end|>"
_PYTHONIC_HEAD = re.compile(r"\A\[\s*([A-Za-z_]\w{0,199})\s*\(")
_DECODER = json.JSONDecoder()


def _none(text: str) -> ContentCalls:
    return ContentCalls([], text)


def _unfence(text: str) -> str:
    fenced = _FENCE.match(text)
    return fenced.group(1).strip() if fenced else text


def _leftover(parts: list[str]) -> str:
    """The content around the markup: the model's own words, if any."""
    text = "\n".join(p.strip() for p in parts if p.strip())
    return "" if _EMPTY_FENCE.match(text) else text


def _json_value(text: str) -> tuple[object, int] | None:
    """The JSON value at the start of `text` and where it ends; None: not JSON there."""
    try:
        return _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        return None


def _json_sequence(text: str) -> tuple[list[object], str] | None:
    """JSON values at the start of `text`, one after another or joined by `;` (Llama 3.1's
    parallel calls), and the text after the last; None when none starts there."""
    values: list[object] = []
    index = 0
    while (found := _json_value(text[index:])) is not None:
        values.append(found[0])
        index += found[1]
        after = text[index:].lstrip()
        if after.startswith(";"):
            after = after[1:].lstrip()
        if not after.startswith(("{", "[")):
            break
        index = len(text) - len(after)
    return (values, text[index:]) if values else None


def _unwrapped(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    function = obj.get("function")
    if isinstance(function, dict):  # an OpenAI-shaped call written as text
        return {**function, "id": obj.get("id")}
    return obj


def _is_bare_call(obj: object, offered: Collection[str]) -> TypeGuard[dict[str, Any]]:
    """A call with no markup around it: an object whose string "name" is an offered tool
    and whose "arguments" (or "parameters") are an object or a JSON text."""
    if not isinstance(obj, dict):
        return False
    fields = _unwrapped(obj)
    name = fields.get("name")
    if not isinstance(name, str) or name not in offered:
        return False
    arguments = fields.get("arguments", fields.get("parameters"))
    if isinstance(arguments, str):
        found = _json_value(arguments.strip())
        arguments = found[0] if found and not arguments.strip()[found[1] :] else None
    return isinstance(arguments, dict)


def _arguments_text(value: object) -> str:
    # json.dumps escapes lone surrogates: the text is always valid UTF-8.
    return valid(value) if isinstance(value, str) else json.dumps(value)


def _call(obj: Mapping[str, Any], position: int) -> ToolCall:
    """The call an object with a string "name" makes; no arguments: {}."""
    fields = _unwrapped(obj)
    call_id = fields.get("id")
    return ToolCall(
        id=valid(call_id) if isinstance(call_id, str) and call_id else f"call_{position}",
        name=valid(fields["name"]),
        arguments=_arguments_text(fields.get("arguments", fields.get("parameters", {}))),
    )


def _unreadable(raw: str, position: int, problem: str, name: str = "") -> ToolCall:
    """A call the model meant to make but wrote so that it cannot be read; never run."""
    if not name and (guessed := _NAME_FIELD.search(raw[:_KEEP])):
        name = guessed.group(1)
    return ToolCall(f"call_{position}", valid(name), valid(raw[:_KEEP]), problem)


def _marked_calls(value: object, raw: str, start: int, what: str) -> list[ToolCall]:
    """The calls of one JSON value inside call markup: an object or a list of them; each
    is a call, those without a string "name" reported as malformed."""
    items = value if isinstance(value, list) else [value]
    if not items:
        return [_unreadable(raw, start, f"the {what} holds no tool call")]
    calls = []
    for position, item in enumerate(items, start):
        if isinstance(item, dict) and isinstance(_unwrapped(item).get("name"), str):
            calls.append(_call(item, position))
        else:
            text = json.dumps(item) if len(items) > 1 else raw
            calls.append(_unreadable(text, position, f'the {what} has no string "name"'))
    return calls


def _bare_calls(values: list[object], offered: Collection[str]) -> list[ToolCall] | None:
    """The calls when every value is a bare call to an offered tool; None: an answer."""
    items = [v for item in values for v in (item if isinstance(item, list) else [item])]
    calls = [_call(item, position) for position, item in enumerate(items) if _is_bare_call(item, offered)]
    return calls if calls and len(calls) == len(items) else None


def parse_native(text: str, offered: Collection[str]) -> ContentCalls:
    """Structured tool_calls only: the content is always the model's text."""
    return _none(text)


def parse_json(text: str, offered: Collection[str]) -> ContentCalls:
    """The answer (or a Markdown fence that is all of it) starts with a call object or a
    list of them, every one naming an offered tool and carrying "arguments" (or
    "parameters"); text after it is kept as text. Anything else is the model's answer."""
    body = _unfence(text.strip())
    if not body.startswith(("{", "[")):
        return _none(text)
    found = _json_value(body)
    if found is None:
        # Not JSON, but plainly a call to an offered tool (cut by max_tokens, a brace
        # missing): report it rather than show it as the answer.
        started = _STARTS_A_CALL.match(body)
        if started and started.group(1) in offered:
            return ContentCalls([_unreadable(body, 0, "the JSON tool call is not valid JSON")], "")
        return _none(text)
    calls = _bare_calls([found[0]], offered)
    return ContentCalls(calls, _leftover([body[found[1] :]])) if calls else _none(text)


def parse_hermes(text: str, offered: Collection[str]) -> ContentCalls:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks anywhere in the
    content (Hermes 2 Pro, Qwen 2.5): each block that holds JSON is a call, whatever its
    name; unclosed (cut short) or not valid JSON, it is reported. Tags around anything
    else are prose that names them."""
    if "<tool_call>" not in text:
        return _none(text)
    calls: list[ToolCall] = []
    rest: list[str] = []
    done = 0
    for block in _HERMES_BLOCK.finditer(text):
        body, closed = block.group(1).strip(), bool(block.group(2))
        if not body.startswith(("{", "[")):
            continue  # the tags named in prose, not a call
        rest.append(text[done : block.start()])
        done = block.end()
        found = _json_value(body)
        if found is None or body[found[1] :].strip():
            calls.append(_unreadable(body, len(calls), "the <tool_call> block is not valid JSON"))
            continue
        found_calls = _marked_calls(found[0], body, len(calls), "<tool_call> block")
        if not closed:
            problem = "the <tool_call> block is not closed by </tool_call>"
            found_calls = [c if c.problem else dataclasses.replace(c, problem=problem) for c in found_calls]
        calls.extend(found_calls)
    rest.append(text[done:])
    return ContentCalls(calls, _leftover(rest)) if calls else _none(text)


def _mistral_segment(segment: str, position: int) -> tuple[list[ToolCall], str]:
    """The calls after one [TOOL_CALLS] mark, and the text after them."""
    body = segment.strip()
    if body.startswith(("[", "{")):  # before v11: a JSON list of call objects
        found = _json_value(body)
        if found is None:
            return [_unreadable(body, position, "the [TOOL_CALLS] list is not valid JSON")], ""
        return _marked_calls(found[0], body[: found[1]], position, "[TOOL_CALLS] list"), body[found[1] :]
    head = _MISTRAL_V11.match(body)  # v11+: name, maybe [CALL_ID]id, maybe [ARGS], then {...}
    if head is None:
        return [], _MISTRAL_MARK + segment  # no call follows the mark: text, as vLLM keeps it
    name, arguments = head.group(1), body[head.end() :]
    found = _json_value(arguments)
    if found is None:
        return [_unreadable(arguments, position, "the [TOOL_CALLS] arguments are not valid JSON", name)], ""
    call = ToolCall(head.group(2) or f"call_{position}", valid(name), valid(arguments[: found[1]]))
    return [call], arguments[found[1] :]


def parse_mistral(text: str, offered: Collection[str]) -> ContentCalls:
    """Mistral's `[TOOL_CALLS]` mark: before it, text; after it, `[{"name": ...,
    "arguments": {...}}, ...]` (Mistral 7B v0.3) or `name{...}` once per mark (v11+
    tokenizers; `[ARGS]` and `[CALL_ID]id` as a server may keep them). The mark is a
    special token: the server must keep special tokens for it to arrive."""
    head, mark, tail = text.partition(_MISTRAL_MARK)
    if not mark:
        return _none(text)
    calls: list[ToolCall] = []
    rest = [head]
    for segment in tail.split(_MISTRAL_MARK):
        found, after = _mistral_segment(segment, len(calls))
        calls.extend(found)
        rest.append(after)
    return ContentCalls(calls, _leftover(rest)) if calls else _none(text)


def parse_llama3_json(text: str, offered: Collection[str]) -> ContentCalls:
    """Llama 3.1's JSON calls, `{"name": ..., "parameters": {...}}`, several joined by `;`.
    After `<|python_tag|>` (there when the server keeps special tokens) they are calls
    whatever their names; without it they must start the answer, as in `json`."""
    head, tag, tail = text.partition(_PYTHON_TAG)
    if not tag:
        body = _unfence(text.strip())
        found = _json_sequence(body) if body.startswith("{") else None
        if found is None:
            return parse_json(text, offered)  # not JSON: maybe a call cut short
        calls = _bare_calls(found[0], offered)
        return ContentCalls(calls, _leftover([found[1]])) if calls else _none(text)
    body = _LLAMA_END.sub("", tail).strip()
    sequence = _json_sequence(body)
    if sequence is None:
        problem = "the text after <|python_tag|> is not a JSON tool call"
        return ContentCalls([_unreadable(body, 0, problem)], _leftover([head]))
    marked: list[ToolCall] = []
    for value in sequence[0]:
        marked.extend(_marked_calls(value, json.dumps(value), len(marked), "<|python_tag|> call"))
    return ContentCalls(marked, _leftover([head, sequence[1]]))


class _NotJSON(Exception):
    pass


def _jsonable(value: object) -> object:
    """A Python literal as JSON can carry it (tuples as lists)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NotJSON("a number JSON cannot carry")
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v) for k, v in value.items()}
    raise _NotJSON(f"a {type(value).__name__}, which JSON cannot carry")


def _pythonic_call(node: ast.Call, name: str, position: int, source: str) -> ToolCall:
    raw = (ast.get_source_segment(source, node) or name)[:_KEEP]

    def unreadable(problem: str) -> ToolCall:
        return ToolCall(f"call_{position}", valid(name), valid(raw), f"the call to {name}: {problem}")

    if node.args:
        return unreadable("arguments must be passed as name=value")
    arguments: dict[str, object] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            return unreadable("arguments must be passed as name=value, not **unpacked")
        try:
            arguments[keyword.arg] = _jsonable(ast.literal_eval(keyword.value))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return unreadable(f"argument {keyword.arg!r} is not a literal value")
        except _NotJSON as exc:
            return unreadable(f"argument {keyword.arg!r} is {exc}")
    return ToolCall(f"call_{position}", valid(name), json.dumps(arguments))


def _python_list(source: str) -> list[ast.expr] | None:
    """The elements of `source` when it is one Python list expression; None otherwise."""
    if len(source) > _MAX_PYTHONIC_CHARS:
        return None
    try:
        tree = ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    return tree.elts if isinstance(tree, ast.List) else None


def parse_pythonic(text: str, offered: Collection[str]) -> ContentCalls:
    """A Python list of calls, `[get_weather(city="Paris"), calculator(expression="2+3")]`
    (Llama 3.2, ToolACE), read with `ast`, literal arguments only: nothing is evaluated.
    Inside `<|python_start|>...<|python_end|>` (Llama 4) it is a call list whatever its
    names; without, it must be the whole answer and every name offered."""
    head, start, tail = text.partition(_PYTHON_START)
    marked = bool(start)
    inner, _, after = tail.partition(_PYTHON_END) if marked else (text, "", "")
    rest = [head, after] if marked else []
    body = _unfence(inner.strip())
    opening = _PYTHONIC_HEAD.match(body)
    first = opening.group(1) if opening else ""
    elements = _python_list(body) if opening else None
    calls = [
        (e, e.func.id) for e in elements or () if isinstance(e, ast.Call) and isinstance(e.func, ast.Name)
    ]
    if elements is None or not calls or len(calls) != len(elements):
        if marked or first in offered:  # meant as calls (cut short, broken): report it
            problem = "the Python tool-call list is not a valid list of calls"
            return ContentCalls([_unreadable(body, 0, problem, first)], _leftover(rest))
        return _none(text)
    if not marked and not all(name in offered for _, name in calls):
        return _none(text)
    found = [_pythonic_call(call, name, position, body) for position, (call, name) in enumerate(calls)]
    return ContentCalls(found, _leftover(rest))


#: The content parsers by name, as `BackendSettings.tool_parser` names them.
PARSERS: Mapping[str, ContentParser] = {
    "native": parse_native,
    "json": parse_json,
    "hermes": parse_hermes,
    "mistral": parse_mistral,
    "llama3_json": parse_llama3_json,
    "pythonic": parse_pythonic,
}


def parser_problem(spec: str) -> str:
    """Why `spec` is not a parser name or a `+` chain of them; "" when it is one."""
    names = spec.split("+")
    unknown = [n for n in names if n not in PARSERS]
    if unknown:
        return (
            f"unknown tool parser {unknown[0]!r}: one of {', '.join(PARSERS)}, or several joined"
            " by '+' and tried in order (e.g. 'hermes+json')"
        )
    if len(set(names)) != len(names):
        return f"{spec!r} names a tool parser twice"
    if "native" in names and len(names) > 1:
        return "'native' reads no calls from the content and cannot be combined with another parser"
    return ""


def parse_content_calls(text: str, parser: str, offered: Collection[str]) -> ContentCalls:
    """The tool calls written in a message's content, read by `parser` (a name in
    PARSERS, or a `+` chain of them tried in order: the first that finds a call wins),
    and the content without their markup; `([], text)` when there are none. `offered`:
    the names of the tools offered to the model, which a call without markup must name.
    Calls with a `problem` are reported, never executed."""
    for name in parser.split("+"):
        parse = PARSERS.get(name)
        if parse is None:
            raise ValueError(parser_problem(parser))
        found = parse(text, offered)
        if found.calls:
            return found
    return _none(text)
