// Interop tests against the live servers of `python -m tests.interop.serve` (see README.md):
// what a TypeScript caller observes, through the client and its stream helper.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, describe, it } from "node:test";
import { isMessage, toJson } from "@bufbuild/protobuf";
import { DurationSchema, ValueSchema } from "@bufbuild/protobuf/wkt";
import { ConnectError } from "@connectrpc/connect";
import {
  CancelReason,
  Code,
  ErrorReason,
  Phase,
  ServingStatus,
  StreamInvariantError,
  ToolchainClient,
  ToolchainError,
  ToolChoiceMode,
  ToolOutcome,
  durationMs,
  errorReasonOf,
  type PhaseStats,
  type StageInit,
  type StageResult,
  type StageStream,
  type ToolCallResult,
  type Usage,
  type ToolchainClientOptions,
} from "../src/index.js";

// --- the harness -------------------------------------------------------------------------------

const HOW = "run these tests through the harness: cd /work/main && .venv/bin/python -m tests.interop.serve -- bash -c 'cd clients/typescript && npm test'";

function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: ${HOW}`);
  return value;
}

/** Generous: the CI machine is a slow shared 2-core box. */
const CALL_MS = 30_000;
const TEST = { timeout: 90_000 };

const clients: ToolchainClient[] = [];
function client(options: Partial<ToolchainClientOptions> = {}): ToolchainClient {
  const c = new ToolchainClient({ address: env("TOOLCHAIN_ADDR"), timeoutMs: CALL_MS, ...options });
  clients.push(c);
  return c;
}
after(() => {
  for (const c of clients) c.close();
});

let plainClient: ToolchainClient | undefined;
function plain(): ToolchainClient {
  plainClient ??= client();
  return plainClient;
}

/** Every ErrorInfo reason the tests received (point 10). */
const reasonsSeen = new Set<string>();

/** Await `promise`, expect a ToolchainError, check its reason is a known ErrorReason name. */
async function failure(promise: Promise<unknown>): Promise<ToolchainError> {
  try {
    await promise;
  } catch (err) {
    if (err instanceof StreamInvariantError) throw err;
    assert.ok(err instanceof ToolchainError, `expected a ToolchainError, got ${String(err)}`);
    if (err.reason !== "") {
      reasonsSeen.add(err.reason);
      assert.notEqual(errorReasonOf(err.reason), undefined, `unknown ErrorReason ${err.reason}`);
    }
    return err;
  }
  assert.fail("the call succeeded");
}

/** Read `stream` until it ends, calling `onEvent` for each event. */
async function drive(stream: StageStream, onEvent: (case_: string, content: string) => Promise<void> | void = () => {}) {
  for await (const event of stream) {
    await onEvent(event.event.case ?? "", event.event.case === "chunk" ? event.event.value.content : "");
  }
}

async function backendClosed(tag: string): Promise<boolean> {
  const url = `${env("TOOLCHAIN_FAKE_URL")}/interop/closed?tag=${encodeURIComponent(tag)}&timeout=10`;
  const response = await fetch(url, { signal: AbortSignal.timeout(CALL_MS) });
  assert.equal(response.status, 200);
  const body = (await response.json()) as { closed: boolean };
  return body.closed;
}

/** The calculator tool's output for {"expression": "6*7"}. */
const CALC_RESULT = { expression: "6*7", result: 42 };
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const invalidStage: StageInit = { userPrompt: "", toolPhase: { temperature: 3.0 } };

// --- 1. a full streamed stage --------------------------------------------------------------------

describe("StreamSynthesis [calc]", () => {
  it("streams tool deltas, the summary, synthesis chunks and Done, invariants enforced", TEST, async () => {
    const result = await plain().streamSynthesis({ userPrompt: "What is 6*7? [calc]" }).collect();
    const cases = result.events.map((e) => e.event.case);
    assert.deepEqual(
      result.events.map((e) => e.sequence),
      cases.map((_, i) => i),
    );
    assert.ok(result.events.every((e) => e.stageId === result.stageId && e.stageId !== ""));

    // Tool phase chunks with tool-call deltas, then one summary, then synthesis chunks, then Done.
    const summaryAt = cases.indexOf("toolSummary");
    assert.ok(summaryAt > 0, `no tool chunks before the summary: ${cases.join(",")}`);
    const chunks = result.events.flatMap((e) => (e.event.case === "chunk" ? [{ at: e.sequence, chunk: e.event.value }] : []));
    const toolChunks = chunks.filter((c) => c.chunk.phase === Phase.TOOL);
    const synthesisChunks = chunks.filter((c) => c.chunk.phase === Phase.SYNTHESIS);
    assert.ok(toolChunks.length > 0 && toolChunks.every((c) => c.at < summaryAt));
    assert.ok(toolChunks.some((c) => c.chunk.toolCalls.length > 0), "no tool-call deltas");
    assert.ok(synthesisChunks.length > 1, "the synthesis text arrives in several chunks");
    assert.ok(synthesisChunks.every((c) => c.at > summaryAt));
    assert.equal(cases.at(-1), "done");
    assert.equal(cases.filter((c) => c === "toolSummary").length, 1);

    assert.equal(result.toolCalls.length, 1);
    const [call] = result.toolCalls;
    assert.equal(call?.id, "call_calc");
    assert.equal(call?.name, "calculator");
    assert.deepEqual(JSON.parse(call?.arguments ?? ""), { expression: "6*7" });

    assert.equal(result.toolSummary.results.length, 1);
    const [toolResult] = result.toolSummary.results;
    assert.equal(toolResult?.toolName, "calculator");
    assert.equal(toolResult?.callId, "call_calc");
    assert.equal(toolResult?.outcome, ToolOutcome.OK);
    assert.ok(toolResult?.result !== undefined);
    assert.deepEqual(toJson(ValueSchema, toolResult.result), CALC_RESULT);

    assert.equal(result.synthesisText, "The answer is 42.");
    assert.equal(result.done.text, "The answer is 42.");
    const toolUsage = result.done.toolPhase?.usage;
    const synthesisUsage = result.done.synthesisPhase?.usage;
    assert.ok(toolUsage && toolUsage.totalTokens > 0, "tool phase usage");
    assert.ok(synthesisUsage && synthesisUsage.totalTokens > 0, "synthesis phase usage");
    assert.equal(synthesisUsage.totalTokens, synthesisUsage.promptTokens + synthesisUsage.completionTokens);
  });
});

// --- 2. every unary RPC, and StreamTools -------------------------------------------------------

describe("unary RPCs and StreamTools", () => {
  it("RunTools [calc] returns the calculator result and no text", TEST, async () => {
    const response = await plain().runTools({ userPrompt: "What is 6*7? [calc]" });
    assert.notEqual(response.stageId, "");
    assert.equal(response.text, "");
    assert.equal(response.toolResults.length, 1);
    const [r] = response.toolResults;
    assert.equal(r?.toolName, "calculator");
    assert.equal(r?.outcome, ToolOutcome.OK);
    assert.deepEqual(r?.result && toJson(ValueSchema, r.result), CALC_RESULT);
    assert.ok(response.toolPhase?.usage && response.toolPhase.usage.totalTokens > 0);
  });

  it("RunSynthesis [calc] returns the answer; [text] the tool phase text", TEST, async () => {
    const calc = await plain().runSynthesis({ userPrompt: "What is 6*7? [calc]" });
    assert.equal(calc.text, "The answer is 42.");
    assert.equal(calc.toolResults.length, 1);
    assert.ok(calc.synthesisPhase !== undefined);
    const text = await plain().runSynthesis({ userPrompt: "Hi [text]" });
    assert.equal(text.text, "Hello from the fake model.");
    assert.equal(text.toolResults.length, 0);
  });

  it("ListTools lists the three tools sorted, each with a schema and a Duration timeout", TEST, async () => {
    const tools = await plain().listTools();
    assert.deepEqual(
      tools.map((t) => t.name),
      ["calculator", "current_time", "get_weather"],
    );
    for (const tool of tools) {
      assert.ok(tool.parametersSchema !== undefined, `${tool.name} has no schema`);
      assert.ok(isMessage(tool.timeout, DurationSchema), `${tool.name}.timeout is not a Duration`);
      assert.ok(durationMs(tool.timeout) > 0, `${tool.name}.timeout is not > 0`);
    }
  });

  it("CancelStage of an unknown id fails NOT_FOUND", TEST, async () => {
    const err = await failure(plain().cancelStage(`ts-unknown-${randomUUID()}`));
    assert.equal(err.code, Code.NotFound);
    assert.equal(err.errorReason, ErrorReason.NOT_FOUND);
  });

  it("StreamTools [calc] streams the tool phase only", TEST, async () => {
    const stageId = `ts-tools-${randomUUID()}`;
    const result = await plain().streamTools({ stageId, userPrompt: "What is 6*7? [calc]" }).collect();
    assert.equal(result.stageId, stageId);
    assert.equal(result.synthesisText, "");
    assert.deepEqual(JSON.parse(result.toolCalls[0]?.arguments ?? ""), { expression: "6*7" });
    const [r] = result.toolSummary.results;
    assert.deepEqual(r?.result && toJson(ValueSchema, r.result), CALC_RESULT);
    assert.equal(result.done.synthesisPhase, undefined);
    assert.equal(result.done.text, "");
  });

  it("StreamSynthesis [text]: no tool call, Done.text is the tool phase text", TEST, async () => {
    const result = await plain().streamSynthesis({ userPrompt: "Hi [text]" }).collect();
    assert.equal(result.toolSummary.results.length, 0);
    assert.equal(result.toolText, "Hello from the fake model.");
    assert.equal(result.done.text, "Hello from the fake model.");
  });
});

// --- 3-5. cancellation and deadlines -------------------------------------------------------------

describe("cancellation", () => {
  it("a client-side abort cancels the call and the server closes the backend request", TEST, async () => {
    const tag = `ts-abort-${randomUUID()}`;
    const controller = new AbortController();
    const stream = plain().streamSynthesis({ userPrompt: `[hang tag=${tag}]` }, { signal: controller.signal });
    let chunks = 0;
    const err = await failure(
      drive(stream, (case_) => {
        if (case_ === "chunk") {
          chunks++;
          controller.abort();
        }
      }),
    );
    assert.equal(chunks, 1, `the [hang] stage sent no chunk before the call ended with ${err.message}`);
    assert.equal(err.code, Code.Canceled);
    assert.equal(await backendClosed(tag), true, "the backend request was not closed");
  });

  it("CancelStage from a second connection ends the stream with Cancel(CANCEL_STAGE) + CANCELLED", TEST, async () => {
    const tag = `ts-cancelstage-${randomUUID()}`;
    const stageId = `ts-cancelstage-${randomUUID()}`;
    const other = client(); // its own HTTP/2 connection
    const stream = plain().streamSynthesis({ stageId, userPrompt: `[hang tag=${tag}]` });
    let cancelled = false;
    const err = await failure(
      drive(stream, async (case_) => {
        if (case_ === "chunk" && !cancelled) {
          cancelled = true;
          const response = await other.cancelStage(stageId);
          assert.equal(response.stageId, stageId);
        }
      }),
    );
    assert.ok(cancelled, `the [hang] stage sent no chunk before the call ended with ${err.message}`);
    assert.equal(err.code, Code.Canceled);
    assert.equal(err.cancel?.reason, CancelReason.CANCEL_STAGE);
    assert.equal(err.stageId, stageId);
    assert.equal(await backendClosed(tag), true);
  });

  it("a deadline ends the stream DEADLINE_EXCEEDED", TEST, async () => {
    const tag = `ts-deadline-${randomUUID()}`;
    const stream = plain().streamSynthesis({ userPrompt: `[hang tag=${tag}]` }, { timeoutMs: 1500 });
    const err = await failure(drive(stream));
    assert.equal(err.code, Code.DeadlineExceeded);
    if (err.cancel !== undefined) assert.equal(err.cancel.reason, CancelReason.DEADLINE);
    assert.equal(await backendClosed(tag), true);
  });
});

// --- 6-7. errors with details --------------------------------------------------------------------

describe("errors", () => {
  const fields = (err: ToolchainError) => err.fieldViolations.map((v) => v.field).sort();

  it("an invalid unary request has its two field violations", TEST, async () => {
    const err = await failure(plain().runTools(invalidStage));
    assert.equal(err.code, Code.InvalidArgument);
    assert.equal(err.errorReason, ErrorReason.INVALID_REQUEST);
    assert.equal(err.retryable, false);
    assert.equal(err.retryDelay, undefined);
    assert.deepEqual(fields(err), ["stage.tool_phase.temperature", "stage.user_prompt"]);
    assert.ok(err.fieldViolations.every((v) => v.description !== ""));
  });

  it("an invalid streamed request: one StageError event, sequence 0, a server-made UUID stage_id", TEST, async () => {
    // On the wire, without the helper.
    const events = [];
    let ended: unknown;
    try {
      for await (const message of plain().raw.streamSynthesis({ stage: invalidStage }, { timeoutMs: CALL_MS })) {
        events.push(message.event);
      }
    } catch (e) {
      ended = e;
    }
    assert.ok(ended instanceof ConnectError, `the raw stream did not fail: ${String(ended)}`);
    assert.equal(ended.code, Code.InvalidArgument);
    assert.equal(events.length, 1);
    assert.equal(events[0]?.sequence, 0);
    assert.match(events[0]?.stageId ?? "", UUID);
    assert.equal(events[0]?.event.case, "error");

    // Through the helper: the StageError, checked against the status.
    const err = await failure(drive(plain().streamSynthesis(invalidStage)));
    assert.equal(err.code, Code.InvalidArgument);
    assert.equal(err.errorReason, ErrorReason.INVALID_REQUEST);
    assert.match(err.stageId ?? "", UUID);
    assert.ok(err.stageError !== undefined);
    assert.deepEqual(
      err.stageError.fieldViolations.map((v) => v.field).sort(),
      ["stage.tool_phase.temperature", "stage.user_prompt"],
    );
    assert.deepEqual(fields(err), ["stage.tool_phase.temperature", "stage.user_prompt"]);
  });

  const retryable: [string, string, ErrorReason, number][] = [
    ["[unavailable]", "BACKEND_UNAVAILABLE", ErrorReason.BACKEND_UNAVAILABLE, 3000],
    ["[ratelimited]", "BACKEND_RATE_LIMITED", ErrorReason.BACKEND_RATE_LIMITED, 2000],
  ];
  for (const [marker, reason, errorReason, delayMs] of retryable) {
    it(`${marker} unary: UNAVAILABLE ${reason}, retry delay ${delayMs} ms, phase PHASE_TOOL`, TEST, async () => {
      const err = await failure(plain().runSynthesis({ userPrompt: `Hi ${marker}` }));
      assert.equal(err.code, Code.Unavailable);
      assert.equal(err.reason, reason);
      assert.equal(err.errorReason, errorReason);
      assert.equal(err.domain, "toolchain.v1");
      assert.equal(err.metadata["phase"], "PHASE_TOOL");
      assert.equal(err.phase, Phase.TOOL);
      assert.equal(err.retryable, true);
      assert.equal(err.retryDelayMs, delayMs);
    });

    it(`${marker} stream: StageError.retry_delay == RetryInfo == ${delayMs} ms`, TEST, async () => {
      const err = await failure(drive(plain().streamSynthesis({ userPrompt: `Hi ${marker}` })));
      assert.equal(err.code, Code.Unavailable);
      assert.equal(err.errorReason, errorReason);
      const event = err.stageError;
      assert.ok(event !== undefined, "no StageError event");
      assert.equal(event.retryable, true);
      assert.equal(event.phase, Phase.TOOL);
      assert.ok(event.retryDelay !== undefined);
      assert.equal(durationMs(event.retryDelay), delayMs);
      assert.equal(err.retryDelayMs, delayMs); // from the status's RetryInfo
    });
  }
});

// --- 8-9. auth and TLS -----------------------------------------------------------------------------

describe("auth", () => {
  const authClient = (token?: string) => client({ address: env("TOOLCHAIN_AUTH_ADDR"), token });

  it("no token: UNAUTHENTICATED MISSING_CREDENTIALS (unary and stream)", TEST, async () => {
    const c = authClient();
    const err = await failure(c.listTools());
    assert.equal(err.code, Code.Unauthenticated);
    assert.equal(err.errorReason, ErrorReason.MISSING_CREDENTIALS);
    const streamed = await failure(drive(c.streamTools({ userPrompt: "Hi [text]" })));
    assert.equal(streamed.code, Code.Unauthenticated);
    assert.equal(streamed.errorReason, ErrorReason.MISSING_CREDENTIALS);
  });

  it("a wrong token: UNAUTHENTICATED INVALID_CREDENTIALS", TEST, async () => {
    const err = await failure(authClient("not-the-token").listTools());
    assert.equal(err.code, Code.Unauthenticated);
    assert.equal(err.errorReason, ErrorReason.INVALID_CREDENTIALS);
  });

  it("the token works, unary and streamed", TEST, async () => {
    const c = authClient(env("TOOLCHAIN_TOKEN"));
    assert.equal((await c.listTools()).length, 3);
    const result = await c.streamTools({ userPrompt: "Hi [text]" }).collect();
    assert.equal(result.done.text, "Hello from the fake model.");
  });

  it("Health/Check answers SERVING without a token", TEST, async () => {
    assert.equal(await authClient().checkHealth(), ServingStatus.SERVING);
  });
});

describe("mTLS", () => {
  it("with the CA and a client certificate ListTools works", TEST, async () => {
    const c = client({
      address: env("TOOLCHAIN_TLS_ADDR"),
      tls: {
        caFile: env("TOOLCHAIN_TLS_CA"),
        certFile: env("TOOLCHAIN_TLS_CLIENT_CERT"),
        keyFile: env("TOOLCHAIN_TLS_CLIENT_KEY"),
      },
    });
    assert.equal((await c.listTools()).length, 3);
    const result = await c.streamSynthesis({ userPrompt: "What is 6*7? [calc]" }).collect();
    assert.equal(result.done.text, "The answer is 42.");
  });

  it("without a client certificate the call fails", TEST, async () => {
    const c = client({ address: env("TOOLCHAIN_TLS_ADDR"), tls: { caFile: env("TOOLCHAIN_TLS_CA") } });
    await failure(c.listTools());
  });
});

// --- tool rounds: the [rounds3] scenario ------------------------------------------------------

describe("tool rounds [rounds3]", () => {
  const PROMPT = "What is 6*7 in three steps? [rounds3]";
  const ANSWER = "After three rounds: 42.";
  /** The one calculator call of each round: id, expression, result. */
  const CALLS = [
    { id: "call_r1", expression: "1+1", result: 2 },
    { id: "call_r2", expression: "2*3", result: 6 },
    { id: "call_r3", expression: "6*7", result: 42 },
  ];
  const rounds = (maxRounds: number): StageInit => ({ userPrompt: PROMPT, maxRounds });

  /** The results of rounds 1..n, one OK calculator call each. */
  function checkResults(results: readonly ToolCallResult[], n: number): void {
    assert.equal(results.length, n, `one result per round: ${results.length}`);
    results.forEach((r, i) => checkResult(r, i + 1));
  }

  /** The one call of round `round`. */
  function checkResult(r: ToolCallResult, round: number): void {
    const want = CALLS[round - 1]!;
    assert.equal(r.round, round, `the result of round ${round}: round`);
    assert.equal(r.toolName, "calculator");
    assert.equal(r.callId, want.id);
    assert.equal(r.outcome, ToolOutcome.OK);
    assert.equal(r.error, "");
    assert.equal(r.truncated, false);
    assert.deepEqual(JSON.parse(r.arguments), { expression: want.expression });
    assert.ok(r.result !== undefined);
    const value = toJson(ValueSchema, r.result) as { result?: unknown };
    assert.equal(value.result, want.result, `round ${round}: ${JSON.stringify(value)}`);
  }

  type Tokens = Pick<Usage, "promptTokens" | "completionTokens" | "totalTokens">;
  const sum = (a: Tokens | undefined, b: Tokens | undefined): Tokens => ({
    promptTokens: (a?.promptTokens ?? 0) + (b?.promptTokens ?? 0),
    completionTokens: (a?.completionTokens ?? 0) + (b?.completionTokens ?? 0),
    totalTokens: (a?.totalTokens ?? 0) + (b?.totalTokens ?? 0),
  });
  const plainUsage = (u: Usage | undefined) => u && { promptTokens: u.promptTokens, completionTokens: u.completionTokens, totalTokens: u.totalTokens };

  /**
   * Per-round statistics (rounds 1..n, each with usage), the whole tool phase (round 0,
   * usage summed, the last round's finish reason) and total_usage (every model call).
   */
  function checkStats(stats: { toolRounds: PhaseStats[]; toolPhase?: PhaseStats | undefined; synthesisPhase?: PhaseStats | undefined; totalUsage?: Usage | undefined }, n: number): void {
    assert.deepEqual(
      stats.toolRounds.map((s) => s.round),
      Array.from({ length: n }, (_, i) => i + 1),
      "tool_rounds are rounds 1..n",
    );
    let tools = sum(undefined, undefined);
    for (const s of stats.toolRounds) {
      assert.ok(s.usage && s.usage.totalTokens > 0 && s.usage.totalTokens === s.usage.promptTokens + s.usage.completionTokens, `round ${s.round} usage`);
      tools = sum(tools, s.usage);
    }
    const phase = stats.toolPhase;
    assert.ok(phase !== undefined, "tool_phase");
    // A whole phase is round 0; a phase of one round may carry 1.
    assert.ok(phase.round === 0 || (n === 1 && phase.round === 1), `tool_phase.round ${phase.round}`);
    assert.equal(phase.finishReason, stats.toolRounds.at(-1)?.finishReason, "tool_phase: the last round's finish reason");
    assert.deepEqual(plainUsage(phase.usage), tools, "tool_phase usage: the rounds' summed");
    const total = stats.synthesisPhase ? sum(tools, stats.synthesisPhase.usage) : tools;
    assert.deepEqual(plainUsage(stats.totalUsage), total, "total_usage: every model call's summed");
  }

  /** The stream's layout: each round's chunks before its summary, synthesis chunks last. */
  function checkLayout(result: StageResult, n: number, synthesisRound?: number): void {
    let round = 1;
    for (const e of result.events) {
      if (e.event.case === "chunk") {
        const c = e.event.value;
        if (c.phase === Phase.TOOL) assert.equal(c.round, round, `tool chunk ${e.sequence}`);
        else assert.equal(c.round, synthesisRound, `synthesis chunk ${e.sequence}`);
      } else if (e.event.case === "toolSummary") {
        assert.equal(e.event.value.round, round++, `summary ${e.sequence}`);
      }
    }
    assert.equal(round - 1, n, "summaries");
    assert.deepEqual(
      result.rounds.map((r) => r.round),
      Array.from({ length: n }, (_, i) => i + 1),
    );
  }

  /** The calls assembled from the chunks of rounds 1..n: one per round, index 0 each. */
  function checkAssembled(result: StageResult, n: number): void {
    assert.deepEqual(
      result.toolCalls.map((c) => [c.round, c.index, c.id, c.name, JSON.parse(c.arguments)]),
      CALLS.slice(0, n).map((c, i) => [i + 1, 0, c.id, "calculator", { expression: c.expression }]),
    );
  }

  it("StreamSynthesis, max_rounds 3: three summaries, synthesis as round 4, rounds exhausted", TEST, async () => {
    const stream = plain().streamSynthesis(rounds(3));
    const result = await stream.collect();
    assert.equal(stream.rounds, 3);
    checkLayout(result, 3, 4);
    for (const r of result.rounds) {
      assert.equal(r.toolSummary.results.length, 1, `round ${r.round}: one result`);
      checkResult(r.toolSummary.results[0]!, r.round);
    }
    checkResults(result.rounds.flatMap((r) => r.toolSummary.results), 3);
    checkAssembled(result, 3);
    assert.equal(result.synthesisText, ANSWER);
    assert.equal(result.done.text, ANSWER);
    assert.equal(result.done.roundsExhausted, true);
    assert.ok(result.done.synthesisPhase !== undefined);
    checkStats(result.done, 3);
  });

  it("RunSynthesis, max_rounds 3: the results of rounds 1..3, the answer, rounds exhausted", TEST, async () => {
    const response = await plain().runSynthesis(rounds(3));
    checkResults(response.toolResults, 3);
    assert.equal(response.text, ANSWER);
    assert.equal(response.roundsExhausted, true);
    assert.ok(response.synthesisPhase !== undefined);
    checkStats(response, 3);
  });

  it("StreamTools, max_rounds 3: three summaries, no text, rounds exhausted", TEST, async () => {
    const result = await plain().streamTools(rounds(3)).collect();
    checkLayout(result, 3);
    checkResults(result.rounds.flatMap((r) => r.toolSummary.results), 3);
    checkAssembled(result, 3);
    assert.equal(result.synthesisText, "");
    assert.equal(result.done.text, "");
    assert.equal(result.done.roundsExhausted, true);
    assert.equal(result.done.synthesisPhase, undefined);
    checkStats(result.done, 3);
  });

  it("StreamTools, max_rounds 4: the fourth round answers in text, its summary empty, not exhausted", TEST, async () => {
    const result = await plain().streamTools(rounds(4)).collect();
    checkLayout(result, 4);
    checkResults(result.rounds.slice(0, 3).flatMap((r) => r.toolSummary.results), 3);
    assert.deepEqual(result.rounds[3]?.toolSummary.results, []);
    assert.equal(result.rounds[3]?.toolText, ANSWER);
    checkAssembled(result, 3);
    assert.ok(result.events.every((e) => e.event.case !== "chunk" || e.event.value.phase === Phase.TOOL), "no synthesis chunks");
    assert.equal(result.done.text, ANSWER);
    assert.equal(result.done.roundsExhausted, false);
    assert.equal(result.done.synthesisPhase, undefined);
    checkStats(result.done, 4);
  });

  it("RunTools, max_rounds 4: three results, the fourth round's text, not exhausted", TEST, async () => {
    const response = await plain().runTools(rounds(4));
    checkResults(response.toolResults, 3);
    assert.equal(response.text, ANSWER);
    assert.equal(response.roundsExhausted, false);
    checkStats(response, 4);
  });

  it("max_rounds unset: exactly one round, then the synthesis phase as round 2", TEST, async () => {
    const result = await plain().streamSynthesis({ userPrompt: PROMPT }).collect();
    checkLayout(result, 1, 2);
    checkResults(result.toolSummary.results, 1);
    assert.equal(result.done.text, ANSWER);
    // One round is the classic stage: never "exhausted" (StageRequest.max_rounds).
    assert.equal(result.done.roundsExhausted, false);
    checkStats(result.done, 1);
  });

  it("tool_choice NONE on [calc]: no tools offered, the model answers in text", TEST, async () => {
    const stage: StageInit = { userPrompt: "What is 6*7? [calc]", toolChoice: { choice: { case: "mode", value: ToolChoiceMode.NONE } } };
    const result = await plain().streamSynthesis(stage).collect();
    checkLayout(result, 1);
    assert.deepEqual(result.toolSummary.results, []);
    assert.deepEqual(result.toolCalls, []);
    assert.equal(result.toolText, "The answer is 42.");
    assert.equal(result.synthesisText, "");
    assert.equal(result.done.text, "The answer is 42.");
    assert.equal(result.done.synthesisPhase, undefined);
    assert.equal(result.done.roundsExhausted, false);
    const response = await plain().runTools(stage);
    assert.deepEqual(response.toolResults, []);
    assert.equal(response.text, "The answer is 42.");
  });

  for (const maxRounds of [0, 1000]) {
    it(`max_rounds ${maxRounds} fails INVALID_ARGUMENT on stage.max_rounds, unary and streamed`, TEST, async () => {
      for (const call of [() => plain().runSynthesis(rounds(maxRounds)), () => plain().streamTools(rounds(maxRounds)).collect()]) {
        const err = await failure(call());
        assert.equal(err.code, Code.InvalidArgument);
        assert.equal(err.errorReason, ErrorReason.INVALID_REQUEST);
        assert.deepEqual(
          err.fieldViolations.map((v) => v.field),
          ["stage.max_rounds"],
        );
        assert.notEqual(err.fieldViolations[0]?.description, "");
      }
    });
  }
});

// --- 10. reasons -------------------------------------------------------------------------------

describe("reasons", () => {
  it("every ErrorInfo reason received is a known ErrorReason name", () => {
    env("TOOLCHAIN_ADDR");
    // failure() checked each one as it came; here: the tests above did receive reasons.
    for (const reason of reasonsSeen) assert.notEqual(errorReasonOf(reason), undefined, reason);
    for (const expected of ["NOT_FOUND", "INVALID_REQUEST", "BACKEND_UNAVAILABLE", "BACKEND_RATE_LIMITED", "MISSING_CREDENTIALS", "INVALID_CREDENTIALS"]) {
      assert.ok(reasonsSeen.has(expected), `no ${expected} was received (seen: ${[...reasonsSeen].join(", ")})`);
    }
  });
});
