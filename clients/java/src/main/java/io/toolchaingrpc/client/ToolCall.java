package io.toolchaingrpc.client;

/**
 * One tool call of the tool phase, assembled from the streamed {@code ToolCallDelta}s of its
 * {@code index} in its tool round: id and name from its first delta, arguments concatenated.
 *
 * @param index position of the call in its round's answer, from 0 (in every round)
 * @param id call id
 * @param name tool name
 * @param arguments the JSON arguments text
 * @param round the tool round of its chunks, from 1 (0 from a server without round numbers)
 */
public record ToolCall(int index, String id, String name, String arguments, int round) {}
