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
    public void listTools(ListToolsRequest request, StreamObserver<ListToolsResponse> out) {
      out.onError(script.end);
    }
  }

  // Events builders: sequence numbers are given explicitly so that tests can break them.
  static StageEvent.Builder ev(int seq) {
    return StageEvent.newBuilder().setStageId("s1").setSequence(seq);
  }

  static StageEvent toolChunk(int seq, String args) {
    return ev(seq).setChunk(Chunk.newBuilder().setPhase(Phase.PHASE_TOOL)
        .addToolCalls(ToolCallDelta.newBuilder().setIndex(0).setId(seq == 0 ? "c" : "").setName(seq == 0 ? "calculator" : "")
            .setArgumentsFragment(args))).build();
  }

  static StageEvent summary(int seq) {
    return ev(seq).setToolSummary(ToolSummary.getDefaultInstance()).build();
  }

  static StageEvent synthesis(int seq, String text) {
    return ev(seq).setChunk(Chunk.newBuilder().setPhase(Phase.PHASE_SYNTHESIS).setContent(text)).build();
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

  static StreamInvariantException violation(List<StageEvent> events, StatusRuntimeException end) {
    try (StageStream stream = run(new Script(events, end))) {
      return assertThrows(StreamInvariantException.class, stream::result);
    }
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
      assertEquals(List.of(new ToolCall(0, "c", "calculator", "{\"expression\": \"6*7\"}")), stream.toolCalls());
      assertEquals("42", stream.content(Phase.PHASE_SYNTHESIS));
      assertEquals("s1", stream.stageId());
      assertTrue(stream.isEnded());
      assertThrows(IllegalStateException.class, stream::iterator);
    }
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
