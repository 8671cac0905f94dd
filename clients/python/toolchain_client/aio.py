"""The asyncio client of toolchain.v1, and the pieces the sync client shares with it.

`ToolchainClient` wraps the generated stub: one method per RPC, keyword arguments instead
of nested request messages, a default per-call timeout and metadata. gRPC failures
propagate as `grpc.aio.AioRpcError` (`grpc.RpcError` in the sync client); `error_details`
decodes the `google.rpc.Status` the server puts in the trailers (ErrorInfo reason,
BadRequest field violations, RetryInfo delay).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from toolchain_client.credentials import token_metadata

__all__ = [
    "ErrorDetails",
    "PhaseOptions",
    "ToolchainClient",
    "build_stage",
    "error_details",
    "status_code_name",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"

_RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_CODES_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode with this numeric value (UNKNOWN for values gRPC does not define)."""
    return _CODES_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def status_code_name(value: int) -> str:
    """`UNAVAILABLE` for 14; `CODE_<n>` for values gRPC does not define."""
    code = _CODES_BY_VALUE.get(value)
    return code.name if code is not None else f"CODE_{value}"


# --- requests -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PhaseOptions:
    """Options of one phase; None leaves the server's default."""

    max_tokens: int | None = None
    temperature: float | None = None

    def to_proto(self) -> pb.PhaseOptions:
        options = pb.PhaseOptions()
        if self.max_tokens is not None:
            options.max_tokens = self.max_tokens
        if self.temperature is not None:
            options.temperature = self.temperature
        return options


def _phase(options: PhaseOptions | pb.PhaseOptions | None) -> pb.PhaseOptions | None:
    if options is None:
        return None
    if isinstance(options, pb.PhaseOptions):
        return options
    return options.to_proto()


def build_stage(
    user_prompt: str,
    *,
    system_prompt: str = "",
    stage_id: str = "",
    model: str = "",
    backend: str = "",
    tools: Iterable[str] = (),
    tool_phase: PhaseOptions | pb.PhaseOptions | None = None,
    synthesis_phase: PhaseOptions | pb.PhaseOptions | None = None,
    max_rounds: int | None = None,
    tool_choice: str | pb.ToolChoice | None = None,
    repair_invalid_calls: bool = False,
) -> pb.StageRequest:
    """The StageRequest all four stage RPCs carry. Phase options and max_rounds are set
    only when given; `tool_choice` is "auto", "required", "none" or a pb.ToolChoice (e.g.
    `pb.ToolChoice(tool="calculator")` for one named tool)."""
    stage = pb.StageRequest(
        stage_id=stage_id,
        system_prompt=system_prompt,
        user_prompt=user_prompt,
        model=model,
        backend=backend,
        tools=list(tools),
        repair_invalid_calls=repair_invalid_calls,
    )
    if max_rounds is not None:
        stage.max_rounds = max_rounds
    if isinstance(tool_choice, pb.ToolChoice):
        stage.tool_choice.CopyFrom(tool_choice)
    elif tool_choice is not None:
        modes = {
            "auto": pb.TOOL_CHOICE_MODE_AUTO,
            "required": pb.TOOL_CHOICE_MODE_REQUIRED,
            "none": pb.TOOL_CHOICE_MODE_NONE,
        }
        if tool_choice not in modes:
            raise ValueError(
                f"tool_choice must be auto, required, none or a pb.ToolChoice, not {tool_choice!r}"
            )
        stage.tool_choice.mode = modes[tool_choice]
    tool_options = _phase(tool_phase)
    if tool_options is not None:
        stage.tool_phase.CopyFrom(tool_options)
    synthesis_options = _phase(synthesis_phase)
    if synthesis_options is not None:
        stage.synthesis_phase.CopyFrom(synthesis_options)
    return stage


# --- errors ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """A failed call's status with the server's google.rpc details decoded."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    retry_delay: float | None = None

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again can help: the server attaches RetryInfo
        exactly then; without it, UNAVAILABLE and RESOURCE_EXHAUSTED (e.g. a client-side
        connection failure) count as retryable."""
        return self.retry_delay is not None or self.code in _RETRYABLE_CODES

    def to_event(self) -> pb.StageError:
        """The same failure as a stream's Error event (for rendering with format_error)."""
        error = pb.StageError(
            code=self.code.value[0], message=self.message, retryable=self.retryable, reason=self.reason
        )
        if self.retry_delay is not None:
            error.retry_delay.FromNanoseconds(round(self.retry_delay * 1e9))
        return error


def _status_from_metadata(metadata: Iterable[Any] | None) -> status_pb2.Status | None:
    """The status in a trailer: sync calls give (key, value) named tuples, asyncio calls
    a grpc.aio.Metadata that iterates as (key, value) pairs."""
    for key, value in metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def _rich_status(err: grpc.RpcError) -> status_pb2.Status | None:
    if isinstance(err, grpc.Call):
        try:
            status = rpc_status.from_call(err)
        except ValueError:  # code or message differ from the trailer's: trust the trailer
            status = None
        if isinstance(status, status_pb2.Status):
            return status
    try:
        metadata = err.trailing_metadata()
    except Exception:  # an RpcError that is no call (e.g. raised by hand) has no trailers
        return None
    return _status_from_metadata(metadata)


def error_details(err: grpc.RpcError) -> ErrorDetails:
    """Decode the google.rpc.Status in a failed call's trailers (sync or asyncio errors).

    Without a status trailer (e.g. the server is unreachable) the result carries just the
    call's code and message.
    """
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (err.details() if callable(getattr(err, "details", None)) else None) or str(err)
    status = _rich_status(err)
    if status is None:
        return ErrorDetails(code=code, message=message)
    reason = ""
    violations: list[tuple[str, str]] = []
    retry_delay: float | None = None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            reason = info.reason
        elif detail.Is(bad_request.DESCRIPTOR) and detail.Unpack(bad_request):
            violations.extend((v.field, v.description) for v in bad_request.field_violations)
        elif detail.Is(retry.DESCRIPTOR) and detail.Unpack(retry):
            retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
    return ErrorDetails(
        code=status_code(status.code),
        message=status.message or message,
        reason=reason,
        field_violations=violations,
        retry_delay=retry_delay,
    )


# --- the client -----------------------------------------------------------------------


class ToolchainClient:
    """Asyncio client of ToolchainService.

    Give it a target ("host:port") and it opens an insecure channel (a secure one with
    `credentials`) that `close()` / `async with` closes; or pass your own `channel`, which
    it leaves open. `metadata` goes with every call, and `token` as a bearer token
    (`credentials.tls_credentials` makes TLS credentials); `timeout` is the default deadline in
    seconds of every call (None: no deadline), overridable per call.
    """

    def __init__(
        self,
        target: str,
        *,
        channel: grpc.aio.Channel | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self._owns_channel = channel is None
        if channel is None:
            if credentials is None:
                channel = grpc.aio.insecure_channel(target)
            else:
                channel = grpc.aio.secure_channel(target, credentials)
        self.channel = channel
        self._stub = pb_grpc.ToolchainServiceStub(channel)
        self._metadata = (*metadata, *token_metadata(token))
        self._timeout = timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel if this client opened it (cancels calls still running)."""
        if self._owns_channel:
            await self.channel.close(None)

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    async def run_tools(
        self,
        user_prompt: str,
        *,
        system_prompt: str = "",
        stage_id: str = "",
        model: str = "",
        backend: str = "",
        tools: Iterable[str] = (),
        tool_phase: PhaseOptions | pb.PhaseOptions | None = None,
        synthesis_phase: PhaseOptions | pb.PhaseOptions | None = None,
        max_rounds: int | None = None,
        tool_choice: str | pb.ToolChoice | None = None,
        repair_invalid_calls: bool = False,
        timeout: float | None = None,
    ) -> pb.RunToolsResponse:
        """RunTools: the tool phase only; the tool results in one response."""
        stage = build_stage(
            user_prompt,
            system_prompt=system_prompt,
            stage_id=stage_id,
            model=model,
            backend=backend,
            tools=tools,
            tool_phase=tool_phase,
            synthesis_phase=synthesis_phase,
            max_rounds=max_rounds,
            tool_choice=tool_choice,
            repair_invalid_calls=repair_invalid_calls,
        )
        return await self._stub.RunTools(
            pb.RunToolsRequest(stage=stage), timeout=self._deadline(timeout), metadata=self._metadata
        )

    async def run_synthesis(
        self,
        user_prompt: str,
        *,
        system_prompt: str = "",
        stage_id: str = "",
        model: str = "",
        backend: str = "",
        tools: Iterable[str] = (),
        tool_phase: PhaseOptions | pb.PhaseOptions | None = None,
        synthesis_phase: PhaseOptions | pb.PhaseOptions | None = None,
        max_rounds: int | None = None,
        tool_choice: str | pb.ToolChoice | None = None,
        repair_invalid_calls: bool = False,
        timeout: float | None = None,
    ) -> pb.RunSynthesisResponse:
        """RunSynthesis: both phases; the final text and the tool results in one response."""
        stage = build_stage(
            user_prompt,
            system_prompt=system_prompt,
            stage_id=stage_id,
            model=model,
            backend=backend,
            tools=tools,
            tool_phase=tool_phase,
            synthesis_phase=synthesis_phase,
            max_rounds=max_rounds,
            tool_choice=tool_choice,
            repair_invalid_calls=repair_invalid_calls,
        )
        return await self._stub.RunSynthesis(
            pb.RunSynthesisRequest(stage=stage), timeout=self._deadline(timeout), metadata=self._metadata
        )

    async def stream_tools(
        self,
        user_prompt: str,
        *,
        system_prompt: str = "",
        stage_id: str = "",
        model: str = "",
        backend: str = "",
        tools: Iterable[str] = (),
        tool_phase: PhaseOptions | pb.PhaseOptions | None = None,
        synthesis_phase: PhaseOptions | pb.PhaseOptions | None = None,
        max_rounds: int | None = None,
        tool_choice: str | pb.ToolChoice | None = None,
        repair_invalid_calls: bool = False,
        timeout: float | None = None,
    ) -> AsyncGenerator[pb.StageEvent, None]:
        """StreamTools: the events of the tool phase. The call starts on the first
        `__anext__`; closing the iterator (`aclose`, `contextlib.aclosing`) or cancelling
        the task that iterates it cancels the call. A failed stream yields its Error event,
        then raises the AioRpcError of its status."""
        stage = build_stage(
            user_prompt,
            system_prompt=system_prompt,
            stage_id=stage_id,
            model=model,
            backend=backend,
            tools=tools,
            tool_phase=tool_phase,
            synthesis_phase=synthesis_phase,
            max_rounds=max_rounds,
            tool_choice=tool_choice,
            repair_invalid_calls=repair_invalid_calls,
        )
        call = self._stub.StreamTools(
            pb.StreamToolsRequest(stage=stage), timeout=self._deadline(timeout), metadata=self._metadata
        )
        try:
            async for response in call:
                yield response.event
        finally:
            call.cancel()

    async def stream_synthesis(
        self,
        user_prompt: str,
        *,
        system_prompt: str = "",
        stage_id: str = "",
        model: str = "",
        backend: str = "",
        tools: Iterable[str] = (),
        tool_phase: PhaseOptions | pb.PhaseOptions | None = None,
        synthesis_phase: PhaseOptions | pb.PhaseOptions | None = None,
        max_rounds: int | None = None,
        tool_choice: str | pb.ToolChoice | None = None,
        repair_invalid_calls: bool = False,
        timeout: float | None = None,
    ) -> AsyncGenerator[pb.StageEvent, None]:
        """StreamSynthesis: the events of both phases; see `stream_tools` for cancelling."""
        stage = build_stage(
            user_prompt,
            system_prompt=system_prompt,
            stage_id=stage_id,
            model=model,
            backend=backend,
            tools=tools,
            tool_phase=tool_phase,
            synthesis_phase=synthesis_phase,
            max_rounds=max_rounds,
            tool_choice=tool_choice,
            repair_invalid_calls=repair_invalid_calls,
        )
        call = self._stub.StreamSynthesis(
            pb.StreamSynthesisRequest(stage=stage), timeout=self._deadline(timeout), metadata=self._metadata
        )
        try:
            async for response in call:
                yield response.event
        finally:
            call.cancel()

    async def resume_stage(
        self, stage_id: str, *, after_sequence: int | None = None, timeout: float | None = None
    ) -> AsyncGenerator[pb.StageEvent, None]:
        """ResumeStage: a stream whose connection dropped, from the event after
        `after_sequence` (the last one received; None: from the first) to its terminal
        event, on any replica that shares the server's registry. Cancelling works as for
        `stream_tools`."""
        request = pb.ResumeStageRequest(stage_id=stage_id)
        if after_sequence is not None:
            request.after_sequence = after_sequence
        call = self._stub.ResumeStage(request, timeout=self._deadline(timeout), metadata=self._metadata)
        try:
            async for response in call:
                yield response.event
        finally:
            call.cancel()

    async def cancel_stage(self, stage_id: str, *, timeout: float | None = None) -> None:
        """CancelStage: cancel a running stage (NOT_FOUND when unknown or finished)."""
        await self._stub.CancelStage(
            pb.CancelStageRequest(stage_id=stage_id), timeout=self._deadline(timeout), metadata=self._metadata
        )

    async def list_tools(self, *, timeout: float | None = None) -> list[pb.Tool]:
        """ListTools: the server's tools, sorted by name."""
        response = await self._stub.ListTools(
            pb.ListToolsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
        )
        return list(response.tools)
