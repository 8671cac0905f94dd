package io.toolchaingrpc.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import com.google.protobuf.Struct;
import com.google.protobuf.Value;
import com.google.protobuf.util.JsonFormat;
import io.grpc.Status;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthCheckResponse;
import io.grpc.health.v1.HealthGrpc;
import io.toolchaingrpc.toolchain.v1.CancelReason;
import io.toolchaingrpc.toolchain.v1.Done;
import io.toolchaingrpc.toolchain.v1.ErrorReason;
import io.toolchaingrpc.toolchain.v1.Phase;
import io.toolchaingrpc.toolchain.v1.PhaseOptions;
import io.toolchaingrpc.toolchain.v1.PhaseStats;
import io.toolchaingrpc.toolchain.v1.RunSynthesisResponse;
import io.toolchaingrpc.toolchain.v1.RunToolsResponse;
import io.toolchaingrpc.toolchain.v1.StageError;
import io.toolchaingrpc.toolchain.v1.StageEvent;
import io.toolchaingrpc.toolchain.v1.StageRequest;
import io.toolchaingrpc.toolchain.v1.Tool;
import io.toolchaingrpc.toolchain.v1.ToolCallResult;
import io.toolchaingrpc.toolchain.v1.ToolChoice;
import io.toolchaingrpc.toolchain.v1.ToolChoiceMode;
import io.toolchaingrpc.toolchain.v1.ToolOutcome;
import io.toolchaingrpc.toolchain.v1.ToolSummary;
import io.toolchaingrpc.toolchain.v1.Usage;
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * The client against the live servers of the interop harness. Run through it:
 *
 * <pre>
 * .venv/bin/python -m tests.interop.serve -- bash -c 'cd clients/java &amp;&amp; mvn -B -q test'
 * </pre>
 */
class InteropTest {

  /** Every wait is bounded by a call deadline this long (a slow shared CI machine). */
  private static final Duration TIMEOUT = Duration.ofSeconds(30);

  private static ToolchainClient plain;

  @BeforeAll
  static void connect() {
    plain = ToolchainClient.builder(env("TOOLCHAIN_ADDR")).timeout(TIMEOUT).build();
  }

  @AfterAll
  static void disconnect() {
    if (plain != null) {
      plain.close();
    }
  }

  static String env(String name) {
    String value = System.getenv(name);
    if (value == null || value.isEmpty()) {
      fail(name + " is not set: run through python -m tests.interop.serve, from the repository root:"
          + " .venv/bin/python -m tests.interop.serve -- bash -c 'cd clients/java && mvn -B test'");
    }
    return value;
  }

  static StageRequest stage(String prompt) {
    return StageRequest.newBuilder().setUserPrompt(prompt).build();
  }

  static String tag() {
    return "java-" + UUID.randomUUID();
  }

  /** Every ErrorInfo reason the server sends is a known ErrorReason name in domain toolchain.v1. */
  static ToolchainException known(ToolchainException e) {
    assertTrue(e.errorReason().isPresent(), () -> "unknown or missing reason \"" + e.reason() + "\": " + e);
    assertTrue(e.errorReason().get() != ErrorReason.ERROR_REASON_UNSPECIFIED, e::toString);
    assertEquals(ToolchainException.DOMAIN, e.domain(), e::toString);
    return e;
  }

  /** A status that carries a reason at all (CANCELLED, DEADLINE_EXCEEDED may not) carries a known one. */
  static ToolchainException knownIfAny(ToolchainException e) {
    return e.reason().isEmpty() ? e : known(e);
  }

  static Struct json(String text) {
    Struct.Builder b = Struct.newBuilder();
    try {
      JsonFormat.parser().merge(text, b);
    } catch (Exception e) {
      fail("not a JSON object: " + text, e);
    }
    return b.build();
  }

  /** Reads events until the first chunk of a hanging stage (bounded by the call's deadline). */
  static StageEvent firstChunk(Iterator<StageEvent> events) {
    assertTrue(events.hasNext(), "the stream ended before its first event");
    StageEvent first = events.next();
    assertTrue(first.hasChunk(), () -> "first event is not a chunk: " + first);
    assertEquals(Phase.PHASE_TOOL, first.getChunk().getPhase());
    return first;
  }

  static boolean backendClosed(String tag) throws Exception {
    String url = env("TOOLCHAIN_FAKE_URL") + "/interop/closed?timeout=20&tag="
        + URLEncoder.encode(tag, StandardCharsets.UTF_8);
    HttpClient http = HttpClient.newBuilder().connectTimeout(TIMEOUT).build();
    HttpResponse<String> response = http.send(
        HttpRequest.newBuilder(URI.create(url)).timeout(TIMEOUT).GET().build(),
        HttpResponse.BodyHandlers.ofString());
    assertEquals(200, response.statusCode(), response.body());
    Value closed = json(response.body()).getFieldsOrThrow("closed");
    return closed.getBoolValue();
  }

  static void assertUsage(PhaseStats stats) {
    assertTrue(stats.hasUsage(), () -> "no usage: " + stats);
    assertTrue(stats.getUsage().getTotalTokens() > 0, stats::toString);
    assertEquals(
        stats.getUsage().getPromptTokens() + stats.getUsage().getCompletionTokens(),
        stats.getUsage().getTotalTokens());
  }

  static void assertCalculator42(List<ToolCallResult> results) {
    assertEquals(1, results.size(), results::toString);
    ToolCallResult r = results.get(0);
    assertEquals("calculator", r.getToolName());
    assertEquals("call_calc", r.getCallId());
    assertEquals(ToolOutcome.TOOL_OUTCOME_OK, r.getOutcome(), r::toString);
    // The calculator answers {"expression": "6*7", "result": 42}.
    Value result = r.getResult();
    assertTrue(result.hasStructValue(), r::toString);
    assertEquals(42.0, result.getStructValue().getFieldsOrThrow("result").getNumberValue(), r::toString);
    assertEquals("6*7", result.getStructValue().getFieldsOrThrow("expression").getStringValue(), r::toString);
    assertEquals("6*7", json(r.getArguments()).getFieldsOrThrow("expression").getStringValue());
  }

  // 1. A full streamed stage, every event type checked.
  @Test
  void streamSynthesisCalc() {
    List<StageEvent> events = new ArrayList<>();
    try (StageStream stream = plain.streamSynthesis(stage("What is 6*7? [calc]"))) {
      for (StageEvent event : stream) {
        events.add(event);
      }
      assertTrue(stream.isEnded());

      // The order: tool chunks, the summary, synthesis chunks, Done.
      List<String> kinds = new ArrayList<>();
      for (StageEvent e : events) {
        String kind = e.hasChunk() ? "chunk:" + e.getChunk().getPhase() : e.getEventCase().name();
        if (kinds.isEmpty() || !kinds.get(kinds.size() - 1).equals(kind)) {
          kinds.add(kind);
        }
      }
      assertEquals(
          List.of("chunk:PHASE_TOOL", "TOOL_SUMMARY", "chunk:PHASE_SYNTHESIS", "DONE"), kinds);
      for (int i = 0; i < events.size(); i++) {
        assertEquals(i, events.get(i).getSequence());
        assertEquals(stream.stageId(), events.get(i).getStageId());
      }
      assertFalse(stream.stageId().isEmpty());

      // Tool-call deltas assemble to calculator({"expression": "6*7"}).
      assertTrue(events.stream().anyMatch(e -> e.hasChunk() && e.getChunk().getToolCallsCount() > 0));
      List<ToolCall> calls = stream.toolCalls();
      assertEquals(1, calls.size(), calls::toString);
      assertEquals(0, calls.get(0).index());
      assertEquals("call_calc", calls.get(0).id());
      assertEquals("calculator", calls.get(0).name());
      assertEquals("6*7", json(calls.get(0).arguments()).getFieldsOrThrow("expression").getStringValue());

      ToolSummary summary = stream.toolSummary().orElseThrow();
      assertCalculator42(summary.getResultsList());

      long synthesisChunks = events.stream()
          .filter(e -> e.hasChunk() && e.getChunk().getPhase() == Phase.PHASE_SYNTHESIS).count();
      assertTrue(synthesisChunks > 1, "the answer came in one chunk");
      assertEquals("The answer is 42.", stream.content(Phase.PHASE_SYNTHESIS));

      Done done = stream.done().orElseThrow();
      assertEquals(done, events.get(events.size() - 1).getDone());
      assertEquals("The answer is 42.", done.getText());
      assertUsage(done.getToolPhase());
      assertUsage(done.getSynthesisPhase());
    }
  }

  // 2. Every unary RPC, and StreamTools.
  @Test
  void runTools() {
    RunToolsResponse r = plain.runTools(stage("What is 6*7? [calc]"));
    assertFalse(r.getStageId().isEmpty());
    assertCalculator42(r.getToolResultsList());
    assertEquals("", r.getText());
    assertUsage(r.getToolPhase());
  }

  @Test
  void runSynthesis() {
    RunSynthesisResponse r = plain.runSynthesis(stage("What is 6*7? [calc]"));
    assertEquals("The answer is 42.", r.getText());
    assertCalculator42(r.getToolResultsList());
    assertUsage(r.getToolPhase());
    assertUsage(r.getSynthesisPhase());
  }

  @Test
  void runSynthesisWithoutToolCall() {
    String id = tag();
    RunSynthesisResponse r = plain.runSynthesis(stage("Say hello [text]").toBuilder().setStageId(id).build());
    assertEquals(id, r.getStageId());
    assertEquals("Hello from the fake model.", r.getText());
    assertEquals(0, r.getToolResultsCount());
    assertFalse(r.hasSynthesisPhase());
  }

  @Test
  void listTools() {
    List<Tool> tools = plain.listTools();
    assertEquals(List.of("calculator", "current_time", "get_weather"),
        tools.stream().map(Tool::getName).toList());
    for (Tool tool : tools) {
      assertTrue(tool.getParametersSchema().getFieldsCount() > 0, tool::toString);
      assertTrue(tool.hasTimeout(), tool::toString);
      assertTrue(ToolchainException.toDuration(tool.getTimeout()).compareTo(Duration.ZERO) > 0, tool::toString);
    }
  }

  @Test
  void cancelStageUnknownId() {
    ToolchainException e = known(assertThrows(ToolchainException.class, () -> plain.cancelStage(tag())));
    assertEquals(Status.Code.NOT_FOUND, e.code());
    assertEquals(ErrorReason.NOT_FOUND, e.errorReason().orElseThrow());
    assertFalse(e.retryable());
  }

  @Test
  void streamToolsCalc() {
    try (StageStream stream = plain.streamTools(stage("What is 6*7? [calc]"))) {
      Done done = stream.result();
      assertCalculator42(stream.toolSummary().orElseThrow().getResultsList());
      assertEquals("calculator", stream.toolCalls().get(0).name());
      assertEquals("", stream.content(Phase.PHASE_SYNTHESIS));
      assertEquals("", done.getText());
      assertUsage(done.getToolPhase());
      assertFalse(done.hasSynthesisPhase());
    }
  }

  @Test
  void streamSynthesisWithoutToolCall() {
    try (StageStream stream = plain.streamSynthesis(stage("Say hello [text]"))) {
      Done done = stream.result();
      assertEquals(0, stream.toolSummary().orElseThrow().getResultsCount());
      assertEquals("Hello from the fake model.", done.getText());
      assertEquals("Hello from the fake model.", stream.content(Phase.PHASE_TOOL));
      assertFalse(done.hasSynthesisPhase());
    }
  }

  // Tool rounds: the [rounds3] scenario, one calculator call per round, then the text answer.
  static final String ROUNDS3 = "What is 6*7 in three steps? [rounds3]";
  static final String ROUNDS_ANSWER = "After three rounds: 42.";
  /** The call of each round: id, expression, result. */
  static final List<List<Object>> ROUND_CALLS = List.of(
      List.of("call_r1", "1+1", 2.0), List.of("call_r2", "2*3", 6.0), List.of("call_r3", "6*7", 42.0));

  static StageRequest rounds(int maxRounds) {
    return stage(ROUNDS3).toBuilder().setMaxRounds(maxRounds).build();
  }

  /** The one call of round {@code round} (from 1). */
  static void assertRoundResult(ToolCallResult r, int round) {
    List<Object> want = ROUND_CALLS.get(round - 1);
    assertEquals(round, r.getRound(), r::toString);
    assertEquals("calculator", r.getToolName());
    assertEquals(want.get(0), r.getCallId());
    assertEquals(ToolOutcome.TOOL_OUTCOME_OK, r.getOutcome(), r::toString);
    assertEquals("", r.getError());
    assertFalse(r.getTruncated());
    assertEquals(want.get(1), json(r.getArguments()).getFieldsOrThrow("expression").getStringValue());
    assertTrue(r.getResult().hasStructValue(), r::toString);
    assertEquals(want.get(2), r.getResult().getStructValue().getFieldsOrThrow("result").getNumberValue(), r::toString);
  }

  /** The results of rounds 1..n, one per round. */
  static void assertRoundResults(List<ToolCallResult> results, int n) {
    assertEquals(n, results.size(), results::toString);
    for (int i = 0; i < n; i++) {
      assertRoundResult(results.get(i), i + 1);
    }
  }

  /** Each round's summary: round r, with the one call of round r (rounds 1..withCalls). */
  static void assertSummaries(StageStream stream, int n, int withCalls) {
    List<ToolSummary> summaries = stream.toolSummaries();
    assertEquals(n, summaries.size(), summaries::toString);
    assertEquals(n, stream.rounds());
    for (int i = 0; i < n; i++) {
      ToolSummary s = summaries.get(i);
      assertEquals(i + 1, s.getRound(), s::toString);
      if (i < withCalls) {
        assertEquals(1, s.getResultsCount(), s::toString);
        assertRoundResult(s.getResults(0), i + 1);
      } else {
        assertEquals(0, s.getResultsCount(), s::toString);
      }
    }
    List<ToolCall> calls = stream.toolCalls();
    assertEquals(withCalls, calls.size(), calls::toString);
    for (int i = 0; i < withCalls; i++) {
      ToolCall c = calls.get(i);
      assertEquals(i + 1, c.round(), c::toString);
      assertEquals(0, c.index(), c::toString);
      assertEquals(ROUND_CALLS.get(i).get(0), c.id());
      assertEquals(ROUND_CALLS.get(i).get(1), json(c.arguments()).getFieldsOrThrow("expression").getStringValue());
    }
  }

  static Usage plus(Usage a, Usage b) {
    return Usage.newBuilder()
        .setPromptTokens(a.getPromptTokens() + b.getPromptTokens())
        .setCompletionTokens(a.getCompletionTokens() + b.getCompletionTokens())
        .setTotalTokens(a.getTotalTokens() + b.getTotalTokens())
        .build();
  }

  /**
   * Per-round statistics (rounds 1..n, each with usage), the whole tool phase (round 0, usage
   * summed, the last round's finish reason), total_usage (every model call, the synthesis phase's
   * too when there was one).
   */
  static void assertRoundStats(List<PhaseStats> toolRounds, PhaseStats toolPhase, PhaseStats synthesis, Usage total, boolean hasTotal) {
    int n = toolRounds.size();
    Usage sum = Usage.getDefaultInstance();
    for (int i = 0; i < n; i++) {
      assertEquals(i + 1, toolRounds.get(i).getRound(), toolRounds::toString);
      assertUsage(toolRounds.get(i));
      sum = plus(sum, toolRounds.get(i).getUsage());
    }
    // A whole phase is round 0; a phase of one round may carry 1.
    assertTrue(toolPhase.getRound() == 0 || (n == 1 && toolPhase.getRound() == 1), toolPhase::toString);
    assertEquals(toolRounds.get(n - 1).getFinishReason(), toolPhase.getFinishReason(), "tool_phase: the last round's finish reason");
    assertEquals(sum, toolPhase.getUsage(), "tool_phase usage: the rounds' summed");
    if (synthesis != null) {
      assertUsage(synthesis);
      sum = plus(sum, synthesis.getUsage());
    }
    assertTrue(hasTotal, "no total_usage");
    assertEquals(sum, total, "total_usage: every model call's summed");
  }

  /** Each chunk's round: tool chunks the round in progress, synthesis chunks {@code synthesisRound}. */
  static void assertChunkRounds(List<StageEvent> events, int synthesisRound) {
    int round = 1;
    for (StageEvent e : events) {
      if (e.hasToolSummary()) {
        round++;
      } else if (e.hasChunk()) {
        int want = e.getChunk().getPhase() == Phase.PHASE_SYNTHESIS ? synthesisRound : round;
        assertEquals(want, e.getChunk().getRound(), e::toString);
      }
    }
  }

  @Test
  void streamSynthesisThreeRounds() {
    List<StageEvent> events = new ArrayList<>();
    try (StageStream stream = plain.streamSynthesis(rounds(3))) {
      stream.forEach(events::add);
      assertSummaries(stream, 3, 3);
      assertChunkRounds(events, 4);
      assertTrue(events.stream().anyMatch(e -> e.hasChunk() && e.getChunk().getPhase() == Phase.PHASE_SYNTHESIS));
      assertEquals(ROUNDS_ANSWER, stream.content(Phase.PHASE_SYNTHESIS));
      Done done = stream.done().orElseThrow();
      assertEquals(ROUNDS_ANSWER, done.getText());
      assertTrue(done.getRoundsExhausted());
      assertTrue(done.hasSynthesisPhase());
      assertRoundStats(done.getToolRoundsList(), done.getToolPhase(), done.getSynthesisPhase(), done.getTotalUsage(), done.hasTotalUsage());
      assertEquals(3, done.getToolRoundsCount());
    }
  }

  @Test
  void runSynthesisThreeRounds() {
    RunSynthesisResponse r = plain.runSynthesis(rounds(3));
    assertRoundResults(r.getToolResultsList(), 3);
    assertEquals(ROUNDS_ANSWER, r.getText());
    assertTrue(r.getRoundsExhausted());
    assertTrue(r.hasSynthesisPhase());
    assertEquals(3, r.getToolRoundsCount());
    assertRoundStats(r.getToolRoundsList(), r.getToolPhase(), r.getSynthesisPhase(), r.getTotalUsage(), r.hasTotalUsage());
  }

  @Test
  void streamToolsThreeRounds() {
    List<StageEvent> events = new ArrayList<>();
    try (StageStream stream = plain.streamTools(rounds(3))) {
      stream.forEach(events::add);
      assertSummaries(stream, 3, 3);
      assertChunkRounds(events, -1);
      Done done = stream.done().orElseThrow();
      assertTrue(done.getRoundsExhausted());
      assertEquals("", done.getText());
      assertFalse(done.hasSynthesisPhase());
      assertEquals(3, done.getToolRoundsCount());
      assertRoundStats(done.getToolRoundsList(), done.getToolPhase(), null, done.getTotalUsage(), done.hasTotalUsage());
    }
  }

  @Test
  void streamToolsFourRounds() {
    List<StageEvent> events = new ArrayList<>();
    try (StageStream stream = plain.streamTools(rounds(4))) {
      stream.forEach(events::add);
      assertSummaries(stream, 4, 3);
      assertChunkRounds(events, -1);
      assertEquals(ROUNDS_ANSWER, stream.toolContent(4));
      assertTrue(events.stream().noneMatch(e -> e.hasChunk() && e.getChunk().getPhase() != Phase.PHASE_TOOL));
      Done done = stream.done().orElseThrow();
      assertFalse(done.getRoundsExhausted());
      assertEquals(ROUNDS_ANSWER, done.getText());
      assertFalse(done.hasSynthesisPhase());
      assertEquals(4, done.getToolRoundsCount());
      assertRoundStats(done.getToolRoundsList(), done.getToolPhase(), null, done.getTotalUsage(), done.hasTotalUsage());
    }
  }

  @Test
  void runToolsFourRounds() {
    RunToolsResponse r = plain.runTools(rounds(4));
    assertRoundResults(r.getToolResultsList(), 3);
    assertEquals(ROUNDS_ANSWER, r.getText());
    assertFalse(r.getRoundsExhausted());
    assertEquals(4, r.getToolRoundsCount());
    assertRoundStats(r.getToolRoundsList(), r.getToolPhase(), null, r.getTotalUsage(), r.hasTotalUsage());
  }

  @Test
  void defaultIsOneRound() {
    List<StageEvent> events = new ArrayList<>();
    try (StageStream stream = plain.streamSynthesis(stage(ROUNDS3))) {
      stream.forEach(events::add);
      assertSummaries(stream, 1, 1);
      assertChunkRounds(events, 2);
      Done done = stream.done().orElseThrow();
      assertEquals(ROUNDS_ANSWER, done.getText());
      // One round is the classic stage: never "exhausted" (StageRequest.max_rounds).
      assertFalse(done.getRoundsExhausted(), done::toString);
      assertEquals(1, done.getToolRoundsCount());
      assertRoundStats(done.getToolRoundsList(), done.getToolPhase(), done.getSynthesisPhase(), done.getTotalUsage(), done.hasTotalUsage());
    }
  }

  @Test
  void toolChoiceNone() {
    StageRequest request = stage("What is 6*7? [calc]").toBuilder()
        .setToolChoice(ToolChoice.newBuilder().setMode(ToolChoiceMode.TOOL_CHOICE_MODE_NONE))
        .build();
    try (StageStream stream = plain.streamSynthesis(request)) {
      Done done = stream.result();
      assertSummaries(stream, 1, 0);
      assertEquals("The answer is 42.", stream.toolContent(1));
      assertEquals("", stream.content(Phase.PHASE_SYNTHESIS));
      assertEquals("The answer is 42.", done.getText());
      assertFalse(done.hasSynthesisPhase());
      assertFalse(done.getRoundsExhausted());
    }
    RunToolsResponse r = plain.runTools(request);
    assertEquals(0, r.getToolResultsCount());
    assertEquals("The answer is 42.", r.getText());
  }

  @Test
  void invalidMaxRounds() {
    for (int maxRounds : new int[] {0, 1000}) {
      List<ToolchainException> errors = new ArrayList<>();
      errors.add(assertThrows(ToolchainException.class, () -> plain.runSynthesis(rounds(maxRounds))));
      try (StageStream stream = plain.streamTools(rounds(maxRounds))) {
        errors.add(assertThrows(ToolchainException.class, stream::result));
      }
      for (ToolchainException e : errors) {
        known(e);
        assertEquals(Status.Code.INVALID_ARGUMENT, e.code(), e::toString);
        assertEquals(ErrorReason.INVALID_REQUEST, e.errorReason().orElseThrow());
        assertEquals(List.of("stage.max_rounds"), e.fieldViolations().stream().map(FieldViolation::field).toList(), e::toString);
        assertFalse(e.fieldViolations().get(0).description().isEmpty());
      }
    }
  }

  // 3. A client cancel closes the backend request.
  @Test
  void clientCancelClosesBackendRequest() throws Exception {
    String tag = tag();
    StageStream stream = plain.withTimeout(Duration.ofSeconds(60)).streamSynthesis(stage("Think [hang tag=" + tag + "]"));
    Iterator<StageEvent> events = stream.iterator();
    assertEquals("thinking", firstChunk(events).getChunk().getContent());
    stream.cancel();
    ToolchainException e = knownIfAny(assertThrows(ToolchainException.class, events::hasNext));
    assertEquals(Status.Code.CANCELLED, e.code());
    assertTrue(backendClosed(tag), "the backend request of a cancelled stream was not closed");
  }

  // 3b. Closing a stream before its end (try-with-resources) cancels it too.
  @Test
  void closingAStreamCancelsIt() throws Exception {
    String tag = tag();
    try (StageStream stream = plain.withTimeout(Duration.ofSeconds(60)).streamTools(stage("Think [hang tag=" + tag + "]"))) {
      firstChunk(stream.iterator());
    }
    assertTrue(backendClosed(tag), "the backend request of a closed stream was not closed");
  }

  // 4. CancelStage from a second connection.
  @Test
  void cancelStageFromSecondConnection() throws Exception {
    String tag = tag();
    String id = tag;
    StageRequest request = stage("Think [hang tag=" + tag + "]").toBuilder().setStageId(id).build();
    try (ToolchainClient second = ToolchainClient.builder(env("TOOLCHAIN_ADDR")).timeout(TIMEOUT).build();
        StageStream stream = plain.withTimeout(Duration.ofSeconds(60)).streamSynthesis(request)) {
      Iterator<StageEvent> events = stream.iterator();
      assertEquals(id, firstChunk(events).getStageId());
      assertEquals(id, second.cancelStage(id).getStageId());
      StageEvent last = null;
      ToolchainException e = null;
      try {
        while (events.hasNext()) {
          last = events.next();
        }
      } catch (ToolchainException thrown) {
        e = thrown;
      }
      assertTrue(e != null, "the stream ended without an error after CancelStage");
      knownIfAny(e);
      assertEquals(Status.Code.CANCELLED, e.code(), e::toString);
      assertTrue(last != null && last.hasCancel(), "no Cancel event");
      assertEquals(CancelReason.CANCEL_REASON_CANCEL_STAGE, e.cancel().orElseThrow().getReason());
      assertEquals(last.getCancel(), e.cancel().get());
    }
    assertTrue(backendClosed(tag));
  }

  // 5. A deadline.
  @Test
  void deadlineExceeded() throws Exception {
    String tag = tag();
    try (StageStream stream = plain.withTimeout(Duration.ofSeconds(2)).streamSynthesis(stage("Think [hang tag=" + tag + "]"))) {
      List<StageEvent> events = new ArrayList<>();
      ToolchainException e = knownIfAny(assertThrows(ToolchainException.class, () -> stream.forEach(events::add)));
      assertEquals(Status.Code.DEADLINE_EXCEEDED, e.code(), e::toString);
      e.cancel().ifPresent(c -> assertEquals(c, events.get(events.size() - 1).getCancel()));
      // Either Cancel(DEADLINE) then the status, or the status alone.
      e.cancel().ifPresent(c -> assertEquals(CancelReason.CANCEL_REASON_DEADLINE, c.getReason()));
      assertTrue(events.stream().noneMatch(ev -> ev.hasDone() || ev.hasError()));
      if (events.stream().anyMatch(StageEvent::hasChunk)) {
        // The backend request had started (on a slow machine the deadline may pass before).
        assertTrue(backendClosed(tag), "the backend request of an expired stream was not closed");
      }
    }
  }

  // 6. An invalid request: two field violations, unary and streamed.
  static StageRequest invalid() {
    return StageRequest.newBuilder()
        .setUserPrompt("")
        .setToolPhase(PhaseOptions.newBuilder().setTemperature(3.0))
        .build();
  }

  static void assertInvalid(ToolchainException e) {
    known(e);
    assertEquals(Status.Code.INVALID_ARGUMENT, e.code(), e::toString);
    assertEquals(ErrorReason.INVALID_REQUEST, e.errorReason().orElseThrow());
    assertEquals(Set.of("stage.user_prompt", "stage.tool_phase.temperature"),
        Set.copyOf(e.fieldViolations().stream().map(FieldViolation::field).toList()));
    assertEquals(2, e.fieldViolations().size(), e.fieldViolations()::toString);
    e.fieldViolations().forEach(v -> assertFalse(v.description().isEmpty(), v::toString));
    assertFalse(e.retryable());
    assertTrue(e.retryDelay().isEmpty());
  }

  @Test
  void invalidRequestUnary() {
    assertInvalid(assertThrows(ToolchainException.class, () -> plain.runTools(invalid())));
  }

  @Test
  void invalidRequestStream() {
    List<StageEvent> events = new ArrayList<>();
    try (StageStream stream = plain.streamSynthesis(invalid())) {
      ToolchainException e = assertThrows(ToolchainException.class, () -> stream.forEach(events::add));
      assertInvalid(e);
      assertEquals(1, events.size(), events::toString);
      StageEvent only = events.get(0);
      assertEquals(0, only.getSequence());
      assertTrue(only.hasError());
      assertEquals(only.getError(), e.stageError().orElseThrow());
      assertEquals(UUID.fromString(only.getStageId()).toString(), only.getStageId().toLowerCase());
      assertEquals(2, only.getError().getFieldViolationsCount());
      assertEquals(Phase.PHASE_UNSPECIFIED, e.phase());
    }
  }

  // 7. Retryable errors with their delay.
  static void assertRetryable(ToolchainException e, ErrorReason reason, Duration delay) {
    known(e);
    assertEquals(Status.Code.UNAVAILABLE, e.code(), e::toString);
    assertEquals(reason, e.errorReason().orElseThrow());
    assertEquals(reason.name(), e.reason());
    assertTrue(e.retryable());
    assertEquals(delay, e.retryDelay().orElseThrow());
    assertEquals("PHASE_TOOL", e.metadata().get("phase"), e.metadata()::toString);
    assertEquals(Phase.PHASE_TOOL, e.phase());
    assertFalse(e.statusMessage().isEmpty());
  }

  @Test
  void unavailableUnary() {
    ToolchainException e = assertThrows(ToolchainException.class, () -> plain.runSynthesis(stage("Hi [unavailable]")));
    assertRetryable(e, ErrorReason.BACKEND_UNAVAILABLE, Duration.ofSeconds(3));
    assertTrue(e.stageError().isEmpty());
  }

  @Test
  void unavailableStream() {
    try (StageStream stream = plain.streamSynthesis(stage("Hi [unavailable]"))) {
      ToolchainException e = assertThrows(ToolchainException.class, stream::result);
      assertRetryable(e, ErrorReason.BACKEND_UNAVAILABLE, Duration.ofSeconds(3));
      StageError event = e.stageError().orElseThrow();
      assertTrue(event.getRetryable());
      assertEquals(Duration.ofSeconds(3), ToolchainException.toDuration(event.getRetryDelay()));
      assertEquals(Status.Code.UNAVAILABLE.value(), event.getCode());
      assertEquals(Phase.PHASE_TOOL, event.getPhase());
      assertTrue(stream.toolSummary().isEmpty());
    }
  }

  @Test
  void rateLimitedUnary() {
    ToolchainException e = assertThrows(ToolchainException.class, () -> plain.runTools(stage("Hi [ratelimited]")));
    assertRetryable(e, ErrorReason.BACKEND_RATE_LIMITED, Duration.ofSeconds(2));
  }

  @Test
  void rateLimitedStream() {
    try (StageStream stream = plain.streamTools(stage("Hi [ratelimited]"))) {
      ToolchainException e = assertThrows(ToolchainException.class, stream::result);
      assertRetryable(e, ErrorReason.BACKEND_RATE_LIMITED, Duration.ofSeconds(2));
      assertEquals(Duration.ofSeconds(2), ToolchainException.toDuration(e.stageError().orElseThrow().getRetryDelay()));
    }
  }

  // 8. Bearer auth, and health without a token.
  @Test
  void authMissingToken() {
    try (ToolchainClient client = ToolchainClient.builder(env("TOOLCHAIN_AUTH_ADDR")).timeout(TIMEOUT).build()) {
      ToolchainException e = known(assertThrows(ToolchainException.class, client::listTools));
      assertEquals(Status.Code.UNAUTHENTICATED, e.code());
      assertEquals(ErrorReason.MISSING_CREDENTIALS, e.errorReason().orElseThrow());
      try (StageStream stream = client.streamSynthesis(stage("What is 6*7? [calc]"))) {
        ToolchainException s = known(assertThrows(ToolchainException.class, stream::result));
        assertEquals(Status.Code.UNAUTHENTICATED, s.code());
        assertEquals(ErrorReason.MISSING_CREDENTIALS, s.errorReason().orElseThrow());
      }
    }
  }

  @Test
  void authWrongToken() {
    try (ToolchainClient client = ToolchainClient.builder(env("TOOLCHAIN_AUTH_ADDR"))
        .bearerToken("not-" + env("TOOLCHAIN_TOKEN")).timeout(TIMEOUT).build()) {
      ToolchainException e = known(assertThrows(ToolchainException.class, () -> client.runTools(stage("[calc]"))));
      assertEquals(Status.Code.UNAUTHENTICATED, e.code());
      assertEquals(ErrorReason.INVALID_CREDENTIALS, e.errorReason().orElseThrow());
    }
  }

  @Test
  void authToken() {
    try (ToolchainClient client = ToolchainClient.builder(env("TOOLCHAIN_AUTH_ADDR"))
        .bearerToken(env("TOOLCHAIN_TOKEN")).timeout(TIMEOUT).build()) {
      assertEquals(3, client.listTools().size());
      try (StageStream stream = client.streamSynthesis(stage("What is 6*7? [calc]"))) {
        assertEquals("The answer is 42.", stream.result().getText());
      }
    }
  }

  @Test
  void healthWithoutToken() {
    try (ToolchainClient client = ToolchainClient.builder(env("TOOLCHAIN_AUTH_ADDR")).build()) {
      HealthCheckResponse r = HealthGrpc.newBlockingStub(client.channel())
          .withDeadlineAfter(TIMEOUT.toSeconds(), TimeUnit.SECONDS)
          .check(HealthCheckRequest.newBuilder().setService("").build());
      assertEquals(HealthCheckResponse.ServingStatus.SERVING, r.getStatus());
    }
  }

  // 9. Mutual TLS.
  @Test
  void mutualTls() {
    try (ToolchainClient client = ToolchainClient.builder(env("TOOLCHAIN_TLS_ADDR"))
        .caFile(Path.of(env("TOOLCHAIN_TLS_CA")))
        .clientCertificate(Path.of(env("TOOLCHAIN_TLS_CLIENT_CERT")), Path.of(env("TOOLCHAIN_TLS_CLIENT_KEY")))
        .timeout(TIMEOUT)
        .build()) {
      assertEquals(3, client.listTools().size());
      try (StageStream stream = client.streamTools(stage("What is 6*7? [calc]"))) {
        stream.result();
        assertCalculator42(stream.toolSummary().orElseThrow().getResultsList());
      }
    }
  }

  @Test
  void tlsWithoutClientCertificateIsRefused() {
    try (ToolchainClient client = ToolchainClient.builder(env("TOOLCHAIN_TLS_ADDR"))
        .caFile(Path.of(env("TOOLCHAIN_TLS_CA")))
        .timeout(TIMEOUT)
        .build()) {
      ToolchainException e = knownIfAny(assertThrows(ToolchainException.class, client::listTools));
      assertEquals(Status.Code.UNAVAILABLE, e.code(), e::toString);
    }
  }
}
