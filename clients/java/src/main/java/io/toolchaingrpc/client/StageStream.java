package io.toolchaingrpc.client;

import io.grpc.Context;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.toolchaingrpc.toolchain.v1.Cancel;
import io.toolchaingrpc.toolchain.v1.Chunk;
import io.toolchaingrpc.toolchain.v1.Done;
import io.toolchaingrpc.toolchain.v1.Phase;
import io.toolchaingrpc.toolchain.v1.StageError;
import io.toolchaingrpc.toolchain.v1.StageEvent;
import io.toolchaingrpc.toolchain.v1.ToolCallDelta;
import io.toolchaingrpc.toolchain.v1.ToolSummary;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.NoSuchElementException;
import java.util.Optional;
import java.util.SortedMap;
import java.util.TreeMap;
import java.util.function.Supplier;

/**
 * The events of one streamed stage (StreamTools or StreamSynthesis), checked against the
 * toolchain.v1 event contract as they arrive.
 *
 * <p>Iterating yields every event, the terminal one (Done, Cancel or StageError) last, and then
 * checks that the stream ended with the matching status. When the stage did not finish,
 * iteration ends by throwing {@link ToolchainException}: after a StageError event with the
 * event's fields (which must agree with the status's code, message, reason, retry delay and field
 * violations), after a Cancel event with {@link ToolchainException#cancel()} set (status CANCELLED
 * or DEADLINE_EXCEEDED), and without any terminal event when the call failed before the server
 * could send one (auth, deadline, client cancel). A broken contract throws {@link
 * StreamInvariantException}:
 *
 * <ul>
 *   <li>{@code sequence} is 0, 1, 2, ... without gaps;
 *   <li>every {@code stage_id} is non-empty and the same;
 *   <li>exactly one event is set in each StageEvent;
 *   <li>the tool rounds in order ({@code StageRequest.max_rounds}): for each round r = 1, 2, 3,
 *       ... tool phase chunks with {@code round} r, then one ToolSummary with {@code round} r;
 *       then synthesis chunks (StreamSynthesis only) with {@code round} k + 1 after the last
 *       round k; no tool chunk or ToolSummary once a synthesis chunk arrived; Done only after at
 *       least one ToolSummary;
 *   <li>exactly one terminal event, and it is the last;
 *   <li>Done ends with OK, Cancel with CANCELLED or DEADLINE_EXCEEDED, StageError with its code.
 * </ul>
 *
 * <p>A server from before tool rounds sends {@code round} 0 on every event. When the first chunk
 * or ToolSummary has round 0, the stream must keep to round 0 and to at most one ToolSummary
 * (the rules of that older contract); mixing 0 with numbered rounds is a violation.
 *
 * <p>Not thread-safe, except {@link #cancel()}, which any thread may call. Close it (or use
 * try-with-resources) to cancel a stream that is not read to its end.
 *
 * <pre>{@code
 * try (StageStream stream = client.streamSynthesis(stage)) {
 *   for (StageEvent event : stream) { ... }
 *   Done done = stream.done().orElseThrow();
 * } catch (ToolchainException e) { ... }
 * }</pre>
 */
public final class StageStream implements Iterable<StageEvent>, AutoCloseable {

  /** How a stream numbers its tool rounds; its first chunk or ToolSummary decides. */
  private enum Numbering {
    UNKNOWN,
    NUMBERED,
    /** Round 0 throughout: a server from before tool rounds. */
    NONE
  }

  private final Context.CancellableContext context;
  private final Iterator<StageEvent> source;
  private final boolean synthesis;
  private volatile boolean cancelledHere;
  private boolean iterated;

  private long nextSequence;
  private String stageId = "";
  private StageEvent pending;
  private StageEvent terminal;
  private Numbering numbering = Numbering.UNKNOWN;
  private final List<ToolSummary> summaries = new ArrayList<>();
  private boolean synthesisStarted;
  private boolean ended;
  private RuntimeException failure;
  /** By round, then by index: indexes start at 0 in every round. */
  private final SortedMap<Integer, SortedMap<Integer, ToolCall>> toolCalls = new TreeMap<>();
  private final SortedMap<Integer, StringBuilder> toolText = new TreeMap<>();
  private final StringBuilder synthesisText = new StringBuilder();

  private StageStream(Context.CancellableContext context, Iterator<StageEvent> source, boolean synthesis) {
    this.context = context;
    this.source = source;
    this.synthesis = synthesis;
  }

  /**
   * Starts a call in its own cancellable context; {@code start} makes the call. {@code synthesis}:
   * a StreamSynthesis call, whose synthesis chunks are allowed.
   */
  static <T> StageStream start(
      Supplier<Iterator<T>> start, java.util.function.Function<T, StageEvent> event, boolean synthesis) {
    Context.CancellableContext context = Context.current().withCancellation();
    Iterator<T> responses;
    try {
      responses = context.call(start::get);
    } catch (RuntimeException e) {
      context.cancel(e);
      throw ToolchainException.fromThrowable(e);
    } catch (Exception e) {
      context.cancel(e);
      throw new IllegalStateException(e);
    }
    Iterator<StageEvent> events =
        new Iterator<>() {
          @Override
          public boolean hasNext() {
            return responses.hasNext();
          }

          @Override
          public StageEvent next() {
            return event.apply(responses.next());
          }
        };
    return new StageStream(context, events, synthesis);
  }

  /** The single iterator over this stream's events (a stream can be read once). */
  @Override
  public Iterator<StageEvent> iterator() {
    if (iterated) {
      throw new IllegalStateException("a StageStream can be iterated once");
    }
    iterated = true;
    return new Iterator<>() {
      @Override
      public boolean hasNext() {
        return advance();
      }

      @Override
      public StageEvent next() {
        if (!advance()) {
          throw new NoSuchElementException();
        }
        StageEvent event = pending;
        pending = null;
        return event;
      }
    };
  }

  /**
   * Reads the stream to its end and returns its Done event; throws as iterating does. Events not
   * yet read are checked and dropped (the accessors below still see their content).
   */
  public Done result() {
    iterated = true;
    while (advance()) {
      pending = null;
    }
    return terminal.getDone();
  }

  /** Cancels the call from this side (any thread). The server closes its backend request. */
  public void cancel() {
    cancelledHere = true;
    context.cancel(Status.CANCELLED.withDescription("cancelled by the client").asRuntimeException());
  }

  /** Cancels the call unless it has ended. */
  @Override
  public void close() {
    if (!ended) {
      cancel();
    }
  }

  /** The stage id of the events ({@code ""} before the first one). */
  public String stageId() {
    return stageId;
  }

  /**
   * The last ToolSummary event so far: the only one unless the stage has several tool rounds
   * (see {@link #toolSummaries()}).
   */
  public Optional<ToolSummary> toolSummary() {
    return summaries.isEmpty() ? Optional.empty() : Optional.of(summaries.get(summaries.size() - 1));
  }

  /** The ToolSummary events so far, one per ended tool round, in order. */
  public List<ToolSummary> toolSummaries() {
    return List.copyOf(summaries);
  }

  /** The number of tool rounds that have ended (ToolSummary events so far). */
  public int rounds() {
    return summaries.size();
  }

  /** The Done event, once it arrived. */
  public Optional<Done> done() {
    return terminal != null && terminal.hasDone() ? Optional.of(terminal.getDone()) : Optional.empty();
  }

  /**
   * The tool calls of the tool phase so far, of every round, assembled from the chunks' deltas,
   * by round, then by index.
   */
  public List<ToolCall> toolCalls() {
    List<ToolCall> all = new ArrayList<>();
    toolCalls.values().forEach(calls -> all.addAll(calls.values()));
    return List.copyOf(all);
  }

  /** The tool calls of one tool round so far, by index. */
  public List<ToolCall> toolCalls(int round) {
    SortedMap<Integer, ToolCall> calls = toolCalls.get(round);
    return calls == null ? List.of() : List.copyOf(calls.values());
  }

  /** The text content streamed so far by {@code phase} (the tool phase: of every round). */
  public String content(Phase phase) {
    return switch (phase) {
      case PHASE_TOOL -> String.join("", toolText.values());
      case PHASE_SYNTHESIS -> synthesisText.toString();
      default -> "";
    };
  }

  /** The tool phase text streamed so far by one tool round. */
  public String toolContent(int round) {
    StringBuilder text = toolText.get(round);
    return text == null ? "" : text.toString();
  }

  /** Whether the stream has ended (its final status was read). */
  public boolean isEnded() {
    return ended;
  }

  // Fetches the next event into `pending` and checks it; at the end checks the status.
  private boolean advance() {
    if (pending != null) {
      return true;
    }
    if (ended) {
      if (failure != null) {
        throw failure;
      }
      return false;
    }
    try {
      if (source.hasNext()) {
        StageEvent event = source.next();
        check(event);
        pending = event;
        return true;
      }
      end(null);
    } catch (StatusRuntimeException e) {
      end(e);
    } catch (StreamInvariantException e) {
      fail(e);
    }
    if (failure != null) {
      throw failure;
    }
    return false;
  }

  private void fail(RuntimeException e) {
    ended = true;
    failure = e;
    context.cancel(e);
  }

  private StreamInvariantException violation(String what) {
    return new StreamInvariantException(
        "stream broke the toolchain.v1 event contract"
            + (stageId.isEmpty() ? "" : " (stage " + stageId + ")")
            + ": "
            + what);
  }

  private void check(StageEvent event) {
    if (terminal != null) {
      throw violation("event " + event.getSequence() + " (" + event.getEventCase() + ") after the terminal " + terminal.getEventCase());
    }
    if (event.getSequence() != nextSequence) {
      throw violation("event sequence " + event.getSequence() + ", expected " + nextSequence);
    }
    if (event.getStageId().isEmpty()) {
      throw violation("event " + event.getSequence() + " has an empty stage_id");
    }
    if (stageId.isEmpty()) {
      stageId = event.getStageId();
    } else if (!stageId.equals(event.getStageId())) {
      throw violation("event " + event.getSequence() + " has stage_id " + event.getStageId() + ", earlier events " + stageId);
    }
    switch (event.getEventCase()) {
      case CHUNK -> checkChunk(event);
      case TOOL_SUMMARY -> {
        if (synthesisStarted) {
          throw violation("a ToolSummary (event " + event.getSequence() + ") after the synthesis phase started");
        }
        if (numbering == Numbering.NONE && !summaries.isEmpty()) {
          throw violation("a second ToolSummary (event " + event.getSequence() + ") in a stream without round numbers");
        }
        checkRound("ToolSummary (event " + event.getSequence() + ")", event.getToolSummary().getRound());
        summaries.add(event.getToolSummary());
      }
      case DONE -> {
        if (summaries.isEmpty()) {
          throw violation("Done without a ToolSummary before it");
        }
        terminal = event;
      }
      case CANCEL, ERROR -> terminal = event;
      default -> throw violation("event " + event.getSequence() + " has no event set");
    }
    nextSequence++;
  }

  // Tool events carry the round in progress (summaries so far + 1), synthesis chunks the last
  // round + 1: both are rounds() + 1. Round 0 on the first of them: a server without rounds.
  private void checkRound(String what, int round) {
    if (numbering == Numbering.UNKNOWN) {
      numbering = round == 0 ? Numbering.NONE : Numbering.NUMBERED;
    }
    if (numbering == Numbering.NONE) {
      if (round != 0) {
        throw violation(what + " has round " + round + " in a stream whose earlier events had round 0");
      }
      return;
    }
    int due = summaries.size() + 1;
    if (round != due) {
      throw violation(what + " has round " + round + " where round " + due + " was due");
    }
  }

  private void checkChunk(StageEvent event) {
    Chunk chunk = event.getChunk();
    String what = chunk.getPhase() == Phase.PHASE_SYNTHESIS ? "a synthesis chunk" : "a tool phase chunk";
    what += " (event " + event.getSequence() + ")";
    switch (chunk.getPhase()) {
      case PHASE_TOOL -> {
        if (synthesisStarted) {
          throw violation(what + " after the synthesis phase started");
        }
        if (numbering == Numbering.NONE && !summaries.isEmpty()) {
          throw violation(what + " after the ToolSummary");
        }
        checkRound(what, chunk.getRound());
        toolText.computeIfAbsent(chunk.getRound(), r -> new StringBuilder()).append(chunk.getContent());
        SortedMap<Integer, ToolCall> calls = toolCalls.computeIfAbsent(chunk.getRound(), r -> new TreeMap<>());
        for (ToolCallDelta d : chunk.getToolCallsList()) {
          ToolCall call = calls.get(d.getIndex());
          if (call == null) {
            calls.put(d.getIndex(), new ToolCall(d.getIndex(), d.getId(), d.getName(), d.getArgumentsFragment(), chunk.getRound()));
          } else {
            calls.put(
                d.getIndex(),
                new ToolCall(
                    call.index(),
                    call.id().isEmpty() ? d.getId() : call.id(),
                    call.name().isEmpty() ? d.getName() : call.name(),
                    call.arguments() + d.getArgumentsFragment(),
                    call.round()));
          }
        }
      }
      case PHASE_SYNTHESIS -> {
        if (!synthesis) {
          throw violation(what + " in a StreamTools stream");
        }
        if (summaries.isEmpty()) {
          throw violation(what + " before the ToolSummary");
        }
        checkRound(what, chunk.getRound());
        synthesisStarted = true;
        synthesisText.append(chunk.getContent());
      }
      default -> throw violation("a chunk (event " + event.getSequence() + ") with phase " + chunk.getPhase());
    }
  }

  // The stream ended: `error` is its failed status, null for OK.
  private void end(StatusRuntimeException error) {
    ended = true;
    context.cancel(null);
    if (error == null) {
      if (terminal == null) {
        fail(violation("stream ended with status OK and no terminal event"));
      } else if (!terminal.hasDone()) {
        fail(violation("stream ended with status OK after a " + terminal.getEventCase() + " event"));
      }
      return;
    }
    ToolchainException status = ToolchainException.fromThrowable(error);
    if (terminal == null || cancelledHere) {
      // Failed before the server could send a terminal event (auth, deadline, a client cancel,
      // a reader that stopped reading), or cancelled here whatever the server had sent.
      failure = status;
      return;
    }
    switch (terminal.getEventCase()) {
      case DONE -> fail(violation("Done event but the stream ended with " + status.code()));
      case CANCEL -> {
        Cancel cancel = terminal.getCancel();
        if (status.code() != Status.Code.CANCELLED && status.code() != Status.Code.DEADLINE_EXCEEDED) {
          fail(violation("Cancel event (" + cancel.getReason() + ") but the stream ended with " + status.code()));
        } else {
          failure = ToolchainException.withCancel(status, cancel);
        }
      }
      case ERROR -> {
        StageError event = terminal.getError();
        String disagreement = disagreement(event, status);
        if (disagreement != null) {
          fail(violation("the StageError event disagrees with the final status: " + disagreement));
        } else {
          failure = ToolchainException.fromStageError(event, status);
        }
      }
      default -> throw new AssertionError(terminal.getEventCase());
    }
  }

  private static String disagreement(StageError event, ToolchainException status) {
    if (event.getCode() != status.code().value()) {
      return "code " + Status.fromCodeValue(event.getCode()).getCode() + " vs " + status.code();
    }
    if (!event.getMessage().equals(status.statusMessage())) {
      return "message \"" + event.getMessage() + "\" vs \"" + status.statusMessage() + "\"";
    }
    if (!event.getReason().equals(status.reason())) {
      return "reason \"" + event.getReason() + "\" vs \"" + status.reason() + "\"";
    }
    if (status.metadata().containsKey("phase") && !event.getPhase().name().equals(status.metadata().get("phase"))) {
      return "phase " + event.getPhase() + " vs " + status.metadata().get("phase");
    }
    if (event.getRetryable() != event.hasRetryDelay()) {
      return "retryable " + event.getRetryable() + " with retry_delay " + (event.hasRetryDelay() ? "set" : "unset");
    }
    Optional<java.time.Duration> eventDelay =
        event.hasRetryDelay()
            ? Optional.of(ToolchainException.toDuration(event.getRetryDelay()))
            : Optional.empty();
    if (!eventDelay.equals(status.retryDelay())) {
      return "retry_delay "
          + eventDelay.map(Object::toString).orElse("unset")
          + " vs RetryInfo "
          + status.retryDelay().map(Object::toString).orElse("unset");
    }
    List<FieldViolation> violations = new ArrayList<>();
    event.getFieldViolationsList().forEach(v -> violations.add(FieldViolation.of(v)));
    if (!violations.equals(status.fieldViolations())) {
      return "field_violations " + violations + " vs BadRequest " + status.fieldViolations();
    }
    return null;
  }
}
