"""The stage's domain types: what a stage is asked to do and the events it yields.

Plain slotted dataclasses, free of grpc and protobuf; `transport/convert.py` maps them to
the toolchain.v1 messages. Enum values equal the proto enum numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolchain_service.errors import StageError


class Phase(enum.IntEnum):
    UNSPECIFIED = 0
    TOOL = 1
    SYNTHESIS = 2


class ToolOutcome(enum.IntEnum):
    UNSPECIFIED = 0
    OK = 1
    INVALID_ARGUMENTS = 2
    UNKNOWN_TOOL = 3
    FAILED = 4
    TIMED_OUT = 5
    SKIPPED = 6


class CancelReason(enum.IntEnum):
    UNSPECIFIED = 0
    CLIENT = 1
    CANCEL_STAGE = 2
    DEADLINE = 3
    SHUTDOWN = 4
    DISCONNECTED = 5
    READER_STALLED = 6


@dataclass(frozen=True, slots=True)
class PhaseOptions:
    """Resolved options of one model call (server defaults already applied)."""

    max_tokens: int
    temperature: float


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """What the model must do about tools in a stage's first round: `mode` "auto",
    "required" or "none", or "tool" with the one `tool` it must call."""

    mode: str = "auto"
    tool: str = ""


@dataclass(frozen=True, slots=True)
class StageSpec:
    """A validated stage request. `synthesis` says whether phase 2 runs; the tool phase
    has up to `max_rounds` rounds."""

    stage_id: str
    system_prompt: str
    user_prompt: str
    backend: str
    model: str
    tool_phase: PhaseOptions
    synthesis_phase: PhaseOptions
    tools: tuple[str, ...]
    synthesis: bool
    stream: bool
    max_rounds: int = 1
    tool_choice: ToolChoice = ToolChoice()
    repair: bool = False


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of a streamed tool call; id and name only on a call's first fragment."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class ChunkEvent:
    phase: Phase
    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    finish_reason: str = ""
    #: The tool round (from 1); for the synthesis phase, the last tool round plus one.
    round: int = 1


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A whole tool call as the model made it (arguments still unparsed text)."""

    id: str
    name: str
    arguments: str
    #: Why the call is malformed (conflicting deltas, unparsable block); "" when well-formed.
    problem: str = ""


@dataclass(frozen=True, slots=True)
class ToolCallResult:
    call: ToolCall
    outcome: ToolOutcome
    result: Any = None
    error: str = ""
    duration: float = 0.0
    #: The output was over the size cap: `result` is the start of its JSON text, marked.
    truncated: bool = False
    #: The tool round of the call, from 1 (the runner sets it).
    round: int = 1


@dataclass(frozen=True, slots=True)
class ToolSummaryEvent:
    results: tuple[ToolCallResult, ...]
    round: int = 1


@dataclass(slots=True)
class PhaseStats:
    model: str
    finish_reason: str = ""
    usage: Usage | None = None
    duration: float = 0.0
    retries: int = 0
    #: The tool round these are of, from 1; 0 for a whole phase.
    round: int = 0


def add_usage(a: Usage | None, b: Usage | None) -> Usage | None:
    """The sum of two reported usages; None when neither was reported."""
    if a is None or b is None:
        return a or b
    return Usage(
        a.prompt_tokens + b.prompt_tokens,
        a.completion_tokens + b.completion_tokens,
        a.total_tokens + b.total_tokens,
    )


def combined(rounds: list[PhaseStats]) -> PhaseStats:
    """The tool phase's statistics from its rounds': one round's own (as round 0), or
    usage, duration and retries summed with the last round's finish reason."""
    last = rounds[-1]
    usage: Usage | None = None
    for stats in rounds:
        usage = add_usage(usage, stats.usage)
    return PhaseStats(
        model=last.model,
        finish_reason=last.finish_reason,
        usage=usage,
        duration=sum(s.duration for s in rounds),
        retries=sum(s.retries for s in rounds),
    )


@dataclass(frozen=True, slots=True)
class DoneEvent:
    tool_phase: PhaseStats
    synthesis_phase: PhaseStats | None
    text: str
    #: Each tool round's statistics, in order (one entry for a one-round stage).
    tool_rounds: tuple[PhaseStats, ...] = ()
    #: The last allowed round still made tool calls.
    rounds_exhausted: bool = False

    @property
    def total_usage(self) -> Usage | None:
        usage = self.tool_phase.usage
        if self.synthesis_phase is not None:
            usage = add_usage(usage, self.synthesis_phase.usage)
        return usage


@dataclass(frozen=True, slots=True)
class CancelEvent:
    reason: CancelReason
    message: str


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    error: StageError


StageEvent = ChunkEvent | ToolSummaryEvent | DoneEvent | CancelEvent | ErrorEvent
