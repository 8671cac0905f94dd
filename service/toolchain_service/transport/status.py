"""The one place where stage failures become gRPC statuses.

A `StageError` becomes a `google.rpc.Status` with ErrorInfo (domain "toolchain.v1", the
error's stable reason), BadRequest field violations for invalid requests, and RetryInfo
when a retry can help; `grpc_status.rpc_status.to_status` packs it into the trailer.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from toolchain_proto.v1 import toolchain_pb2 as pb

from toolchain_service.errors import StageError
from toolchain_service.events import CancelReason
from toolchain_service.transport.convert import duration, field_violations, phase_name

DOMAIN = "toolchain.v1"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def grpc_status(err: StageError) -> grpc.Status:
    delay = err.retry_delay
    return _status(
        int(err.code),
        err.message,
        err.reason,
        phase_name(err.phase),
        field_violations(err),
        None if delay is None else duration(delay),
    )


def event_status(err: pb.StageError) -> grpc.Status:
    """The status that matches a stream's logged error event (a resumed stream ends so)."""
    return _status(
        err.code,
        err.message,
        err.reason,
        pb.Phase.Name(err.phase),
        list(err.field_violations),
        err.retry_delay if err.HasField("retry_delay") else None,
    )


def _status(
    code: int,
    message: str,
    reason: str,
    phase: str,
    violations: list[error_details_pb2.BadRequest.FieldViolation],
    delay: duration_pb2.Duration | None,
) -> grpc.Status:
    details = [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata={"phase": phase}))]
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    if delay is not None:
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))


def cancel_status(reason: CancelReason) -> tuple[grpc.StatusCode, str]:
    if reason == CancelReason.DEADLINE:
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the stage's deadline passed"
    if reason == CancelReason.SHUTDOWN:
        return grpc.StatusCode.CANCELLED, "the server shut down before the stage finished"
    if reason == CancelReason.READER_STALLED:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the stream's reader stopped reading"
    if reason == CancelReason.DISCONNECTED:
        return grpc.StatusCode.CANCELLED, "the stream's connection dropped and no ResumeStage came in time"
    return grpc.StatusCode.CANCELLED, "the stage was cancelled by CancelStage"
