// Streams one StreamSynthesis stage and prints it as it arrives.
//   TOOLCHAIN_ADDR=127.0.0.1:50051 [TOOLCHAIN_TOKEN=...] node dist/examples/stream.js
import { toJson } from "@bufbuild/protobuf";
import { ValueSchema } from "@bufbuild/protobuf/wkt";
import { createToolchainClient, ToolchainError } from "@toolchain-grpc/client";

const client = createToolchainClient({
  address: process.env["TOOLCHAIN_ADDR"] ?? "127.0.0.1:50051",
  token: process.env["TOOLCHAIN_TOKEN"],
});
try {
  const stream = client.streamSynthesis({ userPrompt: "What is 6*7? [calc]" }, { timeoutMs: 60_000 });
  for await (const { event } of stream) {
    switch (event.case) {
      case "chunk":
        for (const call of event.value.toolCalls) {
          if (call.name) process.stdout.write(`[tool call ${call.id}: ${call.name}] `);
          process.stdout.write(call.argumentsFragment);
        }
        process.stdout.write(event.value.content);
        break;
      case "toolSummary":
        for (const r of event.value.results) {
          console.log(`\n[${r.toolName}(${r.arguments}) -> ${r.result ? JSON.stringify(toJson(ValueSchema, r.result)) : r.error}]`);
        }
        break;
      case "done":
        console.log(`\nfinal text: ${event.value.text}`);
        break;
    }
  }
} catch (err) {
  if (!(err instanceof ToolchainError)) throw err;
  console.error(`failed: ${err.codeName} ${err.reason} ${err.rawMessage}`);
  if (err.retryDelayMs !== undefined) console.error(`retry in ${err.retryDelayMs} ms`);
  process.exitCode = 1;
} finally {
  client.close();
}
