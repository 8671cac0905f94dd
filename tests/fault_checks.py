"""What every fault scenario must leave behind: a clean end and nothing else.

`Faults` (the `faults` fixture of conftest.py) starts harnesses with settings overrides and, at the end
of the test, checks the contract of issue "every fault and every bad input ends cleanly"
for each of them:

* nothing keeps running: no stage is registered, the fake backend serves no response,
  no Misbehave tool runs, and the server loop's task count is back to its value when the
  harness started (the server runs in the test's loop, so its tasks are ours to count;
  the fake's own aiohttp tasks are left to its counters);
* no traceback, library class name, API key or secret appears in any log record at the
  server's default level, INFO (message, structured fields and exception text).

The outcome helpers check one call: a stream ends with exactly one terminal event, last,
whose code is the call's status; a unary failure carries a google.rpc.Status with
ErrorInfo (domain toolchain.v1), and RetryInfo exactly when the error is retryable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from toolchain_proto.v1 import toolchain_pb2 as pb

from tests.conftest import Harness, detail, kinds, stage, start_harness, stop_harness
from tests.fakes.openai_backend import FakeBackend

#: An API key the fake backend's settings use; it must never reach a caller or a log.
SECRET = "sk-fault-SECRET-8f3a9c1e5d7b"
SECRET_ENV = "TOOLCHAIN_TEST_FAULTS_API_KEY"

#: Text that betrays internals: tracebacks, library and exception class names.
FORBIDDEN = (
    "Traceback",
    'File "',
    "httpx",
    "httpcore",
    "anyio",
    "aiohttp",
    "openai.",
    "AsyncOpenAI",
    "APIConnectionError",
    "APITimeoutError",
    "APIStatusError",
    "ConnectError",
    "RemoteProtocolError",
    "ReadTimeout",
    "DecodeError",
    "UnicodeDecodeError",
    "UnicodeEncodeError",
    "JSONDecodeError",
    "<class '",
    "Unexpected <",
    SECRET,
)

TERMINAL = ("done", "cancel", "error")


def assert_clean_text(text: str, where: str = "text") -> None:
    leaked = [word for word in FORBIDDEN if word in text]
    assert not leaked, f"{where} leaks {leaked}: {text!r}"


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - polling server state a client cannot subscribe to
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"not settled within {timeout}s: {what}") from None


def _name(task: asyncio.Task[Any]) -> str:
    return str(getattr(task.get_coro(), "__qualname__", task.get_name()))


def _is_fake_backends(task: asyncio.Task[Any]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and f"{os.sep}aiohttp{os.sep}" in code.co_filename


def server_tasks() -> Counter[str]:
    """The loop's tasks by name, except the caller's own and the fake backend's (aiohttp
    keeps one per keep-alive connection; the fake's counters account for them)."""
    me = asyncio.current_task()
    return Counter(_name(t) for t in asyncio.all_tasks() if t is not me and not _is_fake_backends(t))


@dataclass
class Watched:
    harness: Harness
    baseline: Counter[str]


@dataclass
class Faults:
    fake: FakeBackend
    caplog: pytest.LogCaptureFixture
    watched: list[Watched] = field(default_factory=list)

    async def start(self, **overrides: Any) -> Harness:
        """A harness whose backend uses the SECRET key; `backend={...}` overrides merge."""
        backend = {"api_key_env": SECRET_ENV, **overrides.pop("backend", {})}
        h = await start_harness(self.fake, backend=backend, **overrides)
        self.watched.append(Watched(h, server_tasks()))
        return h

    async def settled(self, h: Harness, timeout: float = 5.0) -> None:
        """Wait until the call that just ended left nothing running."""
        (watched,) = [w for w in self.watched if w.harness is h]
        await wait_for(lambda: len(h.server.stages) == 0, "stages still registered", timeout)
        await wait_for(lambda: h.fake.active_responses == 0, "backend responses still open", timeout)
        await wait_for(lambda: h.misbehave.running == 0, "tools still running", timeout)
        baseline = watched.baseline.total()
        try:
            await wait_for(lambda: server_tasks().total() <= baseline, "tasks", timeout)
        except AssertionError:
            extra = server_tasks() - watched.baseline
            raise AssertionError(f"tasks left running: {dict(extra)}") from None

    def assert_logs_clean(self) -> None:
        records = [*self.caplog.get_records("setup"), *self.caplog.get_records("call"), *self.caplog.records]
        for record in records:
            text = record.getMessage()
            fields = getattr(record, "toolchain_fields", None)
            if fields:
                text += " " + json.dumps(fields, default=str)
            if record.exc_info or record.exc_text or record.stack_info:
                text += " Traceback (exc_info attached)"
            assert_clean_text(text, f"log record {record.name}:{record.levelname}")

    async def close(self) -> None:
        try:
            for watched in self.watched:
                await self.settled(watched.harness)
            self.assert_logs_clean()
        finally:
            for watched in self.watched:
                await stop_harness(watched.harness)


@asynccontextmanager
async def open_faults(
    fake: FakeBackend, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Faults]:
    """The `faults` fixture (conftest.py): the checks run when the test ends."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    caplog.set_level(logging.INFO)
    f = Faults(fake, caplog)
    yield f
    await f.close()


# -- one call's outcome ---------------------------------------------------------------


@dataclass
class Outcome:
    """How one call ended, unary or streamed, in one shape."""

    code: grpc.StatusCode
    message: str = ""
    status: status_pb2.Status | None = None
    events: list[pb.StageEvent] = field(default_factory=list)
    response: Any = None

    @property
    def error(self) -> pb.StageError:
        assert self.events, "a unary call has no events"
        return self.events[-1].error

    @property
    def done(self) -> pb.Done:
        if self.events:
            return self.events[-1].done
        raise AssertionError("a unary call has no Done event")

    def summary(self) -> list[pb.ToolCallResult]:
        if self.response is not None:
            return list(self.response.tool_results)
        found = [e.tool_summary for e in self.events if e.HasField("tool_summary")]
        assert len(found) == 1, kinds(self.events)
        return list(found[0].results)


def status_of(err: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    trailers: Any = err.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return None


async def unary(h: Harness, request: pb.StageRequest, *, synthesis: bool = False, **kw: Any) -> Outcome:
    try:
        if synthesis:
            response: Any = await h.stub.RunSynthesis(pb.RunSynthesisRequest(stage=request), **kw)
        else:
            response = await h.stub.RunTools(pb.RunToolsRequest(stage=request), **kw)
    except grpc.aio.AioRpcError as err:
        outcome = Outcome(err.code(), err.details() or "", status_of(err))
        assert_clean_text(outcome.message, "status message")
        return outcome
    return Outcome(grpc.StatusCode.OK, response=response)


async def streamed(h: Harness, request: pb.StageRequest, *, synthesis: bool = False, **kw: Any) -> Outcome:
    if synthesis:
        call: Any = h.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=request), **kw)
    else:
        call = h.stub.StreamTools(pb.StreamToolsRequest(stage=request), **kw)
    events: list[pb.StageEvent] = []
    try:
        async for response in call:
            events.append(response.event)
    except asyncio.CancelledError:
        call.cancel()  # a client that gives up cancels its call (grpc does not always do it for it)
        raise
    except grpc.aio.AioRpcError as err:
        outcome = Outcome(err.code(), err.details() or "", status_of(err), events)
    else:
        outcome = Outcome(await call.code(), "", None, events)
    assert_stream_ended(outcome)
    return outcome


async def run(h: Harness, mode: str, request: pb.StageRequest | None = None, **kw: Any) -> Outcome:
    """One stage call in `mode` ("unary" or "stream")."""
    request = request if request is not None else stage()
    return await (unary if mode == "unary" else streamed)(h, request, **kw)


def assert_stream_ended(outcome: Outcome) -> None:
    """Exactly one terminal event, last, matching the status; sequences without gaps."""
    events = outcome.events
    order = kinds(events)
    assert [e.sequence for e in events] == list(range(len(events))), order
    terminals = [k for k in order if k in TERMINAL]
    if outcome.code == grpc.StatusCode.CANCELLED and not terminals:
        return  # the client cancelled: it does not read what follows
    if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED and not terminals:
        return  # the client's own deadline ended the call before the Cancel event arrived
    assert len(terminals) == 1 and order[-1] in TERMINAL, order
    last = events[-1]
    if outcome.code == grpc.StatusCode.OK:
        assert order[-1] == "done", order
    elif order[-1] == "error":
        assert last.error.code == outcome.code.value[0], (last.error, outcome.code)
        assert last.error.message == outcome.message
        assert_clean_text(last.error.message, "error event")
    else:
        assert order[-1] == "cancel", order
        assert outcome.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


def assert_failed(
    outcome: Outcome,
    code: grpc.StatusCode,
    reason: str,
    *,
    retryable: bool,
    message: str = "",
    retry_delay: float | None = None,
) -> None:
    """The call failed with `code` and `reason`, in the form its kind of call reports."""
    assert outcome.code == code, (outcome.code, outcome.message)
    assert message.lower() in outcome.message.lower(), outcome.message
    assert_clean_text(outcome.message, "status message")
    if outcome.events:
        error = outcome.error
        assert (error.reason, error.retryable) == (reason, retryable), error
        if retry_delay is not None:
            assert abs(error.retry_delay.ToTimedelta().total_seconds() - retry_delay) < 1.5
    assert outcome.status is not None, "no google.rpc.Status in the trailers"
    assert outcome.status.code == code.value[0]
    info = detail(outcome.status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == (reason, "toolchain.v1")
    retry_infos = [d for d in outcome.status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert bool(retry_infos) == retryable, outcome.status
    if retry_delay is not None:
        delay = detail(outcome.status, error_details_pb2.RetryInfo).retry_delay
        assert abs(delay.ToTimedelta().total_seconds() - retry_delay) < 1.5


def violations(outcome: Outcome) -> dict[str, str]:
    assert outcome.status is not None
    bad = detail(outcome.status, error_details_pb2.BadRequest)
    return {v.field: v.description for v in bad.field_violations}
