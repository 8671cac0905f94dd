// Tests that need no server: the generated types as TypeScript sees them, the decoding of
// google.rpc.Status trailers, and the stream helper's invariant checks on scripted streams.

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { create, fromJson, toBinary, toJson, type MessageInitShape } from "@bufbuild/protobuf";
import { anyPack, DurationSchema, type Duration } from "@bufbuild/protobuf/wkt";
import { ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  RetryInfoSchema,
} from "../src/gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../src/gen/google/rpc/status_pb.js";
import {
  CancelReason,
  Code,
  ErrorReason,
  ErrorReasonSchema,
  Phase,
  type StageError,
  StageErrorSchema,
  StageEventSchema,
  StageStream,
  StreamInvariantError,
  ToolCallAssembler,
  ToolchainError,
  ToolSchema,
  errorReasonOf,
  type StageEvent,
  type StageEventMessage,
  type Tool,
} from "../src/index.js";
import * as generated from "../src/gen/toolchain/v1/toolchain_pb.js";

// --- the generated code, as TS users meet it -------------------------------------------------

describe("generated types", () => {
  it("StageError is the message's name and the global Error still works beside it", () => {
    const event: StageError = create(StageErrorSchema, { code: Code.Unavailable, message: "down" });
    const thrown: unknown = new Error("plain");
    assert.ok(thrown instanceof Error);
    assert.ok(!((event as unknown) instanceof Error));
    assert.equal(event.$typeName, "toolchain.v1.StageError");
    // The generated module binds no `Error` that would shadow the global one.
    assert.equal((generated as Record<string, unknown>)["Error"], undefined);
    assert.equal(generated.StageErrorSchema.typeName, "toolchain.v1.StageError");
    const typed = new ToolchainError({ code: Code.Internal, rawMessage: "x" });
    assert.ok(typed instanceof Error);
    assert.ok(typed instanceof ToolchainError);
    assert.equal(typed.name, "ToolchainError");
    assert.match(String(typed.stack), /^ToolchainError: \[INTERNAL\] x/);
  });

  it("StageEvent.sequence is a number, and a number in JSON", () => {
    const event = create(StageEventSchema, { stageId: "s", sequence: 7, event: { case: "done", value: {} } });
    assert.equal(typeof event.sequence, "number");
    const sequence: number = event.sequence; // compile-time: not bigint
    assert.equal(sequence + 1, 8);
    const json = toJson(StageEventSchema, event) as { sequence: unknown };
    assert.equal(json.sequence, 7);
    assert.equal(typeof json.sequence, "number");
    const back = fromJson(StageEventSchema, JSON.parse(JSON.stringify(json)));
    assert.equal(back.sequence, 7);
    assert.equal(back.event.case, "done");
  });

  it("Tool.timeout is a google.protobuf.Duration", () => {
    const tool: Tool = create(ToolSchema, { name: "calculator", timeout: { seconds: 5n, nanos: 500_000_000 } });
    const timeout: Duration | undefined = tool.timeout;
    assert.ok(timeout !== undefined);
    assert.equal(timeout.$typeName, DurationSchema.typeName);
    assert.equal(timeout.seconds, 5n);
    assert.deepEqual(toJson(ToolSchema, tool), { name: "calculator", timeout: "5.500s" });
  });

  it("every ErrorReason name maps back to its value", () => {
    for (const value of ErrorReasonSchema.values) {
      assert.equal(errorReasonOf(value.name), value.number);
    }
    assert.equal(errorReasonOf("BACKEND_UNAVAILABLE"), ErrorReason.BACKEND_UNAVAILABLE);
    assert.equal(errorReasonOf("NO_SUCH_REASON"), undefined);
    assert.equal(errorReasonOf(""), undefined);
  });
});

// --- google.rpc.Status decoding ---------------------------------------------------------------

const delay3s = { seconds: 3n, nanos: 0 };

function statusTrailers(init: MessageInitShape<typeof StatusSchema>): Headers {
  const bytes = toBinary(StatusSchema, create(StatusSchema, init));
  return new Headers({ "grpc-status-details-bin": Buffer.from(bytes).toString("base64").replace(/=+$/, "") });
}

function unavailable(delay: Duration | { seconds: bigint; nanos: number } = delay3s): ConnectError {
  const metadata = statusTrailers({
    code: Code.Unavailable,
    message: "the backend answered HTTP 503",
    details: [
      anyPack(
        ErrorInfoSchema,
        create(ErrorInfoSchema, {
          reason: "BACKEND_UNAVAILABLE",
          domain: "toolchain.v1",
          metadata: { phase: "PHASE_TOOL" },
        }),
      ),
      anyPack(RetryInfoSchema, create(RetryInfoSchema, { retryDelay: delay })),
    ],
  });
  return new ConnectError("the backend answered HTTP 503", Code.Unavailable, metadata);
}

function invalid(): ConnectError {
  const metadata = statusTrailers({
    code: Code.InvalidArgument,
    message: "invalid request",
    details: [
      anyPack(ErrorInfoSchema, create(ErrorInfoSchema, { reason: "INVALID_REQUEST", domain: "toolchain.v1" })),
      anyPack(
        BadRequestSchema,
        create(BadRequestSchema, {
          fieldViolations: [
            { field: "stage.user_prompt", description: "required" },
            { field: "stage.tool_phase.temperature", description: "0.0 to 2.0" },
          ],
        }),
      ),
    ],
  });
  return new ConnectError("invalid request", Code.InvalidArgument, metadata);
}

describe("ToolchainError.from", () => {
  it("decodes ErrorInfo, metadata and RetryInfo from grpc-status-details-bin", () => {
    const err = ToolchainError.from(unavailable());
    assert.equal(err.code, Code.Unavailable);
    assert.equal(err.codeName, "UNAVAILABLE");
    assert.equal(err.rawMessage, "the backend answered HTTP 503");
    assert.equal(err.reason, "BACKEND_UNAVAILABLE");
    assert.equal(err.errorReason, ErrorReason.BACKEND_UNAVAILABLE);
    assert.equal(err.domain, "toolchain.v1");
    assert.deepEqual(err.metadata, { phase: "PHASE_TOOL" });
    assert.equal(err.phase, Phase.TOOL);
    assert.equal(err.retryDelay?.seconds, 3n);
    assert.equal(err.retryDelayMs, 3000);
    assert.equal(err.retryable, true);
    assert.deepEqual(err.fieldViolations, []);
    assert.match(err.message, /^\[UNAVAILABLE BACKEND_UNAVAILABLE\] /);
    assert.ok(err.cause instanceof ConnectError);
  });

  it("decodes BadRequest field violations; no RetryInfo means not retryable", () => {
    const err = ToolchainError.from(invalid());
    assert.equal(err.code, Code.InvalidArgument);
    assert.equal(err.errorReason, ErrorReason.INVALID_REQUEST);
    assert.deepEqual(
      err.fieldViolations.map((v) => [v.field, v.description]),
      [
        ["stage.user_prompt", "required"],
        ["stage.tool_phase.temperature", "0.0 to 2.0"],
      ],
    );
    assert.equal(err.retryDelay, undefined);
    assert.equal(err.retryDelayMs, undefined);
    assert.equal(err.retryable, false);
    assert.equal(err.phase, Phase.UNSPECIFIED);
  });

  it("keeps code and message of a status without details; an unknown reason is kept as a string", () => {
    const bare = ToolchainError.from(new ConnectError("connect ECONNREFUSED", Code.Unavailable));
    assert.equal(bare.status, undefined);
    assert.equal(bare.reason, "");
    assert.equal(bare.errorReason, undefined);
    assert.equal(bare.retryable, true);
    const future = ToolchainError.from(
      new ConnectError(
        "x",
        Code.Internal,
        statusTrailers({
          code: Code.Internal,
          message: "x",
          details: [anyPack(ErrorInfoSchema, create(ErrorInfoSchema, { reason: "SOMETHING_NEW" }))],
        }),
      ),
    );
    assert.equal(future.reason, "SOMETHING_NEW");
    assert.equal(future.errorReason, undefined);
  });

  it("turns an AbortError into CANCELLED", () => {
    const err = ToolchainError.from(new DOMException("aborted", "AbortError"));
    assert.equal(err.code, Code.Canceled);
  });
});

// --- the stream helper on scripted streams -----------------------------------------------------

type EventInit = MessageInitShape<typeof StageEventSchema>;

const ID = "stage-1";
/** A chunk; by default of round 1 (tool phase) or 2 (synthesis after one round). */
const chunk = (phase: Phase, content = "x", round = phase === Phase.SYNTHESIS ? 2 : 1): EventInit["event"] => ({
  case: "chunk",
  value: { phase, content, round },
});
const tool = (round: number, content = "x") => chunk(Phase.TOOL, content, round);
const synthesis = (round: number, content = "x") => chunk(Phase.SYNTHESIS, content, round);
const summaryOf = (round: number): EventInit["event"] => ({ case: "toolSummary", value: { results: [], round } });
const summary = summaryOf(1);
const done: EventInit["event"] = { case: "done", value: { text: "The answer is 42." } };

function events(...inits: EventInit["event"][]): EventInit[] {
  return inits.map((event, sequence) => ({ stageId: ID, sequence, event }));
}

interface Script {
  events: EventInit[];
  end?: ConnectError;
  /** Never end after the events (a hanging stage): the read waits for the signal. */
  hang?: boolean;
}

function scripted(script: Script, kind: "tools" | "synthesis" = "synthesis", signal?: AbortSignal) {
  let seen: AbortSignal | undefined;
  const stream = new StageStream(
    kind,
    (s) => {
      seen = s;
      return (async function* (): AsyncGenerator<StageEventMessage> {
        for (const e of script.events) yield { event: create(StageEventSchema, e) };
        if (script.hang) {
          await new Promise((_, reject) => {
            if (s.aborted) reject(s.reason);
            s.addEventListener("abort", () => reject(s.reason), { once: true });
          });
        }
        if (script.end) throw script.end;
      })();
    },
    signal,
  );
  return { stream, signal: () => seen! };
}

async function drain(stream: StageStream): Promise<StageEvent[]> {
  const out: StageEvent[] = [];
  for await (const e of stream) out.push(e);
  return out;
}

describe("StageStream", () => {
  it("yields every event of a good stream, Done last, and collect assembles it", async () => {
    const { stream } = scripted({
      events: [
        { stageId: ID, sequence: 0, event: { case: "chunk", value: { phase: Phase.TOOL, round: 1, toolCalls: [{ index: 0, id: "call_calc", name: "calculator", argumentsFragment: '{"expr' }] } } },
        { stageId: ID, sequence: 1, event: { case: "chunk", value: { phase: Phase.TOOL, round: 1, toolCalls: [{ index: 0, argumentsFragment: 'ession": "6*7"}' }] } } },
        { stageId: ID, sequence: 2, event: summary },
        { stageId: ID, sequence: 3, event: chunk(Phase.SYNTHESIS, "The answer ") },
        { stageId: ID, sequence: 4, event: chunk(Phase.SYNTHESIS, "is 42.") },
        { stageId: ID, sequence: 5, event: done },
      ],
    });
    const result = await stream.collect();
    assert.equal(result.stageId, ID);
    assert.deepEqual(result.events.map((e) => e.sequence), [0, 1, 2, 3, 4, 5]);
    assert.equal(result.events.at(-1)?.event.case, "done");
    assert.deepEqual(result.toolCalls, [{ round: 1, index: 0, id: "call_calc", name: "calculator", arguments: '{"expression": "6*7"}' }]);
    assert.equal(result.rounds.length, 1);
    assert.equal(result.toolSummary, result.rounds[0]?.toolSummary);
    assert.equal(result.synthesisText, "The answer is 42.");
    assert.equal(result.done.text, "The answer is 42.");
    assert.equal(stream.stageId, ID);
  });

  const broken: [string, Script, RegExp, ("tools" | "synthesis")?][] = [
    ["a gap in sequence", { events: [{ stageId: ID, sequence: 0, event: summary }, { stageId: ID, sequence: 2, event: done }] }, /sequence 2, expected 1/],
    ["a first sequence that is not 0", { events: [{ stageId: ID, sequence: 1, event: summary }] }, /sequence 1, expected 0/],
    ["an empty stage_id", { events: [{ stageId: "", sequence: 0, event: summary }] }, /empty stage_id/],
    ["a changing stage_id", { events: [{ stageId: ID, sequence: 0, event: summary }, { stageId: "other", sequence: 1, event: done }] }, /stage_id "other"/],
    ["no terminal event", { events: events(chunk(Phase.TOOL), summary) }, /without a terminal event/],
    ["an event after the terminal one", { events: events(summary, done, chunk(Phase.SYNTHESIS)) }, /after the terminal done/],
    ["two terminal events", { events: events(summary, done, { case: "cancel", value: {} }) }, /after the terminal done/],
    ["an event with nothing set", { events: events(summary, { case: undefined }) }, /no event set/],
    ["a synthesis chunk before the ToolSummary", { events: events(synthesis(1), summary, done) }, /synthesis chunk 0 before the ToolSummary/],
    ["a synthesis chunk in StreamTools", { events: events(summary, synthesis(2), done) }, /in a StreamTools stream/, "tools"],
    ["Done without a ToolSummary", { events: events(chunk(Phase.TOOL), done) }, /without a ToolSummary/],
    ["a chunk without a phase", { events: events(chunk(Phase.UNSPECIFIED), summary, done) }, /chunk 0 has phase PHASE_UNSPECIFIED/],
    // Tool rounds.
    ["a repeated summary round", { events: events(summary, summary, done) }, /ToolSummary 1 has round 1 where round 2 was due/],
    ["a skipped summary round", { events: events(tool(1), summaryOf(1), tool(2), summaryOf(3), done) }, /ToolSummary 3 has round 3 where round 2 was due/],
    ["a first summary of round 2", { events: events(summaryOf(2), done) }, /ToolSummary 0 has round 2 where round 1 was due/],
    ["a tool chunk of the ended round", { events: events(summary, tool(1), summaryOf(2), done) }, /tool phase chunk 1 has round 1 where round 2 was due/],
    ["a tool chunk of the next round", { events: events(tool(1), tool(2), summaryOf(1), done) }, /tool phase chunk 1 has round 2 where round 1 was due/],
    ["a tool chunk of round 0 among numbered ones", { events: events(tool(1), summaryOf(1), tool(0), summaryOf(2), done) }, /tool phase chunk 2 has round 0 where round 2 was due/],
    ["a tool chunk after synthesis started", { events: events(summary, synthesis(2), tool(2), summaryOf(2), done) }, /tool phase chunk 2 after the synthesis phase started/],
    ["a summary after synthesis started", { events: events(summary, synthesis(2), summaryOf(2), done) }, /ToolSummary 2 after the synthesis phase started/],
    ["a synthesis chunk of the last tool round", { events: events(summaryOf(1), summaryOf(2), synthesis(2), done) }, /synthesis chunk 2 has round 2 where round 3 was due/],
    ["a synthesis chunk of round 0 among numbered ones", { events: events(tool(1), summary, synthesis(0), done) }, /synthesis chunk 2 has round 0 where round 2 was due/],
    // A server without round numbers (round 0 throughout) keeps to the one-round rules.
    ["round 0, then a numbered summary", { events: events(tool(0), summaryOf(1), done) }, /ToolSummary 1 has round 1 in a stream whose earlier events had round 0/],
    ["round 0, then a numbered synthesis chunk", { events: events(summaryOf(0), synthesis(1), done) }, /synthesis chunk 1 has round 1 in a stream whose earlier/],
    ["round 0 and a second ToolSummary", { events: events(summaryOf(0), summaryOf(0), done) }, /second ToolSummary \(event 1\) in a stream without round numbers/],
    ["round 0 and a tool chunk after the ToolSummary", { events: events(summaryOf(0), tool(0), done) }, /tool phase chunk 1 after the ToolSummary/],
    ["Done and a failed status", { events: events(summary, done), end: unavailable() }, /Done event but the call ended with UNAVAILABLE/],
    ["Cancel and status OK", { events: events({ case: "cancel", value: { reason: CancelReason.CANCEL_STAGE } }) }, /Cancel event but the call ended with OK/],
    ["Cancel and status UNAVAILABLE", { events: events({ case: "cancel", value: {} }), end: unavailable() }, /Cancel event but the call ended with UNAVAILABLE/],
    ["StageError and status OK", { events: events({ case: "error", value: { code: Code.Internal } }) }, /StageError event but the call ended with OK/],
  ];
  for (const [name, script, message, kind] of broken) {
    it(`rejects ${name}`, async () => {
      const { stream, signal } = scripted(script, kind);
      await assert.rejects(drain(stream), (err: unknown) => {
        assert.ok(err instanceof StreamInvariantError, `not a StreamInvariantError: ${String(err)}`);
        assert.match(err.message, message);
        return true;
      });
      assert.ok(signal().aborted, "the call is cancelled after a violation");
    });
  }

  const stageError = (init: MessageInitShape<typeof StageErrorSchema>): EventInit["event"] => ({ case: "error", value: init });
  const agreeing: MessageInitShape<typeof StageErrorSchema> = {
    code: Code.Unavailable,
    message: "the backend answered HTTP 503",
    phase: Phase.TOOL,
    retryable: true,
    reason: "BACKEND_UNAVAILABLE",
    retryDelay: delay3s,
  };

  it("throws the StageError with the status's details when they agree", async () => {
    const { stream } = scripted({ events: events(chunk(Phase.TOOL, "thinking"), stageError(agreeing)), end: unavailable() });
    const seen: StageEvent[] = [];
    await assert.rejects(
      (async () => {
        for await (const e of stream) seen.push(e);
      })(),
      (err: unknown) => {
        assert.ok(err instanceof ToolchainError);
        assert.equal(err.code, Code.Unavailable);
        assert.equal(err.errorReason, ErrorReason.BACKEND_UNAVAILABLE);
        assert.equal(err.retryDelayMs, 3000);
        assert.equal(err.retryable, true);
        assert.equal(err.phase, Phase.TOOL);
        assert.equal(err.stageId, ID);
        assert.equal(err.stageError?.retryDelay?.seconds, 3n);
        return true;
      },
    );
    assert.deepEqual(seen.map((e) => e.event.case), ["chunk"]);
  });

  const disagreeing: [string, MessageInitShape<typeof StageErrorSchema>, RegExp][] = [
    ["code", { ...agreeing, code: Code.Internal }, /code INTERNAL but the status is UNAVAILABLE/],
    ["message", { ...agreeing, message: "other" }, /message "other"/],
    ["reason", { ...agreeing, reason: "BACKEND_RATE_LIMITED" }, /reason "BACKEND_RATE_LIMITED"/],
    ["phase", { ...agreeing, phase: Phase.SYNTHESIS }, /phase PHASE_SYNTHESIS but ErrorInfo metadata phase is PHASE_TOOL/],
    ["retry delay", { ...agreeing, retryDelay: { seconds: 2n } }, /retry_delay 2s\+0ns but RetryInfo.retry_delay is 3s\+0ns/],
    ["retryable", { ...agreeing, retryable: false }, /retryable=false/],
    ["field violations", { ...agreeing, fieldViolations: [{ field: "stage.user_prompt" }] }, /field_violations/],
  ];
  for (const [what, init, message] of disagreeing) {
    it(`rejects a StageError whose ${what} disagrees with the status`, async () => {
      const { stream } = scripted({ events: events(stageError(init)), end: unavailable() });
      await assert.rejects(drain(stream), (err: unknown) => {
        assert.ok(err instanceof StreamInvariantError, String(err));
        assert.match(err.message, message);
        assert.ok(err.statusError instanceof ToolchainError);
        return true;
      });
    });
  }

  it("throws a Cancel event with CANCELLED as a ToolchainError carrying it", async () => {
    const { stream } = scripted({
      events: events(chunk(Phase.TOOL), { case: "cancel", value: { reason: CancelReason.CANCEL_STAGE, message: "cancelled" } }),
      end: new ConnectError("cancelled", Code.Canceled),
    });
    await assert.rejects(drain(stream), (err: unknown) => {
      assert.ok(err instanceof ToolchainError);
      assert.equal(err.code, Code.Canceled);
      assert.equal(err.cancel?.reason, CancelReason.CANCEL_STAGE);
      return true;
    });
  });

  it("accepts Cancel(DEADLINE) + DEADLINE_EXCEEDED, and DEADLINE_EXCEEDED alone", async () => {
    for (const script of [
      { events: events(chunk(Phase.TOOL), { case: "cancel", value: { reason: CancelReason.DEADLINE } }), end: new ConnectError("late", Code.DeadlineExceeded) },
      { events: events(chunk(Phase.TOOL)), end: new ConnectError("late", Code.DeadlineExceeded) },
    ]) {
      const { stream } = scripted(script);
      await assert.rejects(drain(stream), (err: unknown) => err instanceof ToolchainError && err.code === Code.DeadlineExceeded);
    }
  });

  it("passes a status without any event through (e.g. UNAUTHENTICATED)", async () => {
    const { stream } = scripted({ events: [], end: new ConnectError("no token", Code.Unauthenticated) });
    await assert.rejects(drain(stream), (err: unknown) => err instanceof ToolchainError && err.code === Code.Unauthenticated && err.stageId === undefined);
  });

  it("cancels the call when the reader leaves early", async () => {
    const { stream, signal } = scripted({ events: events(chunk(Phase.TOOL)), hang: true });
    for await (const e of stream) {
      assert.equal(e.event.case, "chunk");
      break;
    }
    assert.ok(signal().aborted);
  });

  it("surfaces the caller's abort as CANCELLED", async () => {
    const controller = new AbortController();
    const { stream } = scripted({ events: events(chunk(Phase.TOOL)), hang: true }, "synthesis", controller.signal);
    await assert.rejects(
      (async () => {
        for await (const e of stream) {
          if (e.event.case === "chunk") controller.abort();
        }
      })(),
      (err: unknown) => err instanceof ToolchainError && err.code === Code.Canceled,
    );
  });

  it("reads three tool rounds, then the synthesis phase as round 4", async () => {
    const { stream } = scripted({
      events: events(
        { case: "chunk", value: { phase: Phase.TOOL, round: 1, content: "first ", toolCalls: [{ index: 0, id: "r1", name: "calculator", argumentsFragment: "{}" }] } },
        { case: "toolSummary", value: { round: 1, results: [{ callId: "r1", round: 1 }] } },
        { case: "chunk", value: { phase: Phase.TOOL, round: 2, toolCalls: [{ index: 0, id: "r2", name: "calculator", argumentsFragment: "{}" }] } },
        { case: "toolSummary", value: { round: 2, results: [{ callId: "r2", round: 2 }] } },
        summaryOf(3),
        synthesis(4, "After three "),
        synthesis(4, "rounds."),
        done,
      ),
    });
    const seen: number[] = [];
    const result = await (async () => {
      const out = [];
      for await (const e of stream) {
        out.push(e);
        seen.push(stream.rounds);
      }
      return out;
    })();
    assert.equal(result.length, 8);
    assert.deepEqual(seen, [0, 1, 1, 2, 3, 3, 3, 3]);
  });

  it("collect splits the rounds: summaries, calls and text of each", async () => {
    const { stream } = scripted(
      {
        events: events(
          { case: "chunk", value: { phase: Phase.TOOL, round: 1, content: "one", toolCalls: [{ index: 0, id: "r1", name: "calculator", argumentsFragment: '{"e":1}' }] } },
          { case: "toolSummary", value: { round: 1, results: [{ callId: "r1", round: 1 }] } },
          { case: "chunk", value: { phase: Phase.TOOL, round: 2, toolCalls: [{ index: 0, id: "r2", name: "calculator", argumentsFragment: '{"e":2}' }] } },
          { case: "toolSummary", value: { round: 2, results: [{ callId: "r2", round: 2 }] } },
          tool(3, "done"),
          summaryOf(3),
          done,
        ),
      },
      "tools",
    );
    const result = await stream.collect();
    assert.deepEqual(
      result.rounds.map((r) => [r.round, r.toolSummary.round, r.toolCalls.map((c) => c.id), r.toolText]),
      [
        [1, 1, ["r1"], "one"],
        [2, 2, ["r2"], ""],
        [3, 3, [], "done"],
      ],
    );
    assert.equal(result.toolSummary.round, 3);
    assert.deepEqual(
      result.toolCalls.map((c) => [c.round, c.index, c.id]),
      [
        [1, 0, "r1"],
        [2, 0, "r2"],
      ],
    );
    assert.equal(result.toolText, "onedone");
    assert.equal(stream.rounds, 3);
  });

  it("throws the StageError of a stage that fails in its second round", async () => {
    const { stream } = scripted({
      events: events(tool(1), summary, tool(2), { case: "error", value: { code: Code.Unavailable, message: "the backend answered HTTP 503", phase: Phase.TOOL, retryable: true, reason: "BACKEND_UNAVAILABLE", retryDelay: delay3s } }),
      end: unavailable(),
    });
    await assert.rejects(drain(stream), (err: unknown) => err instanceof ToolchainError && err.code === Code.Unavailable);
    assert.equal(stream.rounds, 1);
  });

  it("accepts a server without round numbers (round 0 on every event)", async () => {
    for (const kind of ["tools", "synthesis"] as const) {
      const script = kind === "tools" ? events(tool(0), summaryOf(0), done) : events(tool(0), summaryOf(0), synthesis(0), done);
      const { stream } = scripted({ events: script }, kind);
      const result = await stream.collect();
      assert.equal(result.rounds.length, 1);
      assert.equal(result.rounds[0]?.round, 0);
    }
  });

  it("can be read once", () => {
    const { stream } = scripted({ events: [] });
    stream[Symbol.asyncIterator]();
    assert.throws(() => stream[Symbol.asyncIterator](), /read once/);
  });
});

describe("ToolCallAssembler", () => {
  it("concatenates fragments per index, id and name from the first delta", () => {
    const assembler = new ToolCallAssembler();
    const c = (toolCalls: { index: number; id?: string; name?: string; argumentsFragment?: string }[]) =>
      create(StageEventSchema, { event: { case: "chunk", value: { toolCalls } } }).event.value as Parameters<ToolCallAssembler["add"]>[0];
    assembler.add(c([{ index: 1, id: "b", name: "get_weather", argumentsFragment: '{"city":' }]));
    assembler.add(c([{ index: 0, id: "a", name: "calculator", argumentsFragment: "{}" }, { index: 1, argumentsFragment: '"Oslo"}' }]));
    assert.deepEqual(assembler.calls(), [
      { round: 0, index: 0, id: "a", name: "calculator", arguments: "{}" },
      { round: 0, index: 1, id: "b", name: "get_weather", arguments: '{"city":"Oslo"}' },
    ]);
  });

  it("keeps the calls of each round apart (indexes restart at 0 in every round)", () => {
    const assembler = new ToolCallAssembler();
    const c = (round: number, toolCalls: { index: number; id?: string; name?: string; argumentsFragment?: string }[]) =>
      create(StageEventSchema, { event: { case: "chunk", value: { round, toolCalls } } }).event.value as Parameters<ToolCallAssembler["add"]>[0];
    assembler.add(c(2, [{ index: 0, id: "r2", name: "calculator", argumentsFragment: '{"expression": "2*3"}' }]));
    assembler.add(c(1, [{ index: 0, id: "r1", name: "calculator", argumentsFragment: '{"expression":' }]));
    assembler.add(c(1, [{ index: 0, argumentsFragment: ' "1+1"}' }]));
    const r1 = { round: 1, index: 0, id: "r1", name: "calculator", arguments: '{"expression": "1+1"}' };
    const r2 = { round: 2, index: 0, id: "r2", name: "calculator", arguments: '{"expression": "2*3"}' };
    assert.deepEqual(assembler.calls(), [r1, r2]);
    assert.deepEqual(assembler.calls(2), [r2]);
    assert.deepEqual(assembler.calls(3), []);
  });
});
