"""What the runner needs from a model backend, in backend-neutral types.

A backend turns a `ChatRequest` into either one `Completion` (unstreamed) or a stream of
`ModelDelta`s, and declares its `Capabilities` so the runner can adapt instead of
failing: llama.cpp, for instance, refuses a streamed `tool_choice="auto"`, so the runner
asks it for the tool phase unstreamed and replays the result as chunks.
Every failure is raised as a `toolchain_service.errors.BackendError`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from toolchain_service.events import ToolCall, ToolCallDelta, Usage


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; the runner picks the call style from these."""

    #: Streams a completion whose request has tools and tool_choice="auto".
    streams_tool_calls: bool = True
    #: Renders the tools into its own (compact) prompt and constrains the answer to a
    #: valid call or plain text (the embedded model): the runner adds no generic tool
    #: instructions and reads no calls out of the text.
    constrains_tool_calls: bool = False
    #: Honours tool_choice "required" and a named function. Without it the runner asks
    #: with "auto" (a named choice still offers only that tool).
    forces_tool_choice: bool = True


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of transient failures (BackendUnavailable) before any output was sent."""

    max_retries: int = 2
    initial_backoff: float = 0.2
    max_backoff: float = 2.0


@dataclass(frozen=True, slots=True)
class ToolHint:
    """What a tool offers a backend that writes its own tool prompt and grammar."""

    #: A schema a grammar can enforce that admits only arguments passing validation,
    #: where the parameters schema does not (rules across fields); None: derive it.
    grammar: dict[str, Any] | None = None
    #: An example exchange: a user's question and the arguments that answer it.
    example_prompt: str = ""
    example_arguments: dict[str, Any] | None = None


@dataclass(slots=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float
    tools: list[dict[str, Any]] | None = None
    #: Seconds the whole backend call may take (already capped by the caller's deadline).
    timeout: float | None = None
    #: Per tool name, what a backend that constrains tool calls can use besides the spec.
    tool_hints: dict[str, ToolHint] | None = None
    #: Extra JSON fields of this request's body (e.g. a response_format grammar).
    extra: dict[str, Any] | None = None
    #: With tools: "auto", "required", or the one tool's name the model must call (the
    #: runner then offers only that tool). "none" never reaches a backend: no tools are sent.
    tool_choice: str = "auto"


@dataclass(frozen=True, slots=True)
class ModelDelta:
    """One streamed piece of a completion. Tool-call deltas are raw: ids and names may
    repeat in every delta, as some servers send them."""

    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    finish_reason: str = ""
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str = ""
    usage: Usage | None = None


@dataclass(slots=True)
class BackendInfo:
    name: str
    kind: str
    default_model: str
    models: tuple[str, ...] = field(default=())
    #: How tool calls written in the content are read (`toolcalls.PARSERS`, or a `+`
    #: chain of them); "native": only structured tool_calls are calls.
    tool_parser: str = "native"


class ChatBackend(abc.ABC):
    """A named model backend, shared by every stage for the process's life."""

    def __init__(self, info: BackendInfo, capabilities: Capabilities, retry: RetryPolicy) -> None:
        self.info = info
        self.capabilities = capabilities
        self.retry = retry
        #: Called (on the event loop) when `is_ready()` may have changed.
        self.state_listeners: list[Callable[[], None]] = []

    def notify_state(self) -> None:
        for listener in list(self.state_listeners):
            listener()

    @property
    def name(self) -> str:
        return self.info.name

    @abc.abstractmethod
    async def complete(self, request: ChatRequest) -> Completion:
        """One unstreamed chat completion."""

    @abc.abstractmethod
    def stream(self, request: ChatRequest) -> AsyncGenerator[ModelDelta, None]:
        """A streamed chat completion. Closing the iterator (aclose) closes the upstream
        request at once; so does cancelling the task that iterates it."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare (load a model, open pools). Called once at server start."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what `start` and the calls opened."""

    def is_ready(self) -> bool:
        """Whether the backend can serve now (used by the health service)."""
        return True
