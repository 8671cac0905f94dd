// @toolchain-grpc/client: the TypeScript client of toolchain.v1.

export {
  ToolchainClient,
  createToolchainClient,
  bearerToken,
  type StageInit,
  type StreamCallOptions,
  type TlsOptions,
  type ToolchainClientOptions,
} from "./client.js";
export {
  Code,
  ERROR_DOMAIN,
  STATUS_DETAILS_TRAILER,
  ToolchainError,
  codeName,
  decodeDetails,
  decodeStatusDetails,
  durationMs,
  errorReasonOf,
  phaseName,
  phaseOf,
  withToolchainErrors,
  type DecodedDetails,
  type ToolchainErrorInit,
} from "./errors.js";
export {
  StageStream,
  StreamInvariantError,
  ToolCallAssembler,
  stageErrorMismatch,
  type AssembledToolCall,
  type RoundResult,
  type StageEventMessage,
  type StageKind,
  type StageResult,
} from "./stream.js";
export { Health, ServingStatus } from "./health.js";
// The generated contract: messages, enums, schemas (toolchain.v1 and google.rpc's details).
export * from "./gen/toolchain/v1/toolchain_pb.js";
export * from "./gen/toolchain/v1/error_reason_pb.js";
export type { BadRequest_FieldViolation, ErrorInfo, RetryInfo } from "./gen/google/rpc/error_details_pb.js";
export type { Status } from "./gen/google/rpc/status_pb.js";
