"""Every way a stage can fail, as exception types that know their gRPC status code.

The runner, the backends and the tool registry raise these; they never import grpc.
`transport/status.py` turns one into a gRPC status (unary) or an error event (streams),
in one place. `Code` mirrors `grpc.StatusCode` numerically so this module stays
transport-free.

    StageError                      code            retryable
    ├── InvalidRequest              INVALID_ARGUMENT        (BadRequest field violations)
    ├── NotFoundError               NOT_FOUND               (names what exists)
    ├── StageAlreadyRunning         ALREADY_EXISTS
    ├── Overloaded                  RESOURCE_EXHAUSTED  yes
    ├── Unavailable                 UNAVAILABLE         yes (server draining)
    ├── NotOwned                    PERMISSION_DENIED       (another principal's stage, or none)
    ├── ResumeNotConfigured         FAILED_PRECONDITION     (no shared event log)
    ├── EventsDropped               OUT_OF_RANGE            (the log no longer keeps them)
    ├── OwnerLost                   UNAVAILABLE         yes (the replica running the stage died)
    ├── RegistryUnavailable         UNAVAILABLE         yes (Redis, or the owning replica, silent)
    ├── ReaderStalled               RESOURCE_EXHAUSTED      (a stream's reader stopped reading)
    └── BackendError                                        (the model server failed)
        ├── BackendUnavailable      UNAVAILABLE         yes (refused, DNS, TLS, 5xx, 429, timeout, cut)
        ├── BackendRejected         INVALID_ARGUMENT        (HTTP 400/422)
        ├── BackendModelNotFound    NOT_FOUND               (HTTP 404)
        ├── BackendMisconfigured    FAILED_PRECONDITION     (HTTP 401/403)
        └── BackendProtocolError    INTERNAL                (not the OpenAI wire format)
            └── BackendResponseTooLarge INTERNAL            (body over max_response_bytes)

Invalid tool calls and failing tools are not errors: they are outcomes in the tool summary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from toolchain_service.events import Phase


class Code(enum.IntEnum):
    """gRPC status codes (google.rpc.Code), by value."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field, as google.rpc.BadRequest.FieldViolation."""

    field: str
    description: str


#: The retry delay of a retryable error whose cause named none (no Retry-After).
DEFAULT_RETRY_DELAY = 1.0


class StageError(Exception):
    """Base of every failure that ends a stage; carries what the caller needs to act."""

    code: Code = Code.INTERNAL
    reason: str = "INTERNAL"
    retryable: bool = False
    #: Backend calls retried before this error ended the phase (metrics count them).
    retries: int = 0

    def __init__(
        self,
        message: str,
        *,
        phase: Phase = Phase.UNSPECIFIED,
        retry_after: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.phase = phase
        self.retry_after = retry_after
        if reason is not None:
            self.reason = reason

    @property
    def retry_delay(self) -> float | None:
        """Seconds a caller should wait before retrying; None when a retry cannot help. The
        status's RetryInfo and the stream's error event both carry this one value."""
        if not self.retryable:
            return None
        return self.retry_after if self.retry_after is not None else DEFAULT_RETRY_DELAY

    def after_retries(self, retries: int) -> None:
        """Record that the phase gave up after `retries` retries, in the message too."""
        self.retries = retries
        if retries:
            noun = "retry" if retries == 1 else "retries"
            self.message = f"{self.message} (gave up after {retries} {noun})"
            self.args = (self.message,)


class InvalidRequest(StageError):
    """The caller sent invalid fields; one violation per field."""

    code = Code.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"

    def __init__(self, violations: list[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" if v.field else v.description for v in violations)
        super().__init__(f"invalid request: {summary}")
        self.violations = violations


class NotFoundError(StageError):
    """A named thing (backend, model, tool, stage) does not exist."""

    code = Code.NOT_FOUND
    reason = "NOT_FOUND"


class StageAlreadyRunning(StageError):
    """A stage with the same caller-chosen id is still running."""

    code = Code.ALREADY_EXISTS
    reason = "STAGE_ALREADY_RUNNING"


class Overloaded(StageError):
    """The server is at one of its limits; retry later."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "SERVER_OVERLOADED"
    retryable = True


class Unavailable(StageError):
    """The server cannot take stages now (draining)."""

    code = Code.UNAVAILABLE
    reason = "SERVER_DRAINING"
    retryable = True


class NotOwned(StageError):
    """With auth on: the stage is not the caller's, or there is none (the same answer)."""

    code = Code.PERMISSION_DENIED
    reason = "STAGE_NOT_OWNED"


class ResumeNotConfigured(StageError):
    """ResumeStage on a server without the replicas' shared event log."""

    code = Code.FAILED_PRECONDITION
    reason = "RESUME_NOT_CONFIGURED"


class EventsDropped(StageError):
    """ResumeStage asked for events that the stage's log no longer keeps."""

    code = Code.OUT_OF_RANGE
    reason = "RESUME_EVENTS_DROPPED"


class OwnerLost(StageError):
    """The replica running the stage stopped before the stage ended."""

    code = Code.UNAVAILABLE
    reason = "STAGE_OWNER_LOST"
    retryable = True


class RegistryUnavailable(StageError):
    """The shared registry (Redis) or the replica owning a stage did not answer."""

    code = Code.UNAVAILABLE
    reason = "REGISTRY_UNAVAILABLE"
    retryable = True


class ReaderStalled(StageError):
    """A stream's reader did not read for `stream_stall_seconds`: the stream was stopped."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "READER_STALLED"


class BackendError(StageError):
    """The model backend failed; subclasses say how."""


class BackendUnavailable(BackendError):
    """Transient: unreachable, overloaded, too slow or cut off. A retry can help."""

    code = Code.UNAVAILABLE
    reason = "BACKEND_UNAVAILABLE"
    retryable = True


class BackendRejected(BackendError):
    """The backend refused the request as malformed (HTTP 400/422)."""

    code = Code.INVALID_ARGUMENT
    reason = "BACKEND_REJECTED_REQUEST"


class BackendModelNotFound(BackendError):
    """The backend does not serve the requested model (HTTP 404)."""

    code = Code.NOT_FOUND
    reason = "MODEL_NOT_FOUND"


class BackendMisconfigured(BackendError):
    """The backend refused the server's credentials: fix the server's configuration."""

    code = Code.FAILED_PRECONDITION
    reason = "BACKEND_AUTH_FAILED"


class BackendProtocolError(BackendError):
    """The backend answered something that is not the OpenAI chat-completions format."""

    code = Code.INTERNAL
    reason = "BACKEND_PROTOCOL_ERROR"


class BackendResponseTooLarge(BackendProtocolError):
    """The backend sent more than `max_response_bytes` in one response (body or stream)."""

    reason = "BACKEND_RESPONSE_TOO_LARGE"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the backend sent a response larger than {limit} bytes (the server's "
            "max_response_bytes); no real chat completion is that large"
        )
