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
 *   <li>exactly one event is set in each StageEvent; at most one ToolSummary, after the tool
 *       phase chunks and before the synthesis chunks; Done comes after the ToolSummary;
 *   <li>exactly one terminal event, and it is the last;
 *   <li>Done ends with OK, Cancel with CANCELLED or DEADLINE_EXCEEDED, StageError with its code.
 * </ul>
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

  private final Context.CancellableContext context;
  private final Iterator<StageEvent> source;
  private volatile boolean cancelledHere;
  private boolean iterated;

  private long nextSequence;
  private String stageId = "";
  private StageEvent pending;
  private StageEvent terminal;
  private ToolSummary summary;
  private boolean ended;
  private RuntimeException failure;
  private final SortedMap<Integer, ToolCall> toolCalls = new TreeMap<>();
  private final StringBuilder toolText = new StringBuilder();
  private final StringBuilder synthesisText = new StringBuilder();

  private StageStream(Context.CancellableContext context, Iterator<StageEvent> source) {
    this.context = context;
    this.source = source;
  }

  /** Starts a call in its own cancellable context; {@code start} makes the call. */
  static <T> StageStream start(
      Supplier<Iterator<T>> start, java.util.function.Function<T, StageEvent> event) {
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
    return new StageStream(context, events);
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

  /** The ToolSummary event, once it arrived. */
  public Optional<ToolSummary> toolSummary() {
    return Optional.ofNullable(summary);
  }

  /** The Done event, once it arrived. */
  public Optional<Done> done() {
    return terminal != null && terminal.hasDone() ? Optional.of(terminal.getDone()) : Optional.empty();
  }

  /** The tool calls of the tool phase so far, assembled from the chunks' deltas, by index. */
  public List<ToolCall> toolCalls() {
    return List.copyOf(new ArrayList<>(toolCalls.values()));
  }

  /** The text content streamed so far by {@code phase}. */
  public String content(Phase phase) {
    return switch (phase) {
      case PHASE_TOOL -> toolText.toString();
      case PHASE_SYNTHESIS -> synthesisText.toString();
      default -> "";
    };
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
      case CHUNK -> checkChunk(event.getChunk());
      case TOOL_SUMMARY -> {
        if (summary != null) {
          throw violation("a second ToolSummary (event " + event.getSequence() + ")");
        }
        summary = event.getToolSummary();
      }
      case DONE -> {
        if (summary == null) {
          throw violation("Done without a ToolSummary before it");
        }
        terminal = event;
      }
      case CANCEL, ERROR -> terminal = event;
      default -> throw violation("event " + event.getSequence() + " has no event set");
    }
    nextSequence++;
  }

  private void checkChunk(Chunk chunk) {
    switch (chunk.getPhase()) {
      case PHASE_TOOL -> {
        if (summary != null) {
          throw violation("a tool phase chunk after the ToolSummary");
        }
        toolText.append(chunk.getContent());
        for (ToolCallDelta d : chunk.getToolCallsList()) {
          ToolCall call = toolCalls.get(d.getIndex());
          if (call == null) {
            toolCalls.put(d.getIndex(), new ToolCall(d.getIndex(), d.getId(), d.getName(), d.getArgumentsFragment()));
          } else {
            toolCalls.put(
                d.getIndex(),
                new ToolCall(
                    call.index(),
                    call.id().isEmpty() ? d.getId() : call.id(),
                    call.name().isEmpty() ? d.getName() : call.name(),
                    call.arguments() + d.getArgumentsFragment()));
          }
        }
      }
      case PHASE_SYNTHESIS -> {
        if (summary == null) {
          throw violation("a synthesis chunk before the ToolSummary");
        }
        synthesisText.append(chunk.getContent());
      }
      default -> throw violation("a chunk with phase " + chunk.getPhase());
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
