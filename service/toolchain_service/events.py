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


@dataclass(frozen=True, slots=True)
class PhaseOptions:
    """Resolved options of one model call (server defaults already applied)."""

    max_tokens: int
    temperature: float


@dataclass(frozen=True, slots=True)
class StageSpec:
    """A validated stage request. `synthesis` says whether phase 2 runs."""

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


@dataclass(frozen=True, slots=True)
class ToolSummaryEvent:
    results: tuple[ToolCallResult, ...]


@dataclass(slots=True)
class PhaseStats:
    model: str
    finish_reason: str = ""
    usage: Usage | None = None
    duration: float = 0.0
    retries: int = 0


@dataclass(frozen=True, slots=True)
class DoneEvent:
    tool_phase: PhaseStats
    synthesis_phase: PhaseStats | None
    text: str


@dataclass(frozen=True, slots=True)
class CancelEvent:
    reason: CancelReason
    message: str


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    error: StageError


StageEvent = ChunkEvent | ToolSummaryEvent | DoneEvent | CancelEvent | ErrorEvent
