package io.toolchaingrpc.client;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import com.google.rpc.RetryInfo;
import io.grpc.Metadata;
import io.grpc.Status;
import io.toolchaingrpc.toolchain.v1.Cancel;
import io.toolchaingrpc.toolchain.v1.ErrorReason;
import io.toolchaingrpc.toolchain.v1.Phase;
import io.toolchaingrpc.toolchain.v1.StageError;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.Optional;

/**
 * A failed toolchain.v1 call: the gRPC status with the details the server puts in the {@code
 * grpc-status-details-bin} trailer ({@code google.rpc.Status} with {@code ErrorInfo}, {@code
 * BadRequest} and {@code RetryInfo}).
 *
 * <p>Every {@link ToolchainClient} method throws this type. A stream that ended with a {@code
 * StageError} event throws it with {@link #stageError()} set (its fields were checked against the
 * final status); a stream that ended with a {@code Cancel} event throws it with {@link #cancel()}
 * set and code {@code CANCELLED} or {@code DEADLINE_EXCEEDED}.
 */
public final class ToolchainException extends RuntimeException {

  private static final long serialVersionUID = 1L;

  /** The ErrorInfo domain of the toolchain.v1 errors. */
  public static final String DOMAIN = "toolchain.v1";

  static final Metadata.Key<byte[]> STATUS_DETAILS_KEY =
      Metadata.Key.of("grpc-status-details-bin", Metadata.BINARY_BYTE_MARSHALLER);

  private final Status.Code code;
  private final String statusMessage;
  private final String reason;
  private final String domain;
  private final Map<String, String> metadata;
  private final List<FieldViolation> fieldViolations;
  private final Duration retryDelay;
  private final StageError stageError;
  private final Cancel cancel;

  private ToolchainException(
      Status.Code code,
      String statusMessage,
      String reason,
      String domain,
      Map<String, String> metadata,
      List<FieldViolation> fieldViolations,
      Duration retryDelay,
      StageError stageError,
      Cancel cancel,
      Throwable cause) {
    super(describe(code, statusMessage, reason), cause);
    this.code = code;
    this.statusMessage = statusMessage;
    this.reason = reason;
    this.domain = domain;
    this.metadata = Map.copyOf(metadata);
    this.fieldViolations = List.copyOf(fieldViolations);
    this.retryDelay = retryDelay;
    this.stageError = stageError;
    this.cancel = cancel;
  }

  private static String describe(Status.Code code, String message, String reason) {
    StringBuilder s = new StringBuilder(code.name());
    if (!reason.isEmpty()) {
      s.append(" (").append(reason).append(')');
    }
    if (!message.isEmpty()) {
      s.append(": ").append(message);
    }
    return s.toString();
  }

  /**
   * Decodes a failed call: a {@link io.grpc.StatusRuntimeException} or {@link
   * io.grpc.StatusException} with its trailers. Any other throwable becomes {@code UNKNOWN} (or
   * {@code CANCELLED} for a cancelled context), as {@link Status#fromThrowable} says.
   */
  public static ToolchainException fromThrowable(Throwable t) {
    if (t instanceof ToolchainException e) {
      return e;
    }
    Status status = Status.fromThrowable(t);
    Metadata trailers = Status.trailersFromThrowable(t);
    return fromStatus(status, trailers, t);
  }

  /** Decodes a status and its trailers (which may be null). */
  public static ToolchainException fromStatus(Status status, Metadata trailers, Throwable cause) {
    Objects.requireNonNull(status, "status");
    String message = status.getDescription() == null ? "" : status.getDescription();
    String reason = "";
    String domain = "";
    Map<String, String> metadata = Map.of();
    List<FieldViolation> violations = new ArrayList<>();
    Duration retryDelay = null;
    byte[] raw = trailers == null ? null : trailers.get(STATUS_DETAILS_KEY);
    if (raw != null) {
      try {
        com.google.rpc.Status details = com.google.rpc.Status.parseFrom(raw);
        if (message.isEmpty()) {
          message = details.getMessage();
        }
        for (Any any : details.getDetailsList()) {
          if (any.is(ErrorInfo.class)) {
            ErrorInfo info = any.unpack(ErrorInfo.class);
            reason = info.getReason();
            domain = info.getDomain();
            metadata = info.getMetadataMap();
          } else if (any.is(BadRequest.class)) {
            for (BadRequest.FieldViolation v : any.unpack(BadRequest.class).getFieldViolationsList()) {
              violations.add(FieldViolation.of(v));
            }
          } else if (any.is(RetryInfo.class)) {
            RetryInfo info = any.unpack(RetryInfo.class);
            if (info.hasRetryDelay()) {
              retryDelay = toDuration(info.getRetryDelay());
            }
          }
        }
      } catch (InvalidProtocolBufferException e) {
        // A malformed details trailer: keep the status itself.
      }
    }
    return new ToolchainException(
        status.getCode(), message, reason, domain, metadata, violations, retryDelay, null, null, cause);
  }

  /**
   * An error from a stream's {@code StageError} event; {@code status} is the decoded final
   * status (already checked to agree), whose domain and metadata it keeps.
   */
  static ToolchainException fromStageError(StageError error, ToolchainException status) {
    List<FieldViolation> violations = new ArrayList<>();
    for (BadRequest.FieldViolation v : error.getFieldViolationsList()) {
      violations.add(FieldViolation.of(v));
    }
    Status.Code code = Status.fromCodeValue(error.getCode()).getCode();
    return new ToolchainException(
        code,
        error.getMessage(),
        error.getReason(),
        status.domain,
        status.metadata,
        violations,
        error.hasRetryDelay() ? toDuration(error.getRetryDelay()) : null,
        error,
        null,
        status.getCause());
  }

  /** The final status of a stream that ended with a {@code Cancel} event. */
  static ToolchainException withCancel(ToolchainException status, Cancel cancel) {
    return new ToolchainException(
        status.code,
        status.statusMessage,
        status.reason,
        status.domain,
        status.metadata,
        status.fieldViolations,
        status.retryDelay,
        null,
        cancel,
        status.getCause());
  }

  static Duration toDuration(com.google.protobuf.Duration d) {
    return Duration.ofSeconds(d.getSeconds(), d.getNanos());
  }

  /** The gRPC status code. */
  public Status.Code code() {
    return code;
  }

  /** The status message (what went wrong and what to do about it); may be empty. */
  public String statusMessage() {
    return statusMessage;
  }

  /**
   * The ErrorInfo reason, the name of an {@link ErrorReason} value (e.g. {@code
   * "BACKEND_UNAVAILABLE"}); empty when the status had no ErrorInfo (e.g. a status made by gRPC
   * itself). New reasons may be added: treat an unknown one by its {@link #code()}.
   */
  public String reason() {
    return reason;
  }

  /** {@link #reason()} as the generated enum; empty when there is none or it is not known here. */
  public Optional<ErrorReason> errorReason() {
    return errorReasonOf(reason);
  }

  static Optional<ErrorReason> errorReasonOf(String reason) {
    if (reason.isEmpty()) {
      return Optional.empty();
    }
    var value = ErrorReason.getDescriptor().findValueByName(reason);
    return value == null ? Optional.empty() : Optional.of(ErrorReason.valueOf(value));
  }

  /** The ErrorInfo domain ({@value #DOMAIN} for toolchain errors); empty when none. */
  public String domain() {
    return domain;
  }

  /** The ErrorInfo metadata, e.g. {@code phase -> "PHASE_TOOL"}; empty when none. */
  public Map<String, String> metadata() {
    return metadata;
  }

  /**
   * The phase that failed: {@code StageError.phase} for a stream error, else ErrorInfo metadata
   * {@code "phase"}; {@link Phase#PHASE_UNSPECIFIED} when none is known.
   */
  public Phase phase() {
    if (stageError != null) {
      return stageError.getPhase();
    }
    return phaseOf(metadata.get("phase"));
  }

  static Phase phaseOf(String name) {
    if (name == null) {
      return Phase.PHASE_UNSPECIFIED;
    }
    var value = Phase.getDescriptor().findValueByName(name);
    return value == null ? Phase.PHASE_UNSPECIFIED : Phase.valueOf(value);
  }

  /** The BadRequest field violations (INVALID_REQUEST); empty when none. */
  public List<FieldViolation> fieldViolations() {
    return fieldViolations;
  }

  /** How long to wait before retrying (RetryInfo); empty when retrying will not help. */
  public Optional<Duration> retryDelay() {
    return Optional.ofNullable(retryDelay);
  }

  /** Whether sending the same request again can succeed (after {@link #retryDelay()}). */
  public boolean retryable() {
    return retryDelay != null;
  }

  /** The StageError event a stream ended with; empty for unary calls and other endings. */
  public Optional<StageError> stageError() {
    return Optional.ofNullable(stageError);
  }

  /** The Cancel event a stream ended with; empty when there was none. */
  public Optional<Cancel> cancel() {
    return Optional.ofNullable(cancel);
  }
}
