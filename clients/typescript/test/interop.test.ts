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
  ToolOutcome,
  durationMs,
  errorReasonOf,
  type StageInit,
  type StageStream,
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
