"""The benchmark's one stage, shared by every process: what the fake backend answers,
what the service and the floor send, and what every response is checked against.

A stage: the model calls ``calculator`` with ``{"expression": "2+3"}`` (streamed as a head
delta, three argument fragments and a finish chunk), the tool runs, and the synthesis
answer is ``chunks`` words, one streamed chunk each. The shapes and the text are those of
``tests.fakes.openai_backend``'s ``stage`` scenario, so either fake can serve a run.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from toolchain_service.config import BackendSettings, Settings, ToolSettings

MODEL: Final = "fake-model"
USER_PROMPT: Final = "What is 2+3?"
TOOL_NAME: Final = "calculator"
TOOL_ARGUMENTS: Final = json.dumps({"expression": "2+3"})
TOOL_RESULT: Final[dict[str, Any]] = {"expression": "2+3", "result": 5}
CALL_ID: Final = "call_stage_calculator"
#: The argument text is streamed in this many fragments.
ARGUMENT_FRAGMENTS: Final = 3
DEFAULT_CHUNKS: Final = 20
_WORDS: Final = ("The", "calculator", "says", "2+3", "is", "5", ",", "so", "the", "answer", "is", "5", ".")

#: The stage RPCs, in table order.
RPCS: Final = ("RunTools", "RunSynthesis", "StreamTools", "StreamSynthesis")


def answer_words(chunks: int) -> list[str]:
    """The synthesis answer's streamed pieces: each word keeps its leading space."""
    words = list(itertools.islice(itertools.cycle(_WORDS), max(1, chunks)))
    return [words[0], *(" " + w for w in words[1:])]


def answer_text(chunks: int) -> str:
    return "".join(answer_words(chunks))


def argument_fragments() -> list[str]:
    """The argument text split into near-equal fragments (as the tests' fake splits it)."""
    text, n = TOOL_ARGUMENTS, ARGUMENT_FRAGMENTS
    bounds = [round(i * len(text) / n) for i in range(n + 1)]
    return [text[bounds[i] : bounds[i + 1]] for i in range(n)]


@dataclass(frozen=True, slots=True)
class Expected:
    """What one stage of a given RPC must produce."""

    rpc: str
    text: str
    #: Chunk events of the tool phase: the call's head, its fragments, the finish chunk.
    tool_chunks: int
    #: Chunk events of the synthesis phase: one per word, then the finish chunk.
    synthesis_chunks: int

    @property
    def streamed(self) -> bool:
        return self.rpc.startswith("Stream")

    @property
    def synthesis(self) -> bool:
        return self.rpc.endswith("Synthesis")

    @property
    def events(self) -> int:
        """Events of a streamed stage: chunks, one tool summary, chunks, done."""
        return self.tool_chunks + 1 + (self.synthesis_chunks if self.synthesis else 0) + 1


def expected(rpc: str, chunks: int) -> Expected:
    synthesis = rpc.endswith("Synthesis")
    return Expected(
        rpc=rpc,
        text=answer_text(chunks) if synthesis else "",
        tool_chunks=1 + ARGUMENT_FRAGMENTS + 1,
        synthesis_chunks=chunks + 1,
    )


def service_settings(
    base_url: str, max_connections: int | None = None, pace_url: str | None = None
) -> Settings:
    """Production defaults, pointed at the fake backend (as tests/conftest.make_settings);
    with `pace_url`, a second backend `pace` there (bench.realrate row B's reading streams)."""
    backend: dict[str, Any] = {"base_url": base_url, "default_model": MODEL}
    if max_connections is not None:
        backend["max_connections"] = max_connections
    backends = {"fake": BackendSettings(**backend)}
    if pace_url is not None:
        backends["pace"] = BackendSettings(**{**backend, "base_url": pace_url})
    return Settings(
        address="127.0.0.1:0",
        default_backend="fake",
        backends=backends,
        tools=ToolSettings(weather_url=f"{base_url}/weather-unused"),
        shutdown_grace=1.0,
    )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
