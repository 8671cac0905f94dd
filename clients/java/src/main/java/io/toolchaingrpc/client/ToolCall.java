package io.toolchaingrpc.client;

/**
 * One tool call of the tool phase, assembled from the streamed {@code ToolCallDelta}s of its
 * {@code index}: id and name from its first delta, arguments concatenated.
 *
 * @param index position of the call in the model's answer, from 0
 * @param id call id
 * @param name tool name
 * @param arguments the JSON arguments text
 */
public record ToolCall(int index, String id, String name, String arguments) {}
