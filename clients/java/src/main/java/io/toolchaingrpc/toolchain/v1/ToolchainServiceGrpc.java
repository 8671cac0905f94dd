package io.toolchaingrpc.toolchain.v1;

import static io.grpc.MethodDescriptor.generateFullMethodName;

/**
 * <pre>
 * ToolchainService runs tool stages: tool calls chosen by a model, validated
 * and executed by the server, optionally followed by a synthesis answer.
 * </pre>
 */
@io.grpc.stub.annotations.GrpcGenerated
public final class ToolchainServiceGrpc {

  private ToolchainServiceGrpc() {}

  public static final java.lang.String SERVICE_NAME = "toolchain.v1.ToolchainService";

  // Static method descriptors that strictly reflect the proto.
  private static volatile io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.RunToolsRequest,
      io.toolchaingrpc.toolchain.v1.RunToolsResponse> getRunToolsMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "RunTools",
      requestType = io.toolchaingrpc.toolchain.v1.RunToolsRequest.class,
      responseType = io.toolchaingrpc.toolchain.v1.RunToolsResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.RunToolsRequest,
      io.toolchaingrpc.toolchain.v1.RunToolsResponse> getRunToolsMethod() {
    io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.RunToolsRequest, io.toolchaingrpc.toolchain.v1.RunToolsResponse> getRunToolsMethod;
    if ((getRunToolsMethod = ToolchainServiceGrpc.getRunToolsMethod) == null) {
      synchronized (ToolchainServiceGrpc.class) {
        if ((getRunToolsMethod = ToolchainServiceGrpc.getRunToolsMethod) == null) {
          ToolchainServiceGrpc.getRunToolsMethod = getRunToolsMethod =
              io.grpc.MethodDescriptor.<io.toolchaingrpc.toolchain.v1.RunToolsRequest, io.toolchaingrpc.toolchain.v1.RunToolsResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "RunTools"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.RunToolsRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.RunToolsResponse.getDefaultInstance()))
              .setSchemaDescriptor(new ToolchainServiceMethodDescriptorSupplier("RunTools"))
              .build();
        }
      }
    }
    return getRunToolsMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.RunSynthesisRequest,
      io.toolchaingrpc.toolchain.v1.RunSynthesisResponse> getRunSynthesisMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "RunSynthesis",
      requestType = io.toolchaingrpc.toolchain.v1.RunSynthesisRequest.class,
      responseType = io.toolchaingrpc.toolchain.v1.RunSynthesisResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.RunSynthesisRequest,
      io.toolchaingrpc.toolchain.v1.RunSynthesisResponse> getRunSynthesisMethod() {
    io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.RunSynthesisRequest, io.toolchaingrpc.toolchain.v1.RunSynthesisResponse> getRunSynthesisMethod;
    if ((getRunSynthesisMethod = ToolchainServiceGrpc.getRunSynthesisMethod) == null) {
      synchronized (ToolchainServiceGrpc.class) {
        if ((getRunSynthesisMethod = ToolchainServiceGrpc.getRunSynthesisMethod) == null) {
          ToolchainServiceGrpc.getRunSynthesisMethod = getRunSynthesisMethod =
              io.grpc.MethodDescriptor.<io.toolchaingrpc.toolchain.v1.RunSynthesisRequest, io.toolchaingrpc.toolchain.v1.RunSynthesisResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "RunSynthesis"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.RunSynthesisRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.RunSynthesisResponse.getDefaultInstance()))
              .setSchemaDescriptor(new ToolchainServiceMethodDescriptorSupplier("RunSynthesis"))
              .build();
        }
      }
    }
    return getRunSynthesisMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.StreamToolsRequest,
      io.toolchaingrpc.toolchain.v1.StreamToolsResponse> getStreamToolsMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "StreamTools",
      requestType = io.toolchaingrpc.toolchain.v1.StreamToolsRequest.class,
      responseType = io.toolchaingrpc.toolchain.v1.StreamToolsResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.SERVER_STREAMING)
  public static io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.StreamToolsRequest,
      io.toolchaingrpc.toolchain.v1.StreamToolsResponse> getStreamToolsMethod() {
    io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.StreamToolsRequest, io.toolchaingrpc.toolchain.v1.StreamToolsResponse> getStreamToolsMethod;
    if ((getStreamToolsMethod = ToolchainServiceGrpc.getStreamToolsMethod) == null) {
      synchronized (ToolchainServiceGrpc.class) {
        if ((getStreamToolsMethod = ToolchainServiceGrpc.getStreamToolsMethod) == null) {
          ToolchainServiceGrpc.getStreamToolsMethod = getStreamToolsMethod =
              io.grpc.MethodDescriptor.<io.toolchaingrpc.toolchain.v1.StreamToolsRequest, io.toolchaingrpc.toolchain.v1.StreamToolsResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.SERVER_STREAMING)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "StreamTools"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.StreamToolsRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.StreamToolsResponse.getDefaultInstance()))
              .setSchemaDescriptor(new ToolchainServiceMethodDescriptorSupplier("StreamTools"))
              .build();
        }
      }
    }
    return getStreamToolsMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest,
      io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse> getStreamSynthesisMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "StreamSynthesis",
      requestType = io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest.class,
      responseType = io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.SERVER_STREAMING)
  public static io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest,
      io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse> getStreamSynthesisMethod() {
    io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest, io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse> getStreamSynthesisMethod;
    if ((getStreamSynthesisMethod = ToolchainServiceGrpc.getStreamSynthesisMethod) == null) {
      synchronized (ToolchainServiceGrpc.class) {
        if ((getStreamSynthesisMethod = ToolchainServiceGrpc.getStreamSynthesisMethod) == null) {
          ToolchainServiceGrpc.getStreamSynthesisMethod = getStreamSynthesisMethod =
              io.grpc.MethodDescriptor.<io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest, io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.SERVER_STREAMING)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "StreamSynthesis"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse.getDefaultInstance()))
              .setSchemaDescriptor(new ToolchainServiceMethodDescriptorSupplier("StreamSynthesis"))
              .build();
        }
      }
    }
    return getStreamSynthesisMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.CancelStageRequest,
      io.toolchaingrpc.toolchain.v1.CancelStageResponse> getCancelStageMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "CancelStage",
      requestType = io.toolchaingrpc.toolchain.v1.CancelStageRequest.class,
      responseType = io.toolchaingrpc.toolchain.v1.CancelStageResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.CancelStageRequest,
      io.toolchaingrpc.toolchain.v1.CancelStageResponse> getCancelStageMethod() {
    io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.CancelStageRequest, io.toolchaingrpc.toolchain.v1.CancelStageResponse> getCancelStageMethod;
    if ((getCancelStageMethod = ToolchainServiceGrpc.getCancelStageMethod) == null) {
      synchronized (ToolchainServiceGrpc.class) {
        if ((getCancelStageMethod = ToolchainServiceGrpc.getCancelStageMethod) == null) {
          ToolchainServiceGrpc.getCancelStageMethod = getCancelStageMethod =
              io.grpc.MethodDescriptor.<io.toolchaingrpc.toolchain.v1.CancelStageRequest, io.toolchaingrpc.toolchain.v1.CancelStageResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "CancelStage"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.CancelStageRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.CancelStageResponse.getDefaultInstance()))
              .setSchemaDescriptor(new ToolchainServiceMethodDescriptorSupplier("CancelStage"))
              .build();
        }
      }
    }
    return getCancelStageMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.ResumeStageRequest,
      io.toolchaingrpc.toolchain.v1.ResumeStageResponse> getResumeStageMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "ResumeStage",
      requestType = io.toolchaingrpc.toolchain.v1.ResumeStageRequest.class,
      responseType = io.toolchaingrpc.toolchain.v1.ResumeStageResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.SERVER_STREAMING)
  public static io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.ResumeStageRequest,
      io.toolchaingrpc.toolchain.v1.ResumeStageResponse> getResumeStageMethod() {
    io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.ResumeStageRequest, io.toolchaingrpc.toolchain.v1.ResumeStageResponse> getResumeStageMethod;
    if ((getResumeStageMethod = ToolchainServiceGrpc.getResumeStageMethod) == null) {
      synchronized (ToolchainServiceGrpc.class) {
        if ((getResumeStageMethod = ToolchainServiceGrpc.getResumeStageMethod) == null) {
          ToolchainServiceGrpc.getResumeStageMethod = getResumeStageMethod =
              io.grpc.MethodDescriptor.<io.toolchaingrpc.toolchain.v1.ResumeStageRequest, io.toolchaingrpc.toolchain.v1.ResumeStageResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.SERVER_STREAMING)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "ResumeStage"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.ResumeStageRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.ResumeStageResponse.getDefaultInstance()))
              .setSchemaDescriptor(new ToolchainServiceMethodDescriptorSupplier("ResumeStage"))
              .build();
        }
      }
    }
    return getResumeStageMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.ListToolsRequest,
      io.toolchaingrpc.toolchain.v1.ListToolsResponse> getListToolsMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "ListTools",
      requestType = io.toolchaingrpc.toolchain.v1.ListToolsRequest.class,
      responseType = io.toolchaingrpc.toolchain.v1.ListToolsResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.ListToolsRequest,
      io.toolchaingrpc.toolchain.v1.ListToolsResponse> getListToolsMethod() {
    io.grpc.MethodDescriptor<io.toolchaingrpc.toolchain.v1.ListToolsRequest, io.toolchaingrpc.toolchain.v1.ListToolsResponse> getListToolsMethod;
    if ((getListToolsMethod = ToolchainServiceGrpc.getListToolsMethod) == null) {
      synchronized (ToolchainServiceGrpc.class) {
        if ((getListToolsMethod = ToolchainServiceGrpc.getListToolsMethod) == null) {
          ToolchainServiceGrpc.getListToolsMethod = getListToolsMethod =
              io.grpc.MethodDescriptor.<io.toolchaingrpc.toolchain.v1.ListToolsRequest, io.toolchaingrpc.toolchain.v1.ListToolsResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "ListTools"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.ListToolsRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.toolchaingrpc.toolchain.v1.ListToolsResponse.getDefaultInstance()))
              .setSchemaDescriptor(new ToolchainServiceMethodDescriptorSupplier("ListTools"))
              .build();
        }
      }
    }
    return getListToolsMethod;
  }

  /**
   * Creates a new async stub that supports all call types for the service
   */
  public static ToolchainServiceStub newStub(io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<ToolchainServiceStub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<ToolchainServiceStub>() {
        @java.lang.Override
        public ToolchainServiceStub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new ToolchainServiceStub(channel, callOptions);
        }
      };
    return ToolchainServiceStub.newStub(factory, channel);
  }

  /**
   * Creates a new blocking-style stub that supports all types of calls on the service
   */
  public static ToolchainServiceBlockingV2Stub newBlockingV2Stub(
      io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<ToolchainServiceBlockingV2Stub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<ToolchainServiceBlockingV2Stub>() {
        @java.lang.Override
        public ToolchainServiceBlockingV2Stub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new ToolchainServiceBlockingV2Stub(channel, callOptions);
        }
      };
    return ToolchainServiceBlockingV2Stub.newStub(factory, channel);
  }

  /**
   * Creates a new blocking-style stub that supports unary and streaming output calls on the service
   */
  public static ToolchainServiceBlockingStub newBlockingStub(
      io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<ToolchainServiceBlockingStub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<ToolchainServiceBlockingStub>() {
        @java.lang.Override
        public ToolchainServiceBlockingStub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new ToolchainServiceBlockingStub(channel, callOptions);
        }
      };
    return ToolchainServiceBlockingStub.newStub(factory, channel);
  }

  /**
   * Creates a new ListenableFuture-style stub that supports unary calls on the service
   */
  public static ToolchainServiceFutureStub newFutureStub(
      io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<ToolchainServiceFutureStub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<ToolchainServiceFutureStub>() {
        @java.lang.Override
        public ToolchainServiceFutureStub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new ToolchainServiceFutureStub(channel, callOptions);
        }
      };
    return ToolchainServiceFutureStub.newStub(factory, channel);
  }

  /**
   * <pre>
   * ToolchainService runs tool stages: tool calls chosen by a model, validated
   * and executed by the server, optionally followed by a synthesis answer.
   * </pre>
   */
  public interface AsyncService {

    /**
     * <pre>
     * RunTools runs the tool phase only and returns the tool results in one
     * response. When the model calls no tool the call still succeeds, with no
     * tool results and the model's own text in `text`.
     * </pre>
     */
    default void runTools(io.toolchaingrpc.toolchain.v1.RunToolsRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.RunToolsResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getRunToolsMethod(), responseObserver);
    }

    /**
     * <pre>
     * RunSynthesis runs the tool phase, then the synthesis phase, and returns the
     * final text with the tool results. When the model calls no tool, its tool
     * phase text is the answer and the synthesis phase is skipped.
     * </pre>
     */
    default void runSynthesis(io.toolchaingrpc.toolchain.v1.RunSynthesisRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.RunSynthesisResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getRunSynthesisMethod(), responseObserver);
    }

    /**
     * <pre>
     * StreamTools streams the tool phase: chunks as the model produces them, one
     * ToolSummary per tool round, then exactly one terminal event (Done, Cancel
     * or StageError).
     * </pre>
     */
    default void streamTools(io.toolchaingrpc.toolchain.v1.StreamToolsRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.StreamToolsResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getStreamToolsMethod(), responseObserver);
    }

    /**
     * <pre>
     * StreamSynthesis streams both phases: tool phase chunks and one ToolSummary
     * per tool round, synthesis chunks, then exactly one terminal event (Done,
     * Cancel or StageError). When the last tool round made no call there are no
     * synthesis chunks and Done.text is that round's text.
     * </pre>
     */
    default void streamSynthesis(io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getStreamSynthesisMethod(), responseObserver);
    }

    /**
     * <pre>
     * CancelStage cancels a running stage, from any connection and, when the
     * replicas share a registry (cluster.redis_url), on any replica. Its stream
     * ends with a Cancel event (reason CANCEL_STAGE) and status CANCELLED; a
     * running unary call ends with status CANCELLED. Unknown or finished
     * stage_id: NOT_FOUND. With auth on, a stage belongs to the principal that
     * started it (its bearer token, or its mTLS client certificate's subject),
     * and any id that names no running stage of the caller's, another
     * principal's or none, gets PERMISSION_DENIED: nobody learns whether other
     * callers' stages exist.
     * </pre>
     */
    default void cancelStage(io.toolchaingrpc.toolchain.v1.CancelStageRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.CancelStageResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getCancelStageMethod(), responseObserver);
    }

    /**
     * <pre>
     * ResumeStage continues a streamed stage (StreamTools, StreamSynthesis)
     * whose connection dropped, on any replica: it replays the stage's events
     * after `after_sequence`, in order, then follows the stage live to its
     * terminal event and ends with the matching status, as the original stream
     * would have. A stream whose connection drops (not a cancel) keeps its stage
     * running for the server's resume grace period; when no ResumeStage comes in
     * that time the stage ends with Cancel (reason DISCONNECTED). The events stay
     * resumable for a while after the stage ended. Needs the replicas' shared
     * event log (cluster.redis_url): without one, FAILED_PRECONDITION. Unknown
     * stage_id, or its events expired: NOT_FOUND (with auth on, as CancelStage:
     * PERMISSION_DENIED unless the stage is the caller's). Events the log no
     * longer keeps (it keeps the last cluster.event_log_max_events): OUT_OF_RANGE.
     * The replica running the stage stopped: a StageError event with reason
     * STAGE_OWNER_LOST and status UNAVAILABLE (run the stage again).
     * </pre>
     */
    default void resumeStage(io.toolchaingrpc.toolchain.v1.ResumeStageRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.ResumeStageResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getResumeStageMethod(), responseObserver);
    }

    /**
     * <pre>
     * ListTools lists the tools this server offers, with their JSON schemas.
     * </pre>
     */
    default void listTools(io.toolchaingrpc.toolchain.v1.ListToolsRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.ListToolsResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getListToolsMethod(), responseObserver);
    }
  }

  /**
   * Base class for the server implementation of the service ToolchainService.
   * <pre>
   * ToolchainService runs tool stages: tool calls chosen by a model, validated
   * and executed by the server, optionally followed by a synthesis answer.
   * </pre>
   */
  public static abstract class ToolchainServiceImplBase
      implements io.grpc.BindableService, AsyncService {

    @java.lang.Override public final io.grpc.ServerServiceDefinition bindService() {
      return ToolchainServiceGrpc.bindService(this);
    }
  }

  /**
   * A stub to allow clients to do asynchronous rpc calls to service ToolchainService.
   * <pre>
   * ToolchainService runs tool stages: tool calls chosen by a model, validated
   * and executed by the server, optionally followed by a synthesis answer.
   * </pre>
   */
  public static final class ToolchainServiceStub
      extends io.grpc.stub.AbstractAsyncStub<ToolchainServiceStub> {
    private ToolchainServiceStub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected ToolchainServiceStub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new ToolchainServiceStub(channel, callOptions);
    }

    /**
     * <pre>
     * RunTools runs the tool phase only and returns the tool results in one
     * response. When the model calls no tool the call still succeeds, with no
     * tool results and the model's own text in `text`.
     * </pre>
     */
    public void runTools(io.toolchaingrpc.toolchain.v1.RunToolsRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.RunToolsResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getRunToolsMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * RunSynthesis runs the tool phase, then the synthesis phase, and returns the
     * final text with the tool results. When the model calls no tool, its tool
     * phase text is the answer and the synthesis phase is skipped.
     * </pre>
     */
    public void runSynthesis(io.toolchaingrpc.toolchain.v1.RunSynthesisRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.RunSynthesisResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getRunSynthesisMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * StreamTools streams the tool phase: chunks as the model produces them, one
     * ToolSummary per tool round, then exactly one terminal event (Done, Cancel
     * or StageError).
     * </pre>
     */
    public void streamTools(io.toolchaingrpc.toolchain.v1.StreamToolsRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.StreamToolsResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncServerStreamingCall(
          getChannel().newCall(getStreamToolsMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * StreamSynthesis streams both phases: tool phase chunks and one ToolSummary
     * per tool round, synthesis chunks, then exactly one terminal event (Done,
     * Cancel or StageError). When the last tool round made no call there are no
     * synthesis chunks and Done.text is that round's text.
     * </pre>
     */
    public void streamSynthesis(io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncServerStreamingCall(
          getChannel().newCall(getStreamSynthesisMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * CancelStage cancels a running stage, from any connection and, when the
     * replicas share a registry (cluster.redis_url), on any replica. Its stream
     * ends with a Cancel event (reason CANCEL_STAGE) and status CANCELLED; a
     * running unary call ends with status CANCELLED. Unknown or finished
     * stage_id: NOT_FOUND. With auth on, a stage belongs to the principal that
     * started it (its bearer token, or its mTLS client certificate's subject),
     * and any id that names no running stage of the caller's, another
     * principal's or none, gets PERMISSION_DENIED: nobody learns whether other
     * callers' stages exist.
     * </pre>
     */
    public void cancelStage(io.toolchaingrpc.toolchain.v1.CancelStageRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.CancelStageResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getCancelStageMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * ResumeStage continues a streamed stage (StreamTools, StreamSynthesis)
     * whose connection dropped, on any replica: it replays the stage's events
     * after `after_sequence`, in order, then follows the stage live to its
     * terminal event and ends with the matching status, as the original stream
     * would have. A stream whose connection drops (not a cancel) keeps its stage
     * running for the server's resume grace period; when no ResumeStage comes in
     * that time the stage ends with Cancel (reason DISCONNECTED). The events stay
     * resumable for a while after the stage ended. Needs the replicas' shared
     * event log (cluster.redis_url): without one, FAILED_PRECONDITION. Unknown
     * stage_id, or its events expired: NOT_FOUND (with auth on, as CancelStage:
     * PERMISSION_DENIED unless the stage is the caller's). Events the log no
     * longer keeps (it keeps the last cluster.event_log_max_events): OUT_OF_RANGE.
     * The replica running the stage stopped: a StageError event with reason
     * STAGE_OWNER_LOST and status UNAVAILABLE (run the stage again).
     * </pre>
     */
    public void resumeStage(io.toolchaingrpc.toolchain.v1.ResumeStageRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.ResumeStageResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncServerStreamingCall(
          getChannel().newCall(getResumeStageMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * ListTools lists the tools this server offers, with their JSON schemas.
     * </pre>
     */
    public void listTools(io.toolchaingrpc.toolchain.v1.ListToolsRequest request,
        io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.ListToolsResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getListToolsMethod(), getCallOptions()), request, responseObserver);
    }
  }

  /**
   * A stub to allow clients to do synchronous rpc calls to service ToolchainService.
   * <pre>
   * ToolchainService runs tool stages: tool calls chosen by a model, validated
   * and executed by the server, optionally followed by a synthesis answer.
   * </pre>
   */
  public static final class ToolchainServiceBlockingV2Stub
      extends io.grpc.stub.AbstractBlockingStub<ToolchainServiceBlockingV2Stub> {
    private ToolchainServiceBlockingV2Stub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected ToolchainServiceBlockingV2Stub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new ToolchainServiceBlockingV2Stub(channel, callOptions);
    }

    /**
     * <pre>
     * RunTools runs the tool phase only and returns the tool results in one
     * response. When the model calls no tool the call still succeeds, with no
     * tool results and the model's own text in `text`.
     * </pre>
     */
    public io.toolchaingrpc.toolchain.v1.RunToolsResponse runTools(io.toolchaingrpc.toolchain.v1.RunToolsRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getRunToolsMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * RunSynthesis runs the tool phase, then the synthesis phase, and returns the
     * final text with the tool results. When the model calls no tool, its tool
     * phase text is the answer and the synthesis phase is skipped.
     * </pre>
     */
    public io.toolchaingrpc.toolchain.v1.RunSynthesisResponse runSynthesis(io.toolchaingrpc.toolchain.v1.RunSynthesisRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getRunSynthesisMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * StreamTools streams the tool phase: chunks as the model produces them, one
     * ToolSummary per tool round, then exactly one terminal event (Done, Cancel
     * or StageError).
     * </pre>
     */
    @io.grpc.ExperimentalApi("https://github.com/grpc/grpc-java/issues/10918")
    public io.grpc.stub.BlockingClientCall<?, io.toolchaingrpc.toolchain.v1.StreamToolsResponse>
        streamTools(io.toolchaingrpc.toolchain.v1.StreamToolsRequest request) {
      return io.grpc.stub.ClientCalls.blockingV2ServerStreamingCall(
          getChannel(), getStreamToolsMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * StreamSynthesis streams both phases: tool phase chunks and one ToolSummary
     * per tool round, synthesis chunks, then exactly one terminal event (Done,
     * Cancel or StageError). When the last tool round made no call there are no
     * synthesis chunks and Done.text is that round's text.
     * </pre>
     */
    @io.grpc.ExperimentalApi("https://github.com/grpc/grpc-java/issues/10918")
    public io.grpc.stub.BlockingClientCall<?, io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse>
        streamSynthesis(io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest request) {
      return io.grpc.stub.ClientCalls.blockingV2ServerStreamingCall(
          getChannel(), getStreamSynthesisMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * CancelStage cancels a running stage, from any connection and, when the
     * replicas share a registry (cluster.redis_url), on any replica. Its stream
     * ends with a Cancel event (reason CANCEL_STAGE) and status CANCELLED; a
     * running unary call ends with status CANCELLED. Unknown or finished
     * stage_id: NOT_FOUND. With auth on, a stage belongs to the principal that
     * started it (its bearer token, or its mTLS client certificate's subject),
     * and any id that names no running stage of the caller's, another
     * principal's or none, gets PERMISSION_DENIED: nobody learns whether other
     * callers' stages exist.
     * </pre>
     */
    public io.toolchaingrpc.toolchain.v1.CancelStageResponse cancelStage(io.toolchaingrpc.toolchain.v1.CancelStageRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getCancelStageMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * ResumeStage continues a streamed stage (StreamTools, StreamSynthesis)
     * whose connection dropped, on any replica: it replays the stage's events
     * after `after_sequence`, in order, then follows the stage live to its
     * terminal event and ends with the matching status, as the original stream
     * would have. A stream whose connection drops (not a cancel) keeps its stage
     * running for the server's resume grace period; when no ResumeStage comes in
     * that time the stage ends with Cancel (reason DISCONNECTED). The events stay
     * resumable for a while after the stage ended. Needs the replicas' shared
     * event log (cluster.redis_url): without one, FAILED_PRECONDITION. Unknown
     * stage_id, or its events expired: NOT_FOUND (with auth on, as CancelStage:
     * PERMISSION_DENIED unless the stage is the caller's). Events the log no
     * longer keeps (it keeps the last cluster.event_log_max_events): OUT_OF_RANGE.
     * The replica running the stage stopped: a StageError event with reason
     * STAGE_OWNER_LOST and status UNAVAILABLE (run the stage again).
     * </pre>
     */
    @io.grpc.ExperimentalApi("https://github.com/grpc/grpc-java/issues/10918")
    public io.grpc.stub.BlockingClientCall<?, io.toolchaingrpc.toolchain.v1.ResumeStageResponse>
        resumeStage(io.toolchaingrpc.toolchain.v1.ResumeStageRequest request) {
      return io.grpc.stub.ClientCalls.blockingV2ServerStreamingCall(
          getChannel(), getResumeStageMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * ListTools lists the tools this server offers, with their JSON schemas.
     * </pre>
     */
    public io.toolchaingrpc.toolchain.v1.ListToolsResponse listTools(io.toolchaingrpc.toolchain.v1.ListToolsRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getListToolsMethod(), getCallOptions(), request);
    }
  }

  /**
   * A stub to allow clients to do limited synchronous rpc calls to service ToolchainService.
   * <pre>
   * ToolchainService runs tool stages: tool calls chosen by a model, validated
   * and executed by the server, optionally followed by a synthesis answer.
   * </pre>
   */
  public static final class ToolchainServiceBlockingStub
      extends io.grpc.stub.AbstractBlockingStub<ToolchainServiceBlockingStub> {
    private ToolchainServiceBlockingStub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected ToolchainServiceBlockingStub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new ToolchainServiceBlockingStub(channel, callOptions);
    }

    /**
     * <pre>
     * RunTools runs the tool phase only and returns the tool results in one
     * response. When the model calls no tool the call still succeeds, with no
     * tool results and the model's own text in `text`.
     * </pre>
     */
    public io.toolchaingrpc.toolchain.v1.RunToolsResponse runTools(io.toolchaingrpc.toolchain.v1.RunToolsRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getRunToolsMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * RunSynthesis runs the tool phase, then the synthesis phase, and returns the
     * final text with the tool results. When the model calls no tool, its tool
     * phase text is the answer and the synthesis phase is skipped.
     * </pre>
     */
    public io.toolchaingrpc.toolchain.v1.RunSynthesisResponse runSynthesis(io.toolchaingrpc.toolchain.v1.RunSynthesisRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getRunSynthesisMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * StreamTools streams the tool phase: chunks as the model produces them, one
     * ToolSummary per tool round, then exactly one terminal event (Done, Cancel
     * or StageError).
     * </pre>
     */
    public java.util.Iterator<io.toolchaingrpc.toolchain.v1.StreamToolsResponse> streamTools(
        io.toolchaingrpc.toolchain.v1.StreamToolsRequest request) {
      return io.grpc.stub.ClientCalls.blockingServerStreamingCall(
          getChannel(), getStreamToolsMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * StreamSynthesis streams both phases: tool phase chunks and one ToolSummary
     * per tool round, synthesis chunks, then exactly one terminal event (Done,
     * Cancel or StageError). When the last tool round made no call there are no
     * synthesis chunks and Done.text is that round's text.
     * </pre>
     */
    public java.util.Iterator<io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse> streamSynthesis(
        io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest request) {
      return io.grpc.stub.ClientCalls.blockingServerStreamingCall(
          getChannel(), getStreamSynthesisMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * CancelStage cancels a running stage, from any connection and, when the
     * replicas share a registry (cluster.redis_url), on any replica. Its stream
     * ends with a Cancel event (reason CANCEL_STAGE) and status CANCELLED; a
     * running unary call ends with status CANCELLED. Unknown or finished
     * stage_id: NOT_FOUND. With auth on, a stage belongs to the principal that
     * started it (its bearer token, or its mTLS client certificate's subject),
     * and any id that names no running stage of the caller's, another
     * principal's or none, gets PERMISSION_DENIED: nobody learns whether other
     * callers' stages exist.
     * </pre>
     */
    public io.toolchaingrpc.toolchain.v1.CancelStageResponse cancelStage(io.toolchaingrpc.toolchain.v1.CancelStageRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getCancelStageMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * ResumeStage continues a streamed stage (StreamTools, StreamSynthesis)
     * whose connection dropped, on any replica: it replays the stage's events
     * after `after_sequence`, in order, then follows the stage live to its
     * terminal event and ends with the matching status, as the original stream
     * would have. A stream whose connection drops (not a cancel) keeps its stage
     * running for the server's resume grace period; when no ResumeStage comes in
     * that time the stage ends with Cancel (reason DISCONNECTED). The events stay
     * resumable for a while after the stage ended. Needs the replicas' shared
     * event log (cluster.redis_url): without one, FAILED_PRECONDITION. Unknown
     * stage_id, or its events expired: NOT_FOUND (with auth on, as CancelStage:
     * PERMISSION_DENIED unless the stage is the caller's). Events the log no
     * longer keeps (it keeps the last cluster.event_log_max_events): OUT_OF_RANGE.
     * The replica running the stage stopped: a StageError event with reason
     * STAGE_OWNER_LOST and status UNAVAILABLE (run the stage again).
     * </pre>
     */
    public java.util.Iterator<io.toolchaingrpc.toolchain.v1.ResumeStageResponse> resumeStage(
        io.toolchaingrpc.toolchain.v1.ResumeStageRequest request) {
      return io.grpc.stub.ClientCalls.blockingServerStreamingCall(
          getChannel(), getResumeStageMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * ListTools lists the tools this server offers, with their JSON schemas.
     * </pre>
     */
    public io.toolchaingrpc.toolchain.v1.ListToolsResponse listTools(io.toolchaingrpc.toolchain.v1.ListToolsRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getListToolsMethod(), getCallOptions(), request);
    }
  }

  /**
   * A stub to allow clients to do ListenableFuture-style rpc calls to service ToolchainService.
   * <pre>
   * ToolchainService runs tool stages: tool calls chosen by a model, validated
   * and executed by the server, optionally followed by a synthesis answer.
   * </pre>
   */
  public static final class ToolchainServiceFutureStub
      extends io.grpc.stub.AbstractFutureStub<ToolchainServiceFutureStub> {
    private ToolchainServiceFutureStub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected ToolchainServiceFutureStub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new ToolchainServiceFutureStub(channel, callOptions);
    }

    /**
     * <pre>
     * RunTools runs the tool phase only and returns the tool results in one
     * response. When the model calls no tool the call still succeeds, with no
     * tool results and the model's own text in `text`.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.toolchaingrpc.toolchain.v1.RunToolsResponse> runTools(
        io.toolchaingrpc.toolchain.v1.RunToolsRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getRunToolsMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * RunSynthesis runs the tool phase, then the synthesis phase, and returns the
     * final text with the tool results. When the model calls no tool, its tool
     * phase text is the answer and the synthesis phase is skipped.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.toolchaingrpc.toolchain.v1.RunSynthesisResponse> runSynthesis(
        io.toolchaingrpc.toolchain.v1.RunSynthesisRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getRunSynthesisMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * CancelStage cancels a running stage, from any connection and, when the
     * replicas share a registry (cluster.redis_url), on any replica. Its stream
     * ends with a Cancel event (reason CANCEL_STAGE) and status CANCELLED; a
     * running unary call ends with status CANCELLED. Unknown or finished
     * stage_id: NOT_FOUND. With auth on, a stage belongs to the principal that
     * started it (its bearer token, or its mTLS client certificate's subject),
     * and any id that names no running stage of the caller's, another
     * principal's or none, gets PERMISSION_DENIED: nobody learns whether other
     * callers' stages exist.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.toolchaingrpc.toolchain.v1.CancelStageResponse> cancelStage(
        io.toolchaingrpc.toolchain.v1.CancelStageRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getCancelStageMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * ListTools lists the tools this server offers, with their JSON schemas.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.toolchaingrpc.toolchain.v1.ListToolsResponse> listTools(
        io.toolchaingrpc.toolchain.v1.ListToolsRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getListToolsMethod(), getCallOptions()), request);
    }
  }

  private static final int METHODID_RUN_TOOLS = 0;
  private static final int METHODID_RUN_SYNTHESIS = 1;
  private static final int METHODID_STREAM_TOOLS = 2;
  private static final int METHODID_STREAM_SYNTHESIS = 3;
  private static final int METHODID_CANCEL_STAGE = 4;
  private static final int METHODID_RESUME_STAGE = 5;
  private static final int METHODID_LIST_TOOLS = 6;

  private static final class MethodHandlers<Req, Resp> implements
      io.grpc.stub.ServerCalls.UnaryMethod<Req, Resp>,
      io.grpc.stub.ServerCalls.ServerStreamingMethod<Req, Resp>,
      io.grpc.stub.ServerCalls.ClientStreamingMethod<Req, Resp>,
      io.grpc.stub.ServerCalls.BidiStreamingMethod<Req, Resp> {
    private final AsyncService serviceImpl;
    private final int methodId;

    MethodHandlers(AsyncService serviceImpl, int methodId) {
      this.serviceImpl = serviceImpl;
      this.methodId = methodId;
    }

    @java.lang.Override
    @java.lang.SuppressWarnings("unchecked")
    public void invoke(Req request, io.grpc.stub.StreamObserver<Resp> responseObserver) {
      switch (methodId) {
        case METHODID_RUN_TOOLS:
          serviceImpl.runTools((io.toolchaingrpc.toolchain.v1.RunToolsRequest) request,
              (io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.RunToolsResponse>) responseObserver);
          break;
        case METHODID_RUN_SYNTHESIS:
          serviceImpl.runSynthesis((io.toolchaingrpc.toolchain.v1.RunSynthesisRequest) request,
              (io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.RunSynthesisResponse>) responseObserver);
          break;
        case METHODID_STREAM_TOOLS:
          serviceImpl.streamTools((io.toolchaingrpc.toolchain.v1.StreamToolsRequest) request,
              (io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.StreamToolsResponse>) responseObserver);
          break;
        case METHODID_STREAM_SYNTHESIS:
          serviceImpl.streamSynthesis((io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest) request,
              (io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse>) responseObserver);
          break;
        case METHODID_CANCEL_STAGE:
          serviceImpl.cancelStage((io.toolchaingrpc.toolchain.v1.CancelStageRequest) request,
              (io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.CancelStageResponse>) responseObserver);
          break;
        case METHODID_RESUME_STAGE:
          serviceImpl.resumeStage((io.toolchaingrpc.toolchain.v1.ResumeStageRequest) request,
              (io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.ResumeStageResponse>) responseObserver);
          break;
        case METHODID_LIST_TOOLS:
          serviceImpl.listTools((io.toolchaingrpc.toolchain.v1.ListToolsRequest) request,
              (io.grpc.stub.StreamObserver<io.toolchaingrpc.toolchain.v1.ListToolsResponse>) responseObserver);
          break;
        default:
          throw new AssertionError();
      }
    }

    @java.lang.Override
    @java.lang.SuppressWarnings("unchecked")
    public io.grpc.stub.StreamObserver<Req> invoke(
        io.grpc.stub.StreamObserver<Resp> responseObserver) {
      switch (methodId) {
        default:
          throw new AssertionError();
      }
    }
  }

  public static final io.grpc.ServerServiceDefinition bindService(AsyncService service) {
    return io.grpc.ServerServiceDefinition.builder(getServiceDescriptor())
        .addMethod(
          getRunToolsMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.toolchaingrpc.toolchain.v1.RunToolsRequest,
              io.toolchaingrpc.toolchain.v1.RunToolsResponse>(
                service, METHODID_RUN_TOOLS)))
        .addMethod(
          getRunSynthesisMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.toolchaingrpc.toolchain.v1.RunSynthesisRequest,
              io.toolchaingrpc.toolchain.v1.RunSynthesisResponse>(
                service, METHODID_RUN_SYNTHESIS)))
        .addMethod(
          getStreamToolsMethod(),
          io.grpc.stub.ServerCalls.asyncServerStreamingCall(
            new MethodHandlers<
              io.toolchaingrpc.toolchain.v1.StreamToolsRequest,
              io.toolchaingrpc.toolchain.v1.StreamToolsResponse>(
                service, METHODID_STREAM_TOOLS)))
        .addMethod(
          getStreamSynthesisMethod(),
          io.grpc.stub.ServerCalls.asyncServerStreamingCall(
            new MethodHandlers<
              io.toolchaingrpc.toolchain.v1.StreamSynthesisRequest,
              io.toolchaingrpc.toolchain.v1.StreamSynthesisResponse>(
                service, METHODID_STREAM_SYNTHESIS)))
        .addMethod(
          getCancelStageMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.toolchaingrpc.toolchain.v1.CancelStageRequest,
              io.toolchaingrpc.toolchain.v1.CancelStageResponse>(
                service, METHODID_CANCEL_STAGE)))
        .addMethod(
          getResumeStageMethod(),
          io.grpc.stub.ServerCalls.asyncServerStreamingCall(
            new MethodHandlers<
              io.toolchaingrpc.toolchain.v1.ResumeStageRequest,
              io.toolchaingrpc.toolchain.v1.ResumeStageResponse>(
                service, METHODID_RESUME_STAGE)))
        .addMethod(
          getListToolsMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.toolchaingrpc.toolchain.v1.ListToolsRequest,
              io.toolchaingrpc.toolchain.v1.ListToolsResponse>(
                service, METHODID_LIST_TOOLS)))
        .build();
  }

  private static abstract class ToolchainServiceBaseDescriptorSupplier
      implements io.grpc.protobuf.ProtoFileDescriptorSupplier, io.grpc.protobuf.ProtoServiceDescriptorSupplier {
    ToolchainServiceBaseDescriptorSupplier() {}

    @java.lang.Override
    public com.google.protobuf.Descriptors.FileDescriptor getFileDescriptor() {
      return io.toolchaingrpc.toolchain.v1.ToolchainProto.getDescriptor();
    }

    @java.lang.Override
    public com.google.protobuf.Descriptors.ServiceDescriptor getServiceDescriptor() {
      return getFileDescriptor().findServiceByName("ToolchainService");
    }
  }

  private static final class ToolchainServiceFileDescriptorSupplier
      extends ToolchainServiceBaseDescriptorSupplier {
    ToolchainServiceFileDescriptorSupplier() {}
  }

  private static final class ToolchainServiceMethodDescriptorSupplier
      extends ToolchainServiceBaseDescriptorSupplier
      implements io.grpc.protobuf.ProtoMethodDescriptorSupplier {
    private final java.lang.String methodName;

    ToolchainServiceMethodDescriptorSupplier(java.lang.String methodName) {
      this.methodName = methodName;
    }

    @java.lang.Override
    public com.google.protobuf.Descriptors.MethodDescriptor getMethodDescriptor() {
      return getServiceDescriptor().findMethodByName(methodName);
    }
  }

  private static volatile io.grpc.ServiceDescriptor serviceDescriptor;

  public static io.grpc.ServiceDescriptor getServiceDescriptor() {
    io.grpc.ServiceDescriptor result = serviceDescriptor;
    if (result == null) {
      synchronized (ToolchainServiceGrpc.class) {
        result = serviceDescriptor;
        if (result == null) {
          serviceDescriptor = result = io.grpc.ServiceDescriptor.newBuilder(SERVICE_NAME)
              .setSchemaDescriptor(new ToolchainServiceFileDescriptorSupplier())
              .addMethod(getRunToolsMethod())
              .addMethod(getRunSynthesisMethod())
              .addMethod(getStreamToolsMethod())
              .addMethod(getStreamSynthesisMethod())
              .addMethod(getCancelStageMethod())
              .addMethod(getResumeStageMethod())
              .addMethod(getListToolsMethod())
              .build();
        }
      }
    }
    return result;
  }
}
