package io.toolchaingrpc.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.protobuf.Any;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import com.google.rpc.RetryInfo;
import io.grpc.ManagedChannel;
import io.grpc.Server;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.inprocess.InProcessChannelBuilder;
import io.grpc.inprocess.InProcessServerBuilder;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.StreamObserver;
import io.toolchaingrpc.toolchain.v1.Cancel;
import io.toolchaingrpc.toolchain.v1.CancelReason;
import io.toolchaingrpc.toolchain.v1.Chunk;
import io.toolchaingrpc.toolchain.v1.Done;
import io.toolchaingrpc.toolchain.v1.ErrorReason;
import io.toolchaingrpc.toolchain.v1.ListToolsRequest;
import io.toolchaingrpc.toolchain.v1.ListToolsResponse;
import io.toolchaingrpc.toolchain.v1.Phase;
import io.toolchaingrpc.toolchain.v1.StageError;
import io.toolchaingrpc.toolchain.v1.StageEvent;
import io.toolchaingrpc.toolchain.v1.StageRequest;
import io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest;
import io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse;
import io.toolchaingrpc.toolchain.v1.StreamToolsRequest;
import io.toolchaingrpc.toolchain.v1.StreamToolsResponse;
import io.toolchaingrpc.toolchain.v1.ToolCallDelta;
import io.toolchaingrpc.toolchain.v1.ToolSummary;
import io.toolchaingrpc.toolchain.v1.ToolchainServiceGrpc;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/** The stream helper and the error decoding against scripted in-process streams. */
class StageStreamTest {

  private record Script(List<StageEvent> events, StatusRuntimeException end) {}

  private static volatile Script script;
  private static Server server;
  private static ManagedChannel channel;
  private static ToolchainClient client;

  @BeforeAll
  static void start() throws Exception {
    String name = InProcessServerBuilder.generateName();
    server = InProcessServerBuilder.forName(name).addService(new Scripted()).build().start();
    channel = InProcessChannelBuilder.forName(name).build();
    client = ToolchainClient.of(channel).withTimeout(Duration.ofSeconds(30));
  }

  @AfterAll
  static void stop() {
    channel.shutdownNow();
    server.shutdownNow();
  }

  private static final class Scripted extends ToolchainServiceGrpc.ToolchainServiceImplBase {
    @Override
    public void streamSynthesis(StreamSynthesisRequest request, StreamObserver<StreamSynthesisResponse> out) {
      Script s = script;
      for (StageEvent e : s.events) {
        out.onNext(StreamSynthesisResponse.newBuilder().setEvent(e).build());
      }
      if (s.end == null) {
        out.onCompleted();
      } else {
        out.onError(s.end);
      }
    }

    @Override
    public void streamTools(StreamToolsRequest request, StreamObserver<StreamToolsResponse> out) {
      Script s = script;
      for (StageEvent e : s.events) {
        out.onNext(StreamToolsResponse.newBuilder().setEvent(e).build());
      }
      if (s.end == null) {
        out.onCompleted();
      } else {
        out.onError(s.end);
      }
    }

    @Override
    public void listTools(ListToolsRequest request, StreamObserver<ListToolsResponse> out) {
      out.onError(script.end);
    }
  }

  // Events builders: sequence numbers are given explicitly so that tests can break them. Without
  // a round, a tool chunk or summary is of round 1, a synthesis chunk of round 2.
  static StageEvent.Builder ev(int seq) {
    return StageEvent.newBuilder().setStageId("s1").setSequence(seq);
  }

  static StageEvent toolChunk(int seq, String args) {
    return ev(seq).setChunk(Chunk.newBuilder().setPhase(Phase.PHASE_TOOL).setRound(1)
        .addToolCalls(ToolCallDelta.newBuilder().setIndex(0).setId(seq == 0 ? "c" : "").setName(seq == 0 ? "calculator" : "")
            .setArgumentsFragment(args))).build();
  }

  /** A tool phase chunk of {@code round} with text. */
  static StageEvent tool(int seq, int round, String text) {
    return ev(seq).setChunk(Chunk.newBuilder().setPhase(Phase.PHASE_TOOL).setRound(round).setContent(text)).build();
  }

  /** A tool phase chunk of {@code round} that starts call {@code id} (index 0) with its arguments. */
  static StageEvent call(int seq, int round, String id, String args) {
    return ev(seq).setChunk(Chunk.newBuilder().setPhase(Phase.PHASE_TOOL).setRound(round)
        .addToolCalls(ToolCallDelta.newBuilder().setIndex(0).setId(id).setName("calculator").setArgumentsFragment(args))).build();
  }

  static StageEvent summary(int seq) {
    return summary(seq, 1);
  }

  static StageEvent summary(int seq, int round) {
    return ev(seq).setToolSummary(ToolSummary.newBuilder().setRound(round)).build();
  }

  static StageEvent synthesis(int seq, String text) {
    return synthesis(seq, 2, text);
  }

  static StageEvent synthesis(int seq, int round, String text) {
    return ev(seq).setChunk(Chunk.newBuilder().setPhase(Phase.PHASE_SYNTHESIS).setRound(round).setContent(text)).build();
  }

  static StageEvent done(int seq) {
    return ev(seq).setDone(Done.newBuilder().setText("ok")).build();
  }

  static StageEvent cancel(int seq, CancelReason reason) {
    return ev(seq).setCancel(Cancel.newBuilder().setReason(reason).setMessage("cancelled")).build();
  }

  static StageError unavailable(long delaySeconds) {
    return StageError.newBuilder()
        .setCode(Status.Code.UNAVAILABLE.value())
        .setMessage("backend down")
        .setPhase(Phase.PHASE_TOOL)
        .setReason("BACKEND_UNAVAILABLE")
        .setRetryable(true)
        .setRetryDelay(com.google.protobuf.Duration.newBuilder().setSeconds(delaySeconds))
        .build();
  }

  static StatusRuntimeException status(int code, String message, String reason, Long delaySeconds, String... fields) {
    com.google.rpc.Status.Builder s = com.google.rpc.Status.newBuilder().setCode(code).setMessage(message);
    s.addDetails(Any.pack(ErrorInfo.newBuilder().setDomain("toolchain.v1").setReason(reason)
        .putMetadata("phase", code == 3 ? "PHASE_UNSPECIFIED" : "PHASE_TOOL").build()));
    if (fields.length > 0) {
      BadRequest.Builder b = BadRequest.newBuilder();
      for (String f : fields) {
        b.addFieldViolations(BadRequest.FieldViolation.newBuilder().setField(f).setDescription("bad " + f));
      }
      s.addDetails(Any.pack(b.build()));
    }
    if (delaySeconds != null) {
      s.addDetails(Any.pack(RetryInfo.newBuilder()
          .setRetryDelay(com.google.protobuf.Duration.newBuilder().setSeconds(delaySeconds)).build()));
    }
    return StatusProto.toStatusRuntimeException(s.build());
  }

  static StatusRuntimeException unavailableStatus(long delaySeconds) {
    return status(14, "backend down", "BACKEND_UNAVAILABLE", delaySeconds);
  }

  static StageStream run(Script s) {
    script = s;
    return client.streamSynthesis(StageRequest.newBuilder().setUserPrompt("x").build());
  }

  static StageStream runTools(Script s) {
    script = s;
    return client.streamTools(StageRequest.newBuilder().setUserPrompt("x").build());
  }

  static StreamInvariantException violation(List<StageEvent> events, StatusRuntimeException end) {
    try (StageStream stream = run(new Script(events, end))) {
      return assertThrows(StreamInvariantException.class, stream::result);
    }
  }

  /** A StreamSynthesis stream of {@code events} ending OK breaks the contract, saying {@code problem}. */
  static void assertViolation(String problem, StageEvent... events) {
    String message = violation(List.of(events), null).getMessage();
    assertTrue(message.contains(problem), () -> "\"" + message + "\" does not say \"" + problem + "\"");
  }

  @Test
  void validStream() {
    List<StageEvent> seen = new ArrayList<>();
    try (StageStream stream = run(new Script(
        List.of(toolChunk(0, "{\"expression\":"), toolChunk(1, " \"6*7\"}"), summary(2), synthesis(3, "4"), synthesis(4, "2"), done(5)),
        null))) {
      stream.forEach(seen::add);
      assertEquals(6, seen.size());
      assertEquals("ok", stream.done().orElseThrow().getText());
      assertEquals(List.of(new ToolCall(0, "c", "calculator", "{\"expression\": \"6*7\"}", 1)), stream.toolCalls());
      assertEquals(1, stream.rounds());
      assertEquals("42", stream.content(Phase.PHASE_SYNTHESIS));
      assertEquals("s1", stream.stageId());
      assertTrue(stream.isEnded());
      assertThrows(IllegalStateException.class, stream::iterator);
    }
  }

  // Tool rounds.

  @Test
  void threeRoundsThenSynthesis() {
    List<Integer> rounds = new ArrayList<>();
    try (StageStream stream = run(new Script(
        List.of(call(0, 1, "r1", "{\"e\": 1}"), tool(1, 1, "one"), summary(2, 1), call(3, 2, "r2", "{\"e\": 2}"), summary(4, 2),
            summary(5, 3), synthesis(6, 4, "After three "), synthesis(7, 4, "rounds."), done(8)),
        null))) {
      for (StageEvent e : stream) {
        rounds.add(stream.rounds());
      }
      assertEquals(List.of(0, 0, 1, 1, 2, 3, 3, 3, 3), rounds);
      assertEquals(List.of(1, 2, 3), stream.toolSummaries().stream().map(ToolSummary::getRound).toList());
      assertEquals(3, stream.toolSummary().orElseThrow().getRound());
      assertEquals(
          List.of(new ToolCall(0, "r1", "calculator", "{\"e\": 1}", 1), new ToolCall(0, "r2", "calculator", "{\"e\": 2}", 2)),
          stream.toolCalls());
      assertEquals(List.of(new ToolCall(0, "r2", "calculator", "{\"e\": 2}", 2)), stream.toolCalls(2));
      assertEquals(List.of(), stream.toolCalls(3));
      assertEquals("one", stream.toolContent(1));
      assertEquals("", stream.toolContent(2));
      assertEquals("After three rounds.", stream.content(Phase.PHASE_SYNTHESIS));
    }
  }

  @Test
  void toolRoundsInStreamTools() {
    try (StageStream stream = runTools(new Script(
        List.of(tool(0, 1, "a"), summary(1, 1), tool(2, 2, "b"), summary(3, 2), tool(4, 3, "c"), summary(5, 3), done(6)),
        null))) {
      assertEquals("ok", stream.result().getText());
      assertEquals(3, stream.rounds());
      assertEquals("abc", stream.content(Phase.PHASE_TOOL));
      assertEquals("c", stream.toolContent(3));
    }
  }

  @Test
  void stageErrorInTheSecondRound() {
    try (StageStream stream = run(new Script(
        List.of(tool(0, 1, "a"), summary(1, 1), tool(2, 2, "b"), ev(3).setError(unavailable(3)).build()),
        unavailableStatus(3)))) {
      ToolchainException e = assertThrows(ToolchainException.class, stream::result);
      assertEquals(Status.Code.UNAVAILABLE, e.code());
      assertEquals(1, stream.rounds());
      assertTrue(stream.done().isEmpty());
    }
  }

  @Test
  void serverWithoutRoundNumbers() {
    try (StageStream stream = run(new Script(List.of(tool(0, 0, "a"), summary(1, 0), synthesis(2, 0, "b"), done(3)), null))) {
      assertEquals("ok", stream.result().getText());
      assertEquals(1, stream.rounds());
    }
    try (StageStream stream = runTools(new Script(List.of(tool(0, 0, "a"), summary(1, 0), done(2)), null))) {
      assertEquals("ok", stream.result().getText());
    }
  }

  @Test
  void summaryRoundRepeated() {
    assertViolation("ToolSummary (event 1) has round 1 where round 2 was due", summary(0, 1), summary(1, 1), done(2));
  }

  @Test
  void summaryRoundSkipped() {
    assertViolation("ToolSummary (event 3) has round 3 where round 2 was due",
        tool(0, 1, "a"), summary(1, 1), tool(2, 2, "b"), summary(3, 3), done(4));
  }

  @Test
  void firstSummaryOfRound2() {
    assertViolation("ToolSummary (event 0) has round 2 where round 1 was due", summary(0, 2), done(1));
  }

  @Test
  void toolChunkOfTheEndedRound() {
    assertViolation("tool phase chunk (event 1) has round 1 where round 2 was due", summary(0, 1), tool(1, 1, "b"), summary(2, 2), done(3));
  }

  @Test
  void toolChunkOfTheNextRound() {
    assertViolation("tool phase chunk (event 1) has round 2 where round 1 was due", tool(0, 1, "a"), tool(1, 2, "b"), summary(2, 1), done(3));
  }

  @Test
  void toolChunkOfRound0AmongNumbered() {
    assertViolation("tool phase chunk (event 2) has round 0 where round 2 was due",
        tool(0, 1, "a"), summary(1, 1), tool(2, 0, "b"), summary(3, 2), done(4));
  }

  @Test
  void toolChunkAfterSynthesisStarted() {
    assertViolation("tool phase chunk (event 2) after the synthesis phase started",
        summary(0, 1), synthesis(1, 2, "b"), tool(2, 2, "c"), summary(3, 2), done(4));
  }

  @Test
  void summaryAfterSynthesisStarted() {
    assertViolation("ToolSummary (event 2) after the synthesis phase started", summary(0, 1), synthesis(1, 2, "b"), summary(2, 2), done(3));
  }

  @Test
  void synthesisChunkOfTheLastToolRound() {
    assertViolation("synthesis chunk (event 2) has round 2 where round 3 was due", summary(0, 1), summary(1, 2), synthesis(2, 2, "b"), done(3));
  }

  @Test
  void synthesisChunkInStreamTools() {
    try (StageStream stream = runTools(new Script(List.of(summary(0, 1), synthesis(1, 2, "b"), done(2)), null))) {
      StreamInvariantException e = assertThrows(StreamInvariantException.class, stream::result);
      assertTrue(e.getMessage().contains("synthesis chunk (event 1) in a StreamTools stream"), e::getMessage);
    }
  }

  @Test
  void chunkWithoutPhase() {
    assertViolation("with phase PHASE_UNSPECIFIED", ev(0).setChunk(Chunk.newBuilder().setRound(1)).build(), summary(1), done(2));
  }

  @Test
  void round0ThenNumberedSummary() {
    assertViolation("ToolSummary (event 1) has round 1 in a stream whose earlier events had round 0", tool(0, 0, "a"), summary(1, 1), done(2));
  }

  @Test
  void round0ThenNumberedSynthesis() {
    assertViolation("synthesis chunk (event 1) has round 1 in a stream whose earlier events had round 0",
        summary(0, 0), synthesis(1, 1, "b"), done(2));
  }

  @Test
  void round0AndASecondSummary() {
    assertViolation("second ToolSummary (event 1) in a stream without round numbers", summary(0, 0), summary(1, 0), done(2));
  }

  @Test
  void round0AndAToolChunkAfterTheSummary() {
    assertViolation("tool phase chunk (event 1) after the ToolSummary", summary(0, 0), tool(1, 0, "b"), done(2));
  }

  @Test
  void sequenceGap() {
    assertTrue(violation(List.of(toolChunk(0, ""), summary(2), done(3)), null).getMessage().contains("sequence 2, expected 1"));
  }

  @Test
  void sequenceNotFromZero() {
    violation(List.of(summary(1), done(2)), null);
  }

  @Test
  void emptyStageId() {
    violation(List.of(summary(0), done(1).toBuilder().setStageId("").build()), null);
  }

  @Test
  void changingStageId() {
    violation(List.of(summary(0), done(1).toBuilder().setStageId("s2").build()), null);
  }

  @Test
  void noEventSet() {
    violation(List.of(ev(0).build()), null);
  }

  @Test
  void eventAfterTerminal() {
    assertTrue(violation(List.of(summary(0), done(1), synthesis(2, "late")), null).getMessage().contains("after the terminal"));
  }

  @Test
  void twoTerminals() {
    violation(List.of(summary(0), done(1), done(2)), null);
  }

  @Test
  void noTerminalWithOk() {
    violation(List.of(toolChunk(0, ""), summary(1)), null);
  }

  @Test
  void synthesisBeforeSummary() {
    violation(List.of(synthesis(0, "x"), summary(1), done(2)), null);
  }

  @Test
  void doneWithErrorStatus() {
    violation(List.of(summary(0), done(1)), unavailableStatus(3));
  }

  @Test
  void cancelWithOk() {
    violation(List.of(cancel(0, CancelReason.CANCEL_REASON_CANCEL_STAGE)), null);
  }

  @Test
  void cancelWithWrongStatus() {
    violation(List.of(cancel(0, CancelReason.CANCEL_REASON_CANCEL_STAGE)), unavailableStatus(3));
  }

  @Test
  void cancelWithCancelled() {
    try (StageStream stream = run(new Script(
        List.of(toolChunk(0, ""), cancel(1, CancelReason.CANCEL_REASON_CANCEL_STAGE)),
        Status.CANCELLED.withDescription("cancelled").asRuntimeException()))) {
      ToolchainException e = assertThrows(ToolchainException.class, stream::result);
      assertEquals(Status.Code.CANCELLED, e.code());
      assertEquals(CancelReason.CANCEL_REASON_CANCEL_STAGE, e.cancel().orElseThrow().getReason());
    }
  }

  @Test
  void errorWithOk() {
    violation(List.of(ev(0).setError(unavailable(3)).build()), null);
  }

  @Test
  void errorAgreesWithStatus() {
    try (StageStream stream = run(new Script(List.of(toolChunk(0, ""), ev(1).setError(unavailable(3)).build()), unavailableStatus(3)))) {
      ToolchainException e = assertThrows(ToolchainException.class, stream::result);
      assertEquals(Status.Code.UNAVAILABLE, e.code());
      assertEquals(ErrorReason.BACKEND_UNAVAILABLE, e.errorReason().orElseThrow());
      assertEquals(Duration.ofSeconds(3), e.retryDelay().orElseThrow());
      assertEquals(Phase.PHASE_TOOL, e.phase());
      assertEquals("PHASE_TOOL", e.metadata().get("phase"));
      assertEquals("toolchain.v1", e.domain());
      assertEquals(unavailable(3), e.stageError().orElseThrow());
      // Iterating again after the end throws the same error.
      assertThrows(ToolchainException.class, stream::result);
    }
  }

  @Test
  void errorDisagreesWithStatusCode() {
    violation(List.of(ev(0).setError(unavailable(3)).build()),
        Status.INTERNAL.withDescription("backend down").asRuntimeException());
  }

  @Test
  void errorDisagreesWithRetryDelay() {
    assertTrue(violation(List.of(ev(0).setError(unavailable(3)).build()), unavailableStatus(2))
        .getMessage().contains("retry_delay"));
  }

  @Test
  void errorRetryableWithoutDelay() {
    violation(List.of(ev(0).setError(unavailable(3).toBuilder().clearRetryDelay()).build()),
        status(14, "backend down", "BACKEND_UNAVAILABLE", null));
  }

  @Test
  void errorDisagreesWithFieldViolations() {
    StageError invalid = StageError.newBuilder().setCode(3).setMessage("bad").setReason("INVALID_REQUEST")
        .addFieldViolations(BadRequest.FieldViolation.newBuilder().setField("stage.user_prompt").setDescription("bad stage.user_prompt"))
        .build();
    violation(List.of(ev(0).setError(invalid).build()),
        status(3, "bad", "INVALID_REQUEST", null, "stage.user_prompt", "stage.tool_phase.temperature"));
    try (StageStream stream = run(new Script(List.of(ev(0).setError(invalid).build()),
        status(3, "bad", "INVALID_REQUEST", null, "stage.user_prompt")))) {
      ToolchainException e = assertThrows(ToolchainException.class, stream::result);
      assertEquals(List.of(new FieldViolation("stage.user_prompt", "bad stage.user_prompt")), e.fieldViolations());
      assertEquals(Phase.PHASE_UNSPECIFIED, e.phase());
    }
  }

  @Test
  void statusWithoutEvents() {
    try (StageStream stream = run(new Script(List.of(), status(16, "no token", "MISSING_CREDENTIALS", null)))) {
      ToolchainException e = assertThrows(ToolchainException.class, stream::result);
      assertEquals(Status.Code.UNAUTHENTICATED, e.code());
      assertEquals(ErrorReason.MISSING_CREDENTIALS, e.errorReason().orElseThrow());
      assertTrue(e.stageError().isEmpty());
    }
  }

  @Test
  void unaryErrorDecoded() {
    script = new Script(List.of(), status(3, "bad request", "INVALID_REQUEST", null, "stage.user_prompt", "stage.tool_phase.temperature"));
    ToolchainException e = assertThrows(ToolchainException.class, client::listTools);
    assertEquals(Status.Code.INVALID_ARGUMENT, e.code());
    assertEquals("bad request", e.statusMessage());
    assertEquals(ErrorReason.INVALID_REQUEST, e.errorReason().orElseThrow());
    assertEquals(2, e.fieldViolations().size());
    assertTrue(e.retryDelay().isEmpty());
    assertEquals("INVALID_ARGUMENT (INVALID_REQUEST): bad request", e.getMessage());
  }

  @Test
  void unknownReasonKeptAsText() {
    script = new Script(List.of(), status(14, "new", "SOMETHING_NEW", 1L));
    ToolchainException e = assertThrows(ToolchainException.class, client::listTools);
    assertEquals("SOMETHING_NEW", e.reason());
    assertTrue(e.errorReason().isEmpty());
    assertTrue(e.retryable());
  }

  @Test
  void statusWithoutDetails() {
    script = new Script(List.of(), Status.RESOURCE_EXHAUSTED.withDescription("too big").asRuntimeException());
    ToolchainException e = assertThrows(ToolchainException.class, client::listTools);
    assertEquals(Status.Code.RESOURCE_EXHAUSTED, e.code());
    assertEquals("", e.reason());
    assertTrue(e.fieldViolations().isEmpty());
    assertTrue(e.metadata().isEmpty());
  }
}
