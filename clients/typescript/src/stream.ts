// The stream helper: reads a StreamTools / StreamSynthesis call and enforces the event
// invariants of toolchain.v1 (StageEvent in toolchain.proto).

import type { Duration } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import type { BadRequest_FieldViolation } from "./gen/google/rpc/error_details_pb.js";
import {
  Phase,
  type Chunk,
  type Done,
  type StageError,
  type StageEvent,
  type ToolSummary,
} from "./gen/toolchain/v1/toolchain_pb.js";
import { codeName, decodeDetails, phaseName, ToolchainError } from "./errors.js";

/**
 * The server broke a stream invariant: a gap in `sequence`, an empty or changing
 * `stage_id`, tool rounds out of order, no terminal event or an event after it, or a
 * terminal event that disagrees with the call's final status. The call is cancelled when
 * this is thrown.
 */
export class StreamInvariantError extends Error {
  /** The stage's id, when an event had carried one. */
  readonly stageId: string | undefined;
  /** The final status, when the violation is a disagreement with it. */
  readonly statusError: ToolchainError | undefined;

  constructor(message: string, stageId?: string, statusError?: ToolchainError) {
    super(stageId ? `stage ${stageId}: ${message}` : message, { cause: statusError });
    this.stageId = stageId;
    this.statusError = statusError;
  }
}
Object.defineProperty(StreamInvariantError.prototype, "name", {
  value: "StreamInvariantError",
  configurable: true,
  writable: true,
});

/** Which RPC a stream is: StreamTools has no synthesis phase. */
export type StageKind = "tools" | "synthesis";

/** One tool call assembled from its ToolCallDelta fragments. */
export interface AssembledToolCall {
  /** The tool round of its chunks, from 1 (0 from a server without round numbers). */
  round: number;
  /** Its position in the round's answer; indexes start at 0 in every round. */
  index: number;
  id: string;
  name: string;
  /** The concatenated arguments fragments (a JSON text when the model wrote valid JSON). */
  arguments: string;
}

/** Assembles the streamed tool calls of the tool phase, every round's, from the chunks' deltas. */
export class ToolCallAssembler {
  /** By round, then by index. */
  readonly #calls = new Map<number, Map<number, AssembledToolCall>>();

  /** Add the deltas of one chunk. */
  add(chunk: Chunk): void {
    for (const delta of chunk.toolCalls) {
      let round = this.#calls.get(chunk.round);
      if (round === undefined) {
        round = new Map();
        this.#calls.set(chunk.round, round);
      }
      let call = round.get(delta.index);
      if (call === undefined) {
        call = { round: chunk.round, index: delta.index, id: "", name: "", arguments: "" };
        round.set(delta.index, call);
      }
      if (delta.id) call.id = delta.id;
      if (delta.name) call.name = delta.name;
      call.arguments += delta.argumentsFragment;
    }
  }

  /** The calls so far, by round, then by index; of one round only when `round` is given. */
  calls(round?: number): AssembledToolCall[] {
    return [...this.#calls.values()]
      .flatMap((calls) => [...calls.values()])
      .filter((c) => round === undefined || c.round === round)
      .sort((a, b) => a.round - b.round || a.index - b.index)
      .map((c) => ({ ...c }));
  }
}

/** One tool round of a finished stream (StageResult.rounds). */
export interface RoundResult {
  /** The round's number, from 1 (0 from a server without round numbers). */
  round: number;
  /** Its ToolSummary. */
  toolSummary: ToolSummary;
  /** The tool calls assembled from its chunks' deltas. */
  toolCalls: AssembledToolCall[];
  /** Its tool phase text (the chunks' content). */
  toolText: string;
}

/** Everything a finished stream said (StageStream.collect). */
export interface StageResult {
  stageId: string;
  /** Every event, the Done event last. */
  events: StageEvent[];
  /** Every tool round, in order (one unless StageRequest.max_rounds allows more). */
  rounds: RoundResult[];
  /** The last round's ToolSummary: the only one unless the stage had several rounds. */
  toolSummary: ToolSummary;
  /** The tool calls assembled from the tool phase's deltas, of every round. */
  toolCalls: AssembledToolCall[];
  /** The tool phase text (the chunks' content), of every round. */
  toolText: string;
  /** The synthesis phase text (the chunks' content). */
  synthesisText: string;
  /** The terminal Done event. */
  done: Done;
}

/** A message of a stage stream (StreamToolsResponse / StreamSynthesisResponse). */
export interface StageEventMessage {
  event?: StageEvent | undefined;
}

function durationsEqual(a: Duration | undefined, b: Duration | undefined): boolean {
  if (a === undefined || b === undefined) return a === b;
  return a.seconds === b.seconds && a.nanos === b.nanos;
}

function showDuration(d: Duration | undefined): string {
  return d === undefined ? "none" : `${d.seconds}s+${d.nanos}ns`;
}

function violationsEqual(a: readonly BadRequest_FieldViolation[], b: readonly BadRequest_FieldViolation[]): boolean {
  return a.length === b.length && a.every((v, i) => v.field === b[i]!.field && v.description === b[i]!.description);
}

function showViolations(vs: readonly BadRequest_FieldViolation[]): string {
  return JSON.stringify(vs.map((v) => [v.field, v.description]));
}

/** Why a StageError event and the final status disagree; undefined when they agree. */
export function stageErrorMismatch(event: StageError, status: ToolchainError): string | undefined {
  if (event.code !== status.code) {
    return `StageError code ${codeName(event.code)} but the status is ${status.codeName}`;
  }
  if (event.message !== status.rawMessage) {
    return `StageError message ${JSON.stringify(event.message)} but the status says ${JSON.stringify(status.rawMessage)}`;
  }
  if (status.status === undefined) {
    return `StageError ${event.reason} but the status has no google.rpc.Status details`;
  }
  const details = decodeDetails(status.status);
  const reason = details.errorInfo?.reason ?? "";
  if (event.reason !== reason) {
    return `StageError reason ${JSON.stringify(event.reason)} but ErrorInfo.reason is ${JSON.stringify(reason)}`;
  }
  const phase = details.errorInfo?.metadata["phase"];
  if (phase !== undefined && phase !== phaseName(event.phase)) {
    return `StageError phase ${phaseName(event.phase)} but ErrorInfo metadata phase is ${phase}`;
  }
  if (event.retryable !== (event.retryDelay !== undefined)) {
    return `StageError retryable=${event.retryable} with retry_delay ${showDuration(event.retryDelay)}`;
  }
  if (!durationsEqual(event.retryDelay, details.retryDelay)) {
    return `StageError retry_delay ${showDuration(event.retryDelay)} but RetryInfo.retry_delay is ${showDuration(details.retryDelay)}`;
  }
  if (!violationsEqual(event.fieldViolations, details.fieldViolations)) {
    return `StageError field_violations ${showViolations(event.fieldViolations)} but BadRequest has ${showViolations(details.fieldViolations)}`;
  }
  return undefined;
}

/**
 * A running StreamTools / StreamSynthesis call, read through the invariant checks.
 *
 * Iterate it (once) with `for await`: it yields every StageEvent in order, Done last, and
 * yields Done only once the call ended with OK. A stream that ends with a Cancel or
 * StageError event throws a ToolchainError carrying the event, after checking that the
 * final status agrees (Cancel: CANCELLED or DEADLINE_EXCEEDED; StageError: its code,
 * message, reason, phase, retry delay and field violations). A call that fails without a
 * terminal event (the client cancelled, the deadline passed, the connection failed, the
 * server refused the call) throws the ToolchainError of its status. A broken invariant
 * throws StreamInvariantError and cancels the call; so does leaving the loop early
 * (`break`), or `cancel()`.
 *
 * Tool rounds (StageRequest.max_rounds): for each round r = 1, 2, 3, ... tool phase chunks
 * with `round` r, then one ToolSummary with `round` r; then, in StreamSynthesis only,
 * synthesis chunks with `round` k + 1 after the last round k; no tool chunk or ToolSummary
 * once a synthesis chunk arrived; Done only after at least one ToolSummary. A server from
 * before tool rounds sends `round` 0 on every event: when the first chunk or ToolSummary
 * has round 0, the stream must keep to round 0 and to at most one ToolSummary (that older
 * contract), and mixing 0 with numbered rounds is a violation.
 */
export class StageStream implements AsyncIterable<StageEvent> {
  readonly kind: StageKind;
  readonly #controller: AbortController;
  readonly #userSignal: AbortSignal | undefined;
  #source: AsyncIterable<StageEventMessage> | undefined;
  #stageId: string | undefined;
  #rounds = 0;

  /**
   * @param open starts the call with the given signal (the helper's own, which also follows
   *   `signal`), and returns its messages.
   */
  constructor(kind: StageKind, open: (signal: AbortSignal) => AsyncIterable<StageEventMessage>, signal?: AbortSignal) {
    this.kind = kind;
    this.#controller = new AbortController();
    this.#userSignal = signal;
    const combined = signal === undefined ? this.#controller.signal : AbortSignal.any([signal, this.#controller.signal]);
    this.#source = open(combined);
  }

  /** The stage's id, once the first event arrived. */
  get stageId(): string | undefined {
    return this.#stageId;
  }

  /** The ToolSummary events read so far: the tool rounds that have ended. */
  get rounds(): number {
    return this.#rounds;
  }

  /** Cancel the call (the server closes the stage's backend request). */
  cancel(reason?: unknown): void {
    this.#controller.abort(reason);
  }

  [Symbol.asyncIterator](): AsyncIterator<StageEvent> {
    const source = this.#source;
    if (source === undefined) throw new Error("a StageStream can be read once");
    this.#source = undefined;
    return this.#read(source);
  }

  /** Read the whole stream: every event, the assembled tool calls and texts, and Done. */
  async collect(): Promise<StageResult> {
    const events: StageEvent[] = [];
    const assembler = new ToolCallAssembler();
    const rounds: RoundResult[] = [];
    let roundText = "";
    let toolText = "";
    let synthesisText = "";
    let done: Done | undefined;
    for await (const event of this) {
      events.push(event);
      switch (event.event.case) {
        case "chunk": {
          const chunk = event.event.value;
          if (chunk.phase === Phase.SYNTHESIS) {
            synthesisText += chunk.content;
          } else {
            roundText += chunk.content;
            toolText += chunk.content;
            assembler.add(chunk);
          }
          break;
        }
        case "toolSummary": {
          const toolSummary = event.event.value;
          const round = toolSummary.round;
          rounds.push({ round, toolSummary, toolCalls: assembler.calls(round), toolText: roundText });
          roundText = "";
          break;
        }
        case "done":
          done = event.event.value;
          break;
      }
    }
    // #read guarantees both (it yields Done only after a ToolSummary and an OK status).
    const last = rounds.at(-1);
    if (done === undefined || last === undefined) throw new StreamInvariantError("no Done event", this.#stageId);
    return {
      stageId: this.#stageId ?? "",
      events,
      rounds,
      toolSummary: last.toolSummary,
      toolCalls: assembler.calls(),
      toolText,
      synthesisText,
      done,
    };
  }

  async *#read(source: AsyncIterable<StageEventMessage>): AsyncGenerator<StageEvent, void, undefined> {
    const iterator = source[Symbol.asyncIterator]();
    let expected = 0;
    // How the stream numbers its rounds; its first chunk or ToolSummary decides (in
    // checkRound, which is why the initial value is widened: no narrowing to "unknown").
    let numbering = "unknown" as "unknown" | "numbered" | "none";
    let synthesisStarted = false;
    let terminal: StageEvent | undefined;
    let failure: ToolchainError | undefined;
    const violation = (message: string, status?: ToolchainError): StreamInvariantError => {
      this.#controller.abort(new Error(`stream invariant: ${message}`));
      return new StreamInvariantError(message, this.#stageId, status);
    };
    // Tool events carry the round in progress (summaries so far + 1), synthesis chunks the
    // last round + 1: both are rounds + 1. Round 0 throughout: a server without rounds.
    const checkRound = (what: string, round: number): void => {
      if (numbering === "unknown") numbering = round === 0 ? "none" : "numbered";
      if (numbering === "none") {
        if (round !== 0) throw violation(`${what} has round ${round} in a stream whose earlier events had round 0`);
        return;
      }
      const due = this.#rounds + 1;
      if (round !== due) throw violation(`${what} has round ${round} where round ${due} was due`);
    };
    try {
      for (;;) {
        let next: IteratorResult<StageEventMessage>;
        try {
          next = await iterator.next();
        } catch (err) {
          failure = ToolchainError.from(err);
          break;
        }
        if (next.done) break;
        const event = next.value.event;
        if (event === undefined) throw violation(`message ${expected} has no event`);
        const what = event.event.case ?? "empty";
        if (terminal !== undefined) {
          throw violation(`event ${event.sequence} (${what}) after the terminal ${terminal.event.case} event`);
        }
        if (event.sequence !== expected) {
          throw violation(`event ${what} has sequence ${event.sequence}, expected ${expected}`);
        }
        expected++;
        if (event.stageId === "") throw violation(`event ${event.sequence} (${what}) has an empty stage_id`);
        if (this.#stageId === undefined) {
          this.#stageId = event.stageId;
        } else if (event.stageId !== this.#stageId) {
          throw violation(`event ${event.sequence} has stage_id ${JSON.stringify(event.stageId)}`);
        }
        switch (event.event.case) {
          case "chunk": {
            const { phase, round } = event.event.value;
            if (phase === Phase.TOOL) {
              if (synthesisStarted) {
                throw violation(`tool phase chunk ${event.sequence} after the synthesis phase started`);
              }
              if (numbering === "none" && this.#rounds > 0) {
                throw violation(`tool phase chunk ${event.sequence} after the ToolSummary`);
              }
              checkRound(`tool phase chunk ${event.sequence}`, round);
            } else if (phase === Phase.SYNTHESIS) {
              if (this.kind === "tools") throw violation(`synthesis chunk ${event.sequence} in a StreamTools stream`);
              if (this.#rounds === 0) throw violation(`synthesis chunk ${event.sequence} before the ToolSummary`);
              checkRound(`synthesis chunk ${event.sequence}`, round);
              synthesisStarted = true;
            } else {
              throw violation(`chunk ${event.sequence} has phase ${phaseName(phase)}`);
            }
            break;
          }
          case "toolSummary":
            if (synthesisStarted) {
              throw violation(`ToolSummary ${event.sequence} after the synthesis phase started`);
            }
            if (numbering === "none" && this.#rounds > 0) {
              throw violation(`a second ToolSummary (event ${event.sequence}) in a stream without round numbers`);
            }
            checkRound(`ToolSummary ${event.sequence}`, event.event.value.round);
            this.#rounds++;
            break;
          case "done":
          case "cancel":
          case "error":
            terminal = event; // held back until the final status is known
            continue;
          default:
            throw violation(`event ${event.sequence} has no event set`);
        }
        yield event;
      }
    } finally {
      // Leaving early (break, a violation, an error thrown by the consumer) cancels the call.
      if (terminal === undefined && failure === undefined) {
        this.#controller.abort();
        iterator.return?.().catch(() => {});
      }
    }

    if (failure !== undefined) {
      const cancelledHere = failure.code === Code.Canceled && this.#userSignal?.aborted === true;
      if (terminal === undefined || cancelledHere) {
        throw new ToolchainError({ ...initOf(failure), stageId: this.#stageId, cause: failure.cause });
      }
      switch (terminal.event.case) {
        case "done":
          throw violation(`Done event but the call ended with ${failure.codeName}`, failure);
        case "cancel":
          if (failure.code !== Code.Canceled && failure.code !== Code.DeadlineExceeded) {
            throw violation(`Cancel event but the call ended with ${failure.codeName}`, failure);
          }
          throw new ToolchainError({
            ...initOf(failure),
            stageId: this.#stageId,
            cancel: terminal.event.value,
            cause: failure.cause,
          });
        case "error": {
          const stageError = terminal.event.value;
          const mismatch = stageErrorMismatch(stageError, failure);
          if (mismatch !== undefined) throw violation(mismatch, failure);
          throw new ToolchainError({
            ...initOf(failure),
            phase: stageError.phase,
            retryable: stageError.retryable,
            stageId: this.#stageId,
            stageError,
            cause: failure.cause,
          });
        }
      }
    }
    if (terminal === undefined) throw violation("the call ended with OK without a terminal event");
    if (terminal.event.case !== "done") {
      throw violation(`${terminal.event.case === "cancel" ? "Cancel" : "StageError"} event but the call ended with OK`);
    }
    if (this.#rounds === 0) throw violation("Done without a ToolSummary");
    yield terminal;
  }
}

function initOf(err: ToolchainError) {
  return {
    code: err.code,
    rawMessage: err.rawMessage,
    reason: err.reason,
    domain: err.domain,
    metadata: { ...err.metadata },
    phase: err.phase,
    fieldViolations: [...err.fieldViolations],
    retryDelay: err.retryDelay,
    retryable: err.retryable,
    status: err.status,
  };
}
