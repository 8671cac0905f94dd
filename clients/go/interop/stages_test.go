package interop

import (
	"encoding/json"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchain"
	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

// checkCalcResult asserts the one calculator call of the [calc] scenario.
func checkCalcResult(t *testing.T, results []*pb.ToolCallResult) {
	t.Helper()
	if len(results) != 1 {
		t.Fatalf("%d tool results, want 1: %v", len(results), results)
	}
	r := results[0]
	if r.GetToolName() != "calculator" || r.GetCallId() != "call_calc" || r.GetOutcome() != pb.ToolOutcome_TOOL_OUTCOME_OK || r.GetError() != "" {
		t.Fatalf("tool result %v, want calculator call_calc OK", r)
	}
	// The calculator answers {"expression": "6*7", "result": 42}.
	if v := r.GetResult().GetStructValue().GetFields()["result"]; v.GetNumberValue() != 42 {
		t.Fatalf("tool result value %v, want {\"result\": 42, ...}", r.GetResult())
	}
	checkCalcArgs(t, r.GetArguments())
}

func checkCalcArgs(t *testing.T, arguments string) {
	t.Helper()
	var args map[string]any
	if err := json.Unmarshal([]byte(arguments), &args); err != nil || len(args) != 1 || args["expression"] != "6*7" {
		t.Fatalf("arguments %q, want {\"expression\": \"6*7\"}", arguments)
	}
}

func checkUsage(t *testing.T, what string, s *pb.PhaseStats) {
	t.Helper()
	u := s.GetUsage()
	if u == nil || u.GetPromptTokens() <= 0 || u.GetCompletionTokens() <= 0 || u.GetTotalTokens() != u.GetPromptTokens()+u.GetCompletionTokens() {
		t.Fatalf("%s usage %v, want prompt + completion = total > 0", what, u)
	}
}

// Test 1: a full streamed stage, every event type checked through the helper.
func TestStreamSynthesisCalc(t *testing.T) {
	id := unique(t, "go-calc")
	stream, err := plain(t).StreamSynthesis(timeout(t, wait), &pb.StageRequest{StageId: id, UserPrompt: "What is 6*7? [calc]"})
	if err != nil {
		t.Fatal(err)
	}
	var (
		calls                 toolchain.ToolCalls
		toolChunks, synChunks int
		synthesis             strings.Builder
		summary               *pb.ToolSummary
		done                  *pb.Done
	)
	evs, err := events(t, stream)
	if err != nil {
		t.Fatalf("stream failed: %v", err)
	}
	for i, ev := range evs {
		if ev.GetSequence() != uint32(i) || ev.GetStageId() != id {
			t.Fatalf("event %d has sequence %d stage_id %q, want %d %q", i, ev.GetSequence(), ev.GetStageId(), i, id)
		}
		switch e := ev.Event.(type) {
		case *pb.StageEvent_Chunk:
			switch e.Chunk.GetPhase() {
			case pb.Phase_PHASE_TOOL:
				toolChunks++
				calls.Add(e.Chunk)
			case pb.Phase_PHASE_SYNTHESIS:
				synChunks++
				if len(e.Chunk.GetToolCalls()) > 0 {
					t.Fatalf("synthesis chunk with tool calls: %v", e.Chunk)
				}
				synthesis.WriteString(e.Chunk.GetContent())
			}
		case *pb.StageEvent_ToolSummary:
			summary = e.ToolSummary
		case *pb.StageEvent_Done:
			done = e.Done
		default:
			t.Fatalf("unexpected event %v", ev)
		}
	}
	if toolChunks == 0 || synChunks < 2 {
		t.Fatalf("%d tool and %d synthesis chunks, want some of each (synthesis in several)", toolChunks, synChunks)
	}
	got := calls.List()
	if len(got) != 1 || got[0].Index != 0 || got[0].ID != "call_calc" || got[0].Name != "calculator" {
		t.Fatalf("assembled tool calls %+v, want one calculator call_calc", got)
	}
	checkCalcArgs(t, got[0].Arguments)
	if summary == nil {
		t.Fatal("no ToolSummary")
	}
	checkCalcResult(t, summary.GetResults())
	if synthesis.String() != answer {
		t.Fatalf("synthesis chunks say %q, want %q", synthesis.String(), answer)
	}
	if done.GetText() != answer {
		t.Fatalf("Done.text %q, want %q", done.GetText(), answer)
	}
	checkUsage(t, "tool phase", done.GetToolPhase())
	checkUsage(t, "synthesis phase", done.GetSynthesisPhase())
	if stream.StageID() != id || stream.Terminal().GetDone() != done {
		t.Fatalf("StageID %q Terminal %v", stream.StageID(), stream.Terminal())
	}
}

// Test 2, StreamTools: tool chunks, one summary, Done without a synthesis phase.
func TestStreamToolsCalc(t *testing.T) {
	stream, err := plain(t).StreamTools(timeout(t, wait), &pb.StageRequest{UserPrompt: "What is 6*7? [calc]"})
	if err != nil {
		t.Fatal(err)
	}
	evs, err := events(t, stream)
	if err != nil {
		t.Fatalf("stream failed: %v", err)
	}
	var calls toolchain.ToolCalls
	var summary *pb.ToolSummary
	for _, ev := range evs {
		calls.Add(ev.GetChunk())
		if s := ev.GetToolSummary(); s != nil {
			summary = s
		}
	}
	if got := calls.List(); len(got) != 1 || got[0].Name != "calculator" {
		t.Fatalf("assembled tool calls %+v", got)
	}
	checkCalcResult(t, summary.GetResults())
	done := stream.Terminal().GetDone()
	if done.GetSynthesisPhase() != nil || done.GetText() != "" {
		t.Fatalf("Done %v, want no synthesis phase and no text", done)
	}
	checkUsage(t, "tool phase", done.GetToolPhase())
}

// The [text] scenario on a stream: no tool call, so no synthesis chunks, an
// empty summary, and Done.text the tool phase's text. Wait is the short way.
func TestStreamSynthesisNoTool(t *testing.T) {
	stream, err := plain(t).StreamSynthesis(timeout(t, wait), &pb.StageRequest{UserPrompt: "Say hello. [text]"})
	if err != nil {
		t.Fatal(err)
	}
	done, err := stream.Wait()
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	if done.GetText() != textOnly || done.GetSynthesisPhase() != nil {
		t.Fatalf("Done %v, want text %q and no synthesis phase", done, textOnly)
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("Recv after Wait: %v, want io.EOF", err)
	}
}

func TestRunTools(t *testing.T) {
	resp, err := plain(t).RunTools(timeout(t, wait), &pb.StageRequest{UserPrompt: "What is 6*7? [calc]"})
	if err != nil {
		t.Fatal(err)
	}
	checkCalcResult(t, resp.GetToolResults())
	if resp.GetText() != "" || resp.GetStageId() == "" {
		t.Fatalf("text %q stage_id %q, want no text and a generated id", resp.GetText(), resp.GetStageId())
	}
	checkUsage(t, "tool phase", resp.GetToolPhase())
}

func TestRunSynthesis(t *testing.T) {
	id := unique(t, "go-run")
	resp, err := plain(t).RunSynthesis(timeout(t, wait), &pb.StageRequest{StageId: id, UserPrompt: "What is 6*7? [calc]"})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetText() != answer || resp.GetStageId() != id {
		t.Fatalf("text %q stage_id %q, want %q %q", resp.GetText(), resp.GetStageId(), answer, id)
	}
	checkCalcResult(t, resp.GetToolResults())
	checkUsage(t, "tool phase", resp.GetToolPhase())
	checkUsage(t, "synthesis phase", resp.GetSynthesisPhase())

	resp, err = plain(t).RunSynthesis(timeout(t, wait), &pb.StageRequest{UserPrompt: "Say hello. [text]"})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetText() != textOnly || len(resp.GetToolResults()) != 0 || resp.GetSynthesisPhase() != nil {
		t.Fatalf("[text]: %v, want %q, no results, no synthesis phase", resp, textOnly)
	}
}

func TestListTools(t *testing.T) {
	resp, err := plain(t).ListTools(timeout(t, wait))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tool := range resp.GetTools() {
		names = append(names, tool.GetName())
		if tool.GetParametersSchema() == nil || tool.GetParametersSchema().GetFields()["type"].GetStringValue() != "object" {
			t.Errorf("%s: parameters_schema %v, want a JSON schema of an object", tool.GetName(), tool.GetParametersSchema())
		}
		if tool.GetTimeout() == nil || tool.GetTimeout().AsDuration() <= 0 {
			t.Errorf("%s: timeout %v, want a duration > 0", tool.GetName(), tool.GetTimeout())
		}
		if tool.GetDescription() == "" {
			t.Errorf("%s: no description", tool.GetName())
		}
	}
	if want := []string{"calculator", "current_time", "get_weather"}; !slices.Equal(names, want) {
		t.Fatalf("tools %v, want %v (sorted)", names, want)
	}
}

func TestCancelStageUnknown(t *testing.T) {
	_, err := plain(t).CancelStage(timeout(t, wait), unique(t, "go-nobody"))
	wantError(t, err, codes.NotFound, "NOT_FOUND")
}
