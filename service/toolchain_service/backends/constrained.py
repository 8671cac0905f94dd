"""Tool calls by construction: a grammar that only admits a valid call or plain text.

A backend that can constrain its sampler with a JSON schema (llama.cpp's server turns
`response_format.json_schema` into a GBNF grammar) gets, in the tool phase, the ENVELOPE
schema instead of OpenAI `tools`:

    anyOf: [ {"name": const "<tool>", "arguments": <that tool's argument schema>}, ...,
             "<a JSON string: the plain-text answer>" ]

so the model's answer is, token by token, either a call whose name is an enabled tool and
whose arguments match its schema, or a JSON string that is the text answer. A small model
never writes a half call, an unknown tool or a misspelt key. `EnvelopeDecoder` turns that
output, streamed or whole, back into what any backend would send: content deltas for the
text (decoded as it arrives) and one tool-call delta stream for a call (the name as soon as
it is complete, the arguments as they are written).

Grammars do not bound fractional numbers: a schema `number` with `minimum`/`maximum`
becomes an `integer` with the same bounds in the grammar (llama.cpp bounds integers), so
what the model writes still validates; a tool whose arguments have cross-field rules
(`get_weather`: a city, or latitude and longitude) gives its own `grammar_schema()`.

The prompt (`tool_phase_messages`) lists each tool on one line and shows worked examples
(a text answer, each tool's example call, another text answer) as chat turns: about 200
tokens with the three shipped tools, against ~1,270 for the generic instructions with full
JSON schemas. The grammar, not the prompt, keeps the output well formed; the examples
are there because a 135M model copies a worked example far better than it follows a
description.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from toolchain_service.backends.base import ToolHint
from toolchain_service.events import ToolCallDelta

_NAME_KEY = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def grammar_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` as a grammar can enforce it: bounded numbers become bounded integers,
    optional properties lose their `null` alternative (leaving one out means the same),
    titles and descriptions go (they cost grammar size, not correctness)."""
    simplified: dict[str, Any] = _simplify(schema, top=True)
    return simplified


def _simplify(node: Any, top: bool = False) -> Any:
    if isinstance(node, list):
        return [_simplify(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "description", "default", "examples"):
            continue
        if key == "properties" and isinstance(value, dict):
            required = set(node.get("required", ()))
            out[key] = {
                name: _simplify(_drop_null(prop) if name not in required else prop)
                for name, prop in value.items()
            }
        elif key in ("$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: _simplify(sub) for name, sub in value.items()}
        else:
            out[key] = _simplify(value)
    if out.get("type") == "number" and ("minimum" in out or "maximum" in out):
        out["type"] = "integer"
        if "minimum" in out:
            out["minimum"] = math.ceil(out["minimum"])
        if "maximum" in out:
            out["maximum"] = math.floor(out["maximum"])
    if top and out.get("type") == "object":
        out.setdefault("additionalProperties", False)
    return out


def _drop_null(prop: Any) -> Any:
    """An optional `X | None` property as just X."""
    if not isinstance(prop, dict):
        return prop
    options = prop.get("anyOf")
    if isinstance(options, list):
        kept = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
        if len(kept) == 1 and len(kept) < len(options):
            rest = {k: v for k, v in prop.items() if k != "anyOf"}
            return {**rest, **kept[0]}
    return prop


@dataclass(frozen=True, slots=True)
class ToolSchema:
    """What the envelope and the prompt need of one enabled tool."""

    name: str
    description: str
    parameters: dict[str, Any]
    grammar: dict[str, Any]
    example_prompt: str = ""
    example_arguments: dict[str, Any] | None = None


def tool_schemas(
    specs: Iterable[dict[str, Any]], hints: Mapping[str, ToolHint] | None = None
) -> list[ToolSchema]:
    """From OpenAI `tools` entries and the tools' hints (by name): a tool without its own
    grammar schema gets one derived from its parameters."""
    out = []
    for spec in specs:
        function = spec.get("function", {})
        name = str(function.get("name", ""))
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        hint = (hints or {}).get(name) or ToolHint()
        out.append(
            ToolSchema(
                name=name,
                description=str(function.get("description", "")),
                parameters=parameters,
                grammar=hint.grammar if hint.grammar is not None else grammar_schema(parameters),
                example_prompt=hint.example_prompt,
                example_arguments=hint.example_arguments,
            )
        )
    return out


def envelope_schema(tools: list[ToolSchema], *, text: bool = True) -> dict[str, Any]:
    """A call of one of `tools` or, with `text`, a JSON string (the text answer)."""
    options: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.grammar},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    if text:
        options.append({"type": "string"})
    return {"anyOf": options}


def _type_of(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "|".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    kind = prop.get("type")
    if isinstance(kind, str):
        return kind
    options = prop.get("anyOf")
    if isinstance(options, list):
        return "|".join(_type_of(o) for o in options if isinstance(o, dict) and o.get("type") != "null")
    return "value"


def _first_sentence(text: str) -> str:
    sentence = text.strip().split(". ", 1)[0].strip()
    return sentence if sentence.endswith(".") else f"{sentence}."


#: Worked examples of answering without a tool, around the tools' own examples, so the
#: model sees both kinds of answer (and does not call a tool for everything).
TEXT_EXAMPLES = (
    ("Hi there!", "Hello! How can I help you today?"),
    ("Thank you, that is all.", "You are welcome! Have a nice day."),
)


def compact_instructions(tools: list[ToolSchema]) -> str:
    """One line per tool (its signature when it has no worked example), then how to answer."""
    lines = ["You can use these tools:"]
    for tool in tools:
        if tool.example_arguments is not None:
            lines.append(f"- {tool.name}: {_first_sentence(tool.description)}")
            continue
        props = tool.parameters.get("properties") or {}
        required = set(tool.parameters.get("required", ()))
        args = ", ".join(
            f"{name}{'' if name in required else '?'}: {_type_of(prop)}" for name, prop in props.items()
        )
        lines.append(
            f'- {tool.name}: {_first_sentence(tool.description)} Call: {{"name": "{tool.name}", '
            f'"arguments": {{{args}}}}}'
        )
    lines.append(
        "To use a tool, reply with its JSON call. Otherwise reply with your answer as a JSON string."
    )
    return "\n".join(lines)


def worked_examples(tools: list[ToolSchema]) -> list[dict[str, Any]]:
    """Example turns: a text answer, each tool's example call, another text answer.
    Small models copy a worked example far better than they follow a description."""
    turns: list[dict[str, Any]] = []

    def text(question: str, answer: str) -> None:
        turns.append({"role": "user", "content": question})
        turns.append({"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)})

    text(*TEXT_EXAMPLES[0])
    for tool in tools:
        if tool.example_arguments is not None and tool.example_prompt:
            call = {"name": tool.name, "arguments": tool.example_arguments}
            turns.append({"role": "user", "content": tool.example_prompt})
            turns.append({"role": "assistant", "content": json.dumps(call, ensure_ascii=False)})
    text(*TEXT_EXAMPLES[1])
    return turns


def tool_phase_messages(messages: list[dict[str, Any]], tools: list[ToolSchema]) -> list[dict[str, Any]]:
    """The conversation with the tool instructions in the system message and the worked
    examples before the caller's first user turn."""
    instructions = compact_instructions(tools)
    rest = list(messages)
    system = ""
    if rest and rest[0].get("role") == "system":
        system = str(rest.pop(0).get("content") or "")
    head = {"role": "system", "content": f"{system}\n\n{instructions}" if system else instructions}
    return [head, *worked_examples(tools), *rest]


class EnvelopeDecoder:
    """Turns the envelope, fed in pieces, into content and tool-call deltas.

    Text mode (the output starts with `"`): the JSON string is decoded as it arrives,
    holding back only an escape sequence cut in two. Call mode (`{`): once the name is
    complete one delta carries the call id and name, then the arguments stream as
    written, holding back the closing brace of the envelope (and white space) until it
    is certain whose it is, so that the pieces concatenate to exactly the arguments."""

    __slots__ = ("_args_at", "_emitted", "_mode", "_raw", "_text_done")

    def __init__(self) -> None:
        self._raw = ""
        self._mode = ""  # "" undecided, "text", "call", "other"
        self._emitted = 0  # text mode: raw chars decoded; call mode: argument chars sent
        self._text_done = False
        self._args_at = -1

    def feed(self, piece: str) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """New content and tool-call deltas that `piece` completes."""
        self._raw += piece
        return self._advance(final=False)

    def finish(self) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """What is left once the output ended (cut by max_tokens included)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, tuple[ToolCallDelta, ...]]:
        if not self._mode:
            stripped = self._raw.lstrip()
            if not stripped:
                return "", ()
            self._mode = {'"': "text", "{": "call"}.get(stripped[0], "other")
            if self._mode == "text":
                self._emitted = len(self._raw) - len(stripped) + 1  # past the opening quote
            elif self._mode == "other":
                self._emitted = len(self._raw) - len(stripped)
        if self._mode == "text":
            return self._advance_text(final), ()
        if self._mode == "call":
            return "", tuple(self._advance_call(final))
        # Not the envelope (a backend that ignored the grammar): pass it through as text.
        text, self._emitted = self._raw[self._emitted :], len(self._raw)
        return text, ()

    def _advance_text(self, final: bool) -> str:
        if self._text_done:
            return ""
        start = self._emitted
        i, raw, end = start, self._raw, len(self._raw)
        safe = start
        while i < end:
            char = raw[i]
            if char == '"':
                self._text_done = True
                safe = i
                break
            if char == "\\":
                width = _escape_width(raw, i)
                if width == 0:  # cut in two: wait for the rest
                    break
                i += width
            else:
                i += 1
            safe = i
        segment = raw[start:safe]
        self._emitted = safe + (1 if self._text_done else 0)
        if final and not self._text_done and self._emitted < end:
            segment += raw[safe:]  # a cut escape at the very end stays as written
            self._emitted = end
        return _decode_string(segment)

    def _advance_call(self, final: bool) -> Iterator[ToolCallDelta]:
        """Arguments are what follows `"arguments":`, less the envelope's closing brace;
        braces outside strings say whose a closing brace is."""
        if self._args_at < 0:
            match = _NAME_KEY.match(self._raw)
            if match is None:
                if final:  # cut before the arguments began: a call without arguments
                    yield ToolCallDelta(0, self._new_id(), _decode_string(_name_so_far(self._raw)), "")
                return
            self._args_at = match.end()
            yield ToolCallDelta(0, self._new_id(), _decode_string(match.group(1)), "")
        candidate = self._raw[self._args_at :]
        if not self._emitted:  # white space before the arguments is the envelope's
            lead = len(candidate) - len(candidate.lstrip())
            self._args_at += lead
            candidate = candidate[lead:]
        safe = candidate.rstrip()
        if safe.endswith("}") and not _closes_inside(safe):
            safe = safe[:-1].rstrip()  # the envelope's own closing brace
        if len(safe) > self._emitted:
            piece, self._emitted = safe[self._emitted :], len(safe)
            yield ToolCallDelta(0, "", "", piece)

    @staticmethod
    def _new_id() -> str:
        return f"call_{uuid.uuid4().hex[:24]}"


def _closes_inside(text: str) -> bool:
    """Whether the last `}` of `text` (the arguments so far) still belongs to them: it
    does while braces outside strings are unbalanced before it."""
    depth, in_string, escaped = 0, False, False
    for char in text[:-1]:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
    return depth > 0


def _name_so_far(raw: str) -> str:
    match = re.match(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)', raw)
    return match.group(1) if match else ""


def _escape_width(raw: str, at: int) -> int:
    """Length of the escape sequence at `at` (0: not complete yet). A high surrogate
    waits for its low half, so a pair is never decoded apart."""
    if at + 1 >= len(raw):
        return 0
    if raw[at + 1] != "u":
        return 2
    if at + 6 > len(raw):
        return 0
    code = int(raw[at + 2 : at + 6], 16) if re.fullmatch(r"[0-9a-fA-F]{4}", raw[at + 2 : at + 6]) else -1
    if 0xD800 <= code <= 0xDBFF:
        if at + 12 > len(raw):
            return 0
        if raw[at + 6 : at + 8] == "\\u":
            return 12
    return 6


def _decode_string(segment: str) -> str:
    if not segment:
        return ""
    try:
        value = json.loads(f'"{segment}"')
    except ValueError:
        return segment
    return value if isinstance(value, str) else segment
