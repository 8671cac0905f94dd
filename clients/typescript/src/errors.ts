// Typed errors of toolchain.v1: a failed call's gRPC status with the google.rpc.Status
// details the server puts in the `grpc-status-details-bin` trailer, decoded.

import { createRegistry, fromBinary, isMessage, type Registry } from "@bufbuild/protobuf";
import { anyUnpack, type Duration } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { Code as RpcCode } from "./gen/google/rpc/code_pb.js";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
  type BadRequest_FieldViolation,
  type ErrorInfo,
} from "./gen/google/rpc/error_details_pb.js";
import { StatusSchema, type Status } from "./gen/google/rpc/status_pb.js";
import { ErrorReason, ErrorReasonSchema } from "./gen/toolchain/v1/error_reason_pb.js";
import { Phase, PhaseSchema, type Cancel, type StageError } from "./gen/toolchain/v1/toolchain_pb.js";

/** The trailer that carries the binary google.rpc.Status. */
export const STATUS_DETAILS_TRAILER = "grpc-status-details-bin";

/** The ErrorInfo domain of every toolchain.v1 error. */
export const ERROR_DOMAIN = "toolchain.v1";

const detailRegistry: Registry = createRegistry(ErrorInfoSchema, BadRequestSchema, RetryInfoSchema);

/** "UNAVAILABLE" for 14 (the gRPC name, as google.rpc.Code spells it); "CODE_<n>" when unknown. */
export function codeName(code: number): string {
  const name = (RpcCode as unknown as Record<number, string | undefined>)[code];
  return name ?? `CODE_${code}`;
}

/** The ErrorReason value named `reason`, or undefined for "" and for names this client does not know. */
export function errorReasonOf(reason: string): ErrorReason | undefined {
  if (reason === "") return undefined;
  return ErrorReasonSchema.values.find((v) => v.name === reason)?.number;
}

/** The Phase named `name` ("PHASE_TOOL"), or undefined when unknown. */
export function phaseOf(name: string): Phase | undefined {
  return PhaseSchema.values.find((v) => v.name === name)?.number;
}

/** The name of a Phase value ("PHASE_TOOL"). */
export function phaseName(phase: Phase): string {
  return PhaseSchema.value[phase]?.name ?? `PHASE_${phase}`;
}

/** A Duration in milliseconds. */
export function durationMs(duration: Duration): number {
  return Number(duration.seconds) * 1000 + duration.nanos / 1e6;
}

/** The google.rpc.Status of a failed call, from its `grpc-status-details-bin` trailer; undefined without one. */
export function decodeStatusDetails(trailers: Headers): Status | undefined {
  const value = trailers.get(STATUS_DETAILS_TRAILER);
  if (value === null) return undefined;
  // gRPC pads binary metadata or not as it likes; Buffer accepts both.
  return fromBinary(StatusSchema, new Uint8Array(Buffer.from(value, "base64")));
}

/** What the google.rpc.Status details of one failure say. */
export interface DecodedDetails {
  errorInfo: ErrorInfo | undefined;
  fieldViolations: BadRequest_FieldViolation[];
  retryDelay: Duration | undefined;
}

/** Unpack the ErrorInfo, BadRequest and RetryInfo of a google.rpc.Status (others are ignored). */
export function decodeDetails(status: Status): DecodedDetails {
  const decoded: DecodedDetails = { errorInfo: undefined, fieldViolations: [], retryDelay: undefined };
  for (const any of status.details) {
    const message = anyUnpack(any, detailRegistry);
    if (isMessage(message, ErrorInfoSchema)) {
      decoded.errorInfo ??= message;
    } else if (isMessage(message, BadRequestSchema)) {
      decoded.fieldViolations.push(...message.fieldViolations);
    } else if (isMessage(message, RetryInfoSchema)) {
      decoded.retryDelay ??= message.retryDelay;
    }
  }
  return decoded;
}

/** The fields of a ToolchainError (see the class). */
export interface ToolchainErrorInit {
  code: Code;
  rawMessage: string;
  reason?: string;
  domain?: string;
  metadata?: Record<string, string>;
  phase?: Phase;
  fieldViolations?: BadRequest_FieldViolation[];
  retryDelay?: Duration | undefined;
  retryable?: boolean;
  status?: Status | undefined;
  stageId?: string | undefined;
  stageError?: StageError | undefined;
  cancel?: Cancel | undefined;
  cause?: unknown;
}

/**
 * A failed toolchain.v1 call: its gRPC status with the server's google.rpc details decoded.
 *
 * Unary calls throw it with what the `grpc-status-details-bin` trailer says. A stream that
 * ended with a StageError event throws it with the event attached (`stageError`), after the
 * stream helper checked that the event and the final status agree; a stream that ended with
 * a Cancel event throws it with `cancel` set (code CANCELLED or DEADLINE_EXCEEDED).
 */
export class ToolchainError extends Error {
  /** The gRPC status code (connect's Code has the gRPC numbers: Code.Unavailable === 14). */
  readonly code: Code;
  /** The status message, as the server wrote it (`message` adds the code and reason in front). */
  readonly rawMessage: string;
  /** ErrorInfo.reason, the name of an ErrorReason value ("BACKEND_UNAVAILABLE"); "" when the status had none. */
  readonly reason: string;
  /** The ErrorReason value of `reason`; undefined when there is none or this client does not know it (then act on `code`). */
  readonly errorReason: ErrorReason | undefined;
  /** ErrorInfo.domain ("toolchain.v1"); "" without ErrorInfo. */
  readonly domain: string;
  /** ErrorInfo.metadata, e.g. { phase: "PHASE_TOOL" }. */
  readonly metadata: Readonly<Record<string, string>>;
  /** The phase that failed (ErrorInfo metadata "phase", or StageError.phase). */
  readonly phase: Phase;
  /** google.rpc.BadRequest field violations (INVALID_REQUEST): field paths like "stage.user_prompt". */
  readonly fieldViolations: readonly BadRequest_FieldViolation[];
  /** google.rpc.RetryInfo.retry_delay: how long to wait before retrying; undefined when not retryable. */
  readonly retryDelay: Duration | undefined;
  /** The retry delay in milliseconds; undefined when not retryable. */
  readonly retryDelayMs: number | undefined;
  /**
   * Whether sending the same request again can help: the server says so with RetryInfo
   * (StageError.retryable on a stream). A status without any toolchain details (the
   * connection failed before reaching the server) counts as retryable when it is UNAVAILABLE.
   */
  readonly retryable: boolean;
  /** The decoded google.rpc.Status trailer; undefined when the call had none. */
  readonly status: Status | undefined;
  /** The stage's id, when the failure came from a stream that had sent events. */
  readonly stageId: string | undefined;
  /** The stream's terminal StageError event, when it ended with one. */
  readonly stageError: StageError | undefined;
  /** The stream's terminal Cancel event, when it ended with one. */
  readonly cancel: Cancel | undefined;

  constructor(init: ToolchainErrorInit) {
    const reason = init.reason ?? "";
    super(`[${codeName(init.code)}${reason ? ` ${reason}` : ""}] ${init.rawMessage}`, { cause: init.cause });
    this.code = init.code;
    this.rawMessage = init.rawMessage;
    this.reason = reason;
    this.errorReason = errorReasonOf(reason);
    this.domain = init.domain ?? "";
    this.metadata = Object.freeze({ ...(init.metadata ?? {}) });
    this.phase = init.phase ?? phaseOf(this.metadata["phase"] ?? "") ?? Phase.UNSPECIFIED;
    this.fieldViolations = Object.freeze([...(init.fieldViolations ?? [])]);
    this.retryDelay = init.retryDelay;
    this.retryDelayMs = init.retryDelay === undefined ? undefined : durationMs(init.retryDelay);
    this.retryable =
      init.retryable ?? (init.retryDelay !== undefined || (init.status === undefined && init.code === Code.Unavailable));
    this.status = init.status;
    this.stageId = init.stageId;
    this.stageError = init.stageError;
    this.cancel = init.cancel;
  }

  /** The gRPC name of the code: "UNAVAILABLE". */
  get codeName(): string {
    return codeName(this.code);
  }

  /**
   * The ToolchainError of any failure of a call: a ToolchainError as it is, a ConnectError
   * decoded (its trailers' google.rpc.Status), anything else through ConnectError.from
   * (an AbortError becomes CANCELLED).
   */
  static from(reason: unknown): ToolchainError {
    if (reason instanceof ToolchainError) return reason;
    const err = ConnectError.from(reason);
    const status = decodeStatusDetails(err.metadata);
    if (status === undefined) {
      return new ToolchainError({ code: err.code, rawMessage: err.rawMessage, cause: err });
    }
    const details = decodeDetails(status);
    return new ToolchainError({
      code: err.code,
      rawMessage: status.message || err.rawMessage,
      reason: details.errorInfo?.reason ?? "",
      domain: details.errorInfo?.domain ?? "",
      metadata: details.errorInfo?.metadata ?? {},
      fieldViolations: details.fieldViolations,
      retryDelay: details.retryDelay,
      status,
      cause: err,
    });
  }
}

// On the prototype, so that the stack trace, captured in Error's constructor, names it.
Object.defineProperty(ToolchainError.prototype, "name", { value: "ToolchainError", configurable: true, writable: true });

/** Run `call`, turning any failure into a ToolchainError. */
export async function withToolchainErrors<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (err) {
    throw ToolchainError.from(err);
  }
}

export { Code };
