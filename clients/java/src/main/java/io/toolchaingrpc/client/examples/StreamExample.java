package io.toolchaingrpc.client.examples;

import io.toolchaingrpc.client.StageStream;
import io.toolchaingrpc.client.ToolchainClient;
import io.toolchaingrpc.client.ToolchainException;
import io.toolchaingrpc.toolchain.v1.StageEvent;
import io.toolchaingrpc.toolchain.v1.StageRequest;
import io.toolchaingrpc.toolchain.v1.ToolCallResult;
import java.time.Duration;

/** Streams one StreamSynthesis stage and prints its chunks, tool results and final text. */
public final class StreamExample {
  public static void main(String[] args) {
    String addr = System.getenv().getOrDefault("TOOLCHAIN_ADDR", "127.0.0.1:50051");
    StageRequest stage = StageRequest.newBuilder().setUserPrompt("What is 6*7? [calc]").build();
    try (ToolchainClient client = ToolchainClient.builder(addr)
            .bearerToken(System.getenv("TOOLCHAIN_TOKEN")) // optional
            .timeout(Duration.ofSeconds(60))
            .build();
        StageStream stream = client.streamSynthesis(stage)) {
      for (StageEvent event : stream) {
        switch (event.getEventCase()) {
          case CHUNK -> System.out.print(event.getChunk().getContent());
          case TOOL_SUMMARY -> {
            for (ToolCallResult r : event.getToolSummary().getResultsList()) {
              System.out.printf("[tool %s(%s): %s]%n", r.getToolName(), r.getArguments(), r.getOutcome());
            }
          }
          case DONE -> System.out.printf("%nfinal text: %s%n", event.getDone().getText());
          default -> { } // Cancel and StageError end the loop with a ToolchainException
        }
      }
    } catch (ToolchainException e) {
      System.err.printf("stage failed: %s (retry after %s)%n", e.getMessage(), e.retryDelay().orElse(null));
      System.exit(1);
    }
  }
}
