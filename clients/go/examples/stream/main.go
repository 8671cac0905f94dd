// Command stream streams one StreamSynthesis stage and prints it.
//
//	TOOLCHAIN_ADDR=127.0.0.1:50051 TOOLCHAIN_TOKEN=... go run ./examples/stream
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchain"
	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

func main() {
	addr := os.Getenv("TOOLCHAIN_ADDR")
	if addr == "" {
		addr = "127.0.0.1:50051"
	}
	var opts []toolchain.Option
	if token := os.Getenv("TOOLCHAIN_TOKEN"); token != "" {
		opts = append(opts, toolchain.WithToken(token))
	}
	client, err := toolchain.NewClient(addr, opts...)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stream, err := client.StreamSynthesis(ctx, &pb.StageRequest{UserPrompt: "What is 6*7? [calc]"})
	if err != nil {
		log.Fatal(err)
	}
	var calls toolchain.ToolCalls // assembles the streamed tool-call deltas
	for event, err := range stream.All() {
		if err != nil {
			log.Fatal(err) // a *toolchain.Error (code, reason, retry delay, ...) or *toolchain.ProtocolError
		}
		switch e := event.Event.(type) {
		case *pb.StageEvent_Chunk:
			calls.Add(e.Chunk)
			fmt.Print(e.Chunk.GetContent())
		case *pb.StageEvent_ToolSummary:
			for _, call := range calls.List() {
				fmt.Printf("model called %s %s\n", call.Name, call.Arguments)
			}
			for _, r := range e.ToolSummary.GetResults() {
				fmt.Printf("tool %s: %s %v\n", r.GetToolName(), r.GetOutcome(), r.GetResult().AsInterface())
			}
		case *pb.StageEvent_Done:
			fmt.Println("\nfinal text:", e.Done.GetText())
		}
	}
}
