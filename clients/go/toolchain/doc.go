// Package toolchain is a small client for the toolchain.v1 gRPC contract
// (ToolchainService), wrapping the generated stubs of
// github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1.
//
// It adds three things to the stubs:
//
//   - Connection options: plaintext (the default), TLS with a CA file, mutual
//     TLS with a client certificate and key, and a bearer token sent as
//     `authorization: Bearer <token>` on every call (see [NewClient]).
//   - A typed error, [*Error], decoded from the google.rpc.Status that the
//     server sends in the `grpc-status-details-bin` trailer: status code,
//     message, ErrorInfo reason and metadata, BadRequest field violations and
//     RetryInfo retry delay. Every method of [Client] returns one for a failed
//     call; [FromError] converts any other gRPC error.
//   - A stream helper, [*Stream], that checks the event invariants of the
//     contract while it reads: sequence 0, 1, 2, ... without gaps, one
//     non-empty stage_id throughout, the tool rounds in order (see below),
//     exactly one terminal event (Done, Cancel or StageError) and nothing
//     after it, and a final status that agrees with it (Done and OK, Cancel
//     and CANCELLED or DEADLINE_EXCEEDED, StageError and its own code, reason,
//     retry delay and field violations). A stream that breaks them ends with a
//     [*ProtocolError].
//
// Tool rounds. A stage may have several tool rounds (StageRequest.max_rounds).
// The helper requires, for each round r = 1, 2, 3, ...: tool phase chunks
// with round r, then one ToolSummary with round r; then (StreamSynthesis
// only) synthesis chunks with round k+1, k being the last round; no tool
// chunk or ToolSummary after a synthesis chunk; Done only after at least one
// ToolSummary (a stream that fails earlier ends with Cancel or StageError). A
// server from before tool rounds sends round 0 on every event: when the first
// chunk or ToolSummary has round 0, the stream must keep to round 0 and to at
// most one ToolSummary, the rules of that older contract; a stream that mixes
// 0 and numbered rounds breaks the contract. [ToolCalls] keeps the calls of
// each round apart (indexes restart at 0 in every round).
//
// A minimal streamed stage:
//
//	client, err := toolchain.NewClient("127.0.0.1:50051")
//	if err != nil { ... }
//	defer client.Close()
//	stream, err := client.StreamSynthesis(ctx, &toolchainv1.StageRequest{UserPrompt: "What is 6*7?"})
//	if err != nil { ... }
//	for event, err := range stream.All() {
//		if err != nil { ... } // *toolchain.Error or *toolchain.ProtocolError
//		fmt.Print(event.GetChunk().GetContent())
//	}
package toolchain
