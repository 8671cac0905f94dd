"""The one place where stage failures become gRPC statuses.

A `StageError` becomes a `google.rpc.Status` with ErrorInfo (domain "toolchain.v1", the
error's stable reason), BadRequest field violations for invalid requests, and RetryInfo
when a retry can help; `grpc_status.rpc_status.to_status` packs it into the trailer.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from toolchain_service.errors import StageError
from toolchain_service.events import CancelReason
from toolchain_service.transport.convert import duration, field_violations, phase_name

DOMAIN = "toolchain.v1"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def grpc_status(err: StageError) -> grpc.Status:
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=err.reason, domain=DOMAIN, metadata={"phase": phase_name(err.phase)}
            )
        )
    ]
    violations = field_violations(err)
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    delay = err.retry_delay
    if delay is not None:
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=duration(delay))))
    status = status_pb2.Status(code=int(err.code), message=err.message, details=details)
    return rpc_status.to_status(status)


def cancel_status(reason: CancelReason) -> tuple[grpc.StatusCode, str]:
    if reason == CancelReason.DEADLINE:
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the stage's deadline passed"
    if reason == CancelReason.SHUTDOWN:
        return grpc.StatusCode.CANCELLED, "the server shut down before the stage finished"
    return grpc.StatusCode.CANCELLED, "the stage was cancelled by CancelStage"
