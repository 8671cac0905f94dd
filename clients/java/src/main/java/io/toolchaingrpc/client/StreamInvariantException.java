package io.toolchaingrpc.client;

/**
 * A stream broke the toolchain.v1 event contract: a gap or repeat in {@code sequence}, an empty
 * or changing {@code stage_id}, tool rounds out of order, an event after the terminal one, no terminal event, or a terminal
 * event that disagrees with the final status. It means a server (or proxy) bug, not a failed
 * stage; the call has been cancelled.
 */
public final class StreamInvariantException extends IllegalStateException {

  private static final long serialVersionUID = 1L;

  StreamInvariantException(String message) {
    super(message);
  }
}
