package io.toolchaingrpc.client;

import io.grpc.CallCredentials;
import io.grpc.Channel;
import io.grpc.ChannelCredentials;
import io.grpc.CompositeChannelCredentials;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.toolchaingrpc.toolchain.v1.CancelStageRequest;
import io.toolchaingrpc.toolchain.v1.CancelStageResponse;
import io.toolchaingrpc.toolchain.v1.ListToolsRequest;
import io.toolchaingrpc.toolchain.v1.RunSynthesisRequest;
import io.toolchaingrpc.toolchain.v1.RunSynthesisResponse;
import io.toolchaingrpc.toolchain.v1.RunToolsRequest;
import io.toolchaingrpc.toolchain.v1.RunToolsResponse;
import io.toolchaingrpc.toolchain.v1.StageRequest;
import io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest;
import io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse;
import io.toolchaingrpc.toolchain.v1.StreamToolsRequest;
import io.toolchaingrpc.toolchain.v1.StreamToolsResponse;
import io.toolchaingrpc.toolchain.v1.Tool;
import io.toolchaingrpc.toolchain.v1.ToolchainServiceGrpc;
import io.toolchaingrpc.toolchain.v1.ToolchainServiceGrpc.ToolchainServiceBlockingStub;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.file.Path;
import java.time.Duration;
import java.util.List;
import java.util.Objects;
import java.util.concurrent.Executor;
import java.util.concurrent.TimeUnit;
import java.util.function.Supplier;

/**
 * A client of {@code toolchain.v1.ToolchainService}: blocking calls that throw {@link
 * ToolchainException}, and streams checked by {@link StageStream}.
 *
 * <pre>{@code
 * try (ToolchainClient client = ToolchainClient.builder("127.0.0.1:50051").bearerToken(token).build()) {
 *   RunSynthesisResponse answer = client.runSynthesis(StageRequest.newBuilder().setUserPrompt("6*7?").build());
 * }
 * }</pre>
 *
 * <p>Thread-safe; one client (one connection) serves any number of concurrent calls. Closing it
 * shuts the channel down when the client made it.
 */
public final class ToolchainClient implements AutoCloseable {

  private final Channel channel;
  private final ManagedChannel owned;
  private final Duration timeout;

  private ToolchainClient(Channel channel, ManagedChannel owned, Duration timeout) {
    this.channel = channel;
    this.owned = owned;
    this.timeout = timeout;
  }

  /** A builder for a client of the server at {@code target} ({@code host:port} or a gRPC URI). */
  public static Builder builder(String target) {
    return new Builder(target);
  }

  /** A client over a channel made by the caller, who also closes it. */
  public static ToolchainClient of(Channel channel) {
    return new ToolchainClient(Objects.requireNonNull(channel, "channel"), null, null);
  }

  /**
   * A view of this client whose calls each get {@code timeout} as their deadline (a stream: for
   * the whole stream), sharing this client's channel; closing the view does nothing.
   */
  public ToolchainClient withTimeout(Duration timeout) {
    return new ToolchainClient(channel, null, requirePositive(timeout));
  }

  /** The channel, for other services on the same server (e.g. grpc.health.v1). */
  public Channel channel() {
    return channel;
  }

  /** RunTools: the tool phase only. */
  public RunToolsResponse runTools(StageRequest stage) {
    RunToolsRequest request = RunToolsRequest.newBuilder().setStage(stage).build();
    return unary(() -> stub().runTools(request));
  }

  /** RunSynthesis: the tool phase, then the synthesis phase. */
  public RunSynthesisResponse runSynthesis(StageRequest stage) {
    RunSynthesisRequest request = RunSynthesisRequest.newBuilder().setStage(stage).build();
    return unary(() -> stub().runSynthesis(request));
  }

  /** StreamTools: the tool phase's events, checked. Close the stream to cancel it. */
  public StageStream streamTools(StageRequest stage) {
    StreamToolsRequest request = StreamToolsRequest.newBuilder().setStage(stage).build();
    return StageStream.start(() -> stub().streamTools(request), StreamToolsResponse::getEvent, false);
  }

  /** StreamSynthesis: the events of both phases, checked. Close the stream to cancel it. */
  public StageStream streamSynthesis(StageRequest stage) {
    StreamSynthesisRequest request = StreamSynthesisRequest.newBuilder().setStage(stage).build();
    return StageStream.start(() -> stub().streamSynthesis(request), StreamSynthesisResponse::getEvent, true);
  }

  /** CancelStage: cancels the running stage {@code stageId}, started on any connection. */
  public CancelStageResponse cancelStage(String stageId) {
    CancelStageRequest request = CancelStageRequest.newBuilder().setStageId(stageId).build();
    return unary(() -> stub().cancelStage(request));
  }

  /** ListTools: the server's tools, sorted by name. */
  public List<Tool> listTools() {
    return unary(() -> stub().listTools(ListToolsRequest.getDefaultInstance())).getToolsList();
  }

  /** Shuts the channel down (when this client made it), waiting up to 5 s for calls to end. */
  @Override
  public void close() {
    if (owned == null) {
      return;
    }
    owned.shutdown();
    try {
      if (!owned.awaitTermination(5, TimeUnit.SECONDS)) {
        owned.shutdownNow();
      }
    } catch (InterruptedException e) {
      owned.shutdownNow();
      Thread.currentThread().interrupt();
    }
  }

  private ToolchainServiceBlockingStub stub() {
    ToolchainServiceBlockingStub stub = ToolchainServiceGrpc.newBlockingStub(channel);
    // The deadline is taken when the call starts, so that a client can be reused.
    return timeout == null ? stub : stub.withDeadlineAfter(timeout.toNanos(), TimeUnit.NANOSECONDS);
  }

  private static <T> T unary(Supplier<T> call) {
    try {
      return call.get();
    } catch (StatusRuntimeException e) {
      throw ToolchainException.fromThrowable(e);
    }
  }

  private static Duration requirePositive(Duration timeout) {
    if (timeout.isNegative() || timeout.isZero()) {
      throw new IllegalArgumentException("timeout must be positive: " + timeout);
    }
    return timeout;
  }

  /** Options of a client: plaintext by default; TLS, mTLS, a bearer token, a default timeout. */
  public static final class Builder {
    private final String target;
    private String token;
    private boolean tls;
    private Path caFile;
    private Path certFile;
    private Path keyFile;
    private String authority;
    private Duration timeout;

    private Builder(String target) {
      this.target = Objects.requireNonNull(target, "target");
    }

    /** Sends {@code authorization: Bearer <token>} on every call (over plaintext too). */
    public Builder bearerToken(String token) {
      this.token = token == null || token.isEmpty() ? null : token;
      return this;
    }

    /** Uses TLS, trusting the system's roots (unless {@link #caFile} is given). */
    public Builder tls() {
      this.tls = true;
      return this;
    }

    /** Uses TLS, trusting the CAs of this PEM file instead of the system's roots. */
    public Builder caFile(Path caFile) {
      this.caFile = caFile;
      this.tls = true;
      return this;
    }

    /** Uses mutual TLS: presents this PEM certificate (chain) and its PEM (PKCS#8) key. */
    public Builder clientCertificate(Path certFile, Path keyFile) {
      this.certFile = Objects.requireNonNull(certFile, "certFile");
      this.keyFile = Objects.requireNonNull(keyFile, "keyFile");
      this.tls = true;
      return this;
    }

    /** The authority (TLS server name) to use instead of the target's host. */
    public Builder authority(String authority) {
      this.authority = authority;
      return this;
    }

    /** A deadline of {@code timeout} for every call (see {@link ToolchainClient#withTimeout}). */
    public Builder timeout(Duration timeout) {
      this.timeout = requirePositive(timeout);
      return this;
    }

    /** Makes the channel; the connection is opened by the first call. */
    public ToolchainClient build() {
      ChannelCredentials credentials;
      if (tls) {
        TlsChannelCredentials.Builder b = TlsChannelCredentials.newBuilder();
        try {
          if (caFile != null) {
            b.trustManager(caFile.toFile());
          }
          if (certFile != null) {
            b.keyManager(certFile.toFile(), keyFile.toFile());
          }
        } catch (IOException e) {
          throw new UncheckedIOException("cannot read the TLS files", e);
        }
        credentials = b.build();
      } else {
        credentials = InsecureChannelCredentials.create();
      }
      if (token != null) {
        credentials = CompositeChannelCredentials.create(credentials, new BearerToken(token));
      }
      ManagedChannelBuilder<?> channel = Grpc.newChannelBuilder(target, credentials);
      if (authority != null) {
        channel.overrideAuthority(authority);
      }
      ManagedChannel managed = channel.build();
      return new ToolchainClient(managed, managed, timeout);
    }
  }

  /** Call credentials that send a bearer token; the server decides whether plaintext is fine. */
  private static final class BearerToken extends CallCredentials {
    private static final Metadata.Key<String> AUTHORIZATION =
        Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

    private final String header;

    BearerToken(String token) {
      this.header = "Bearer " + token;
    }

    @Override
    public void applyRequestMetadata(RequestInfo info, Executor executor, MetadataApplier applier) {
      Metadata metadata = new Metadata();
      metadata.put(AUTHORIZATION, header);
      applier.apply(metadata);
    }
  }
}
