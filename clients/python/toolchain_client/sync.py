"""The blocking client of toolchain.v1: the same methods as the asyncio client over a
plain `grpc.Channel`. Failures raise `grpc.RpcError`; decode them with `error_details`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Self

import grpc
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from toolchain_client.aio import PhaseOptions, build_stage
from toolchain_client.credentials import token_metadata

__all__ = ["SyncToolchainClient"]


class SyncToolchainClient:
    """Blocking client of ToolchainService.

    Give it a target ("host:port") and it opens an insecure channel (a secure one with
    `credentials`) that `close()` / `with` closes; or pass your own `channel`, which it
    leaves open. `metadata` goes with every call, and `token` as a bearer token
    (`credentials.tls_credentials` makes TLS credentials); `timeout` is the default deadline in
    seconds of every call (None: no deadline), overridable per call.
    """

    def __init__(
        self,
        target: str,
        *,
        channel: grpc.Channel | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self._owns_channel = channel is None
        if channel is None:
            if credentials is None:
                channel = grpc.insecure_channel(target)
            else:
                channel = grpc.secure_channel(target, credentials)
        self.channel = channel
        self._stub = pb_grpc.ToolchainServiceStub(channel)
        self._metadata = (*metadata, *token_metadata(token))
        self._timeout = timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel if this client opened it (cancels calls still running)."""
        if self._owns_channel:
            self.channel.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def run_tools(
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
        return self._stub.RunTools(
            pb.RunToolsRequest(stage=stage), timeout=self._deadline(timeout), metadata=self._metadata
        )

    def run_synthesis(
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
        return self._stub.RunSynthesis(
            pb.RunSynthesisRequest(stage=stage), timeout=self._deadline(timeout), metadata=self._metadata
        )

    def stream_tools(
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
    ) -> Iterator[pb.StageEvent]:
        """StreamTools: the events of the tool phase. The call starts on the first `next`;
        closing the iterator (`close()`, or dropping it after `break`) cancels the call. A
        failed stream yields its Error event, then raises the RpcError of its status."""
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
            for response in call:
                yield response.event
        finally:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leave it untyped

    def stream_synthesis(
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
    ) -> Iterator[pb.StageEvent]:
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
            for response in call:
                yield response.event
        finally:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leave it untyped

    def resume_stage(
        self, stage_id: str, *, after_sequence: int | None = None, timeout: float | None = None
    ) -> Iterator[pb.StageEvent]:
        """ResumeStage: a stream whose connection dropped, from the event after
        `after_sequence` (None: from the first) to its terminal event."""
        request = pb.ResumeStageRequest(stage_id=stage_id)
        if after_sequence is not None:
            request.after_sequence = after_sequence
        call = self._stub.ResumeStage(request, timeout=self._deadline(timeout), metadata=self._metadata)
        try:
            for response in call:
                yield response.event
        finally:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leave it untyped

    def cancel_stage(self, stage_id: str, *, timeout: float | None = None) -> None:
        """CancelStage: cancel a running stage (NOT_FOUND when unknown or finished)."""
        self._stub.CancelStage(
            pb.CancelStageRequest(stage_id=stage_id), timeout=self._deadline(timeout), metadata=self._metadata
        )

    def list_tools(self, *, timeout: float | None = None) -> list[pb.Tool]:
        """ListTools: the server's tools, sorted by name."""
        response = self._stub.ListTools(
            pb.ListToolsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
        )
        return list(response.tools)
