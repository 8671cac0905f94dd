package interop

import (
	"encoding/json"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchain"
	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

// The [rounds3] scenario: one calculator call per tool round, then a text
// answer once the model has three results (or no tools).
const (
	rounds3      = "What is 6*7 in three steps? [rounds3]"
	roundsAnswer = "After three rounds: 42."
)

// roundCalls is the call of each round of [rounds3]: its id, its expression
// and the calculator's result.
var roundCalls = []struct {
	id, expression string
	result         float64
}{
	{"call_r1", "1+1", 2},
	{"call_r2", "2*3", 6},
	{"call_r3", "6*7", 42},
}

func rounds(n int32) *pb.StageRequest {
	return &pb.StageRequest{UserPrompt: rounds3, MaxRounds: proto.Int32(n)}
}

// checkRoundResult asserts the one call of [rounds3]'s round r (from 1).
func checkRoundResult(t *testing.T, r int, res *pb.ToolCallResult) {
	t.Helper()
	want := roundCalls[r-1]
	if res.GetToolName() != "calculator" || res.GetCallId() != want.id || res.GetOutcome() != pb.ToolOutcome_TOOL_OUTCOME_OK ||
		res.GetError() != "" || res.GetRound() != int32(r) || res.GetTruncated() {
		t.Fatalf("round %d: tool result %v, want calculator %s OK of round %d", r, res, want.id, r)
	}
	var args map[string]any
	if err := json.Unmarshal([]byte(res.GetArguments()), &args); err != nil || args["expression"] != want.expression {
		t.Fatalf("round %d: arguments %q, want {\"expression\": %q}", r, res.GetArguments(), want.expression)
	}
	if v := res.GetResult().GetStructValue().GetFields()["result"]; v.GetNumberValue() != want.result {
		t.Fatalf("round %d: result %v, want {\"result\": %v, ...}", r, res.GetResult(), want.result)
	}
}

// checkRoundResults asserts the results of rounds 1..n, in order.
func checkRoundResults(t *testing.T, n int, results []*pb.ToolCallResult) {
	t.Helper()
	if len(results) != n {
		t.Fatalf("%d tool results, want %d (one per round): %v", len(results), n, results)
	}
	for i, res := range results {
		checkRoundResult(t, i+1, res)
	}
}

func addUsage(a, b *pb.Usage) *pb.Usage {
	return &pb.Usage{
		PromptTokens:     a.GetPromptTokens() + b.GetPromptTokens(),
		CompletionTokens: a.GetCompletionTokens() + b.GetCompletionTokens(),
		TotalTokens:      a.GetTotalTokens() + b.GetTotalTokens(),
	}
}

// checkRoundStats asserts the per-round statistics (rounds 1..n, usage on
// each), the whole tool phase (round 0, usage summed, the last round's finish
// reason) and total_usage (every model call: the rounds and the synthesis
// phase when there was one).
func checkRoundStats(t *testing.T, n int, toolRounds []*pb.PhaseStats, toolPhase, synthesis *pb.PhaseStats, total *pb.Usage) {
	t.Helper()
	if len(toolRounds) != n {
		t.Fatalf("%d tool_rounds, want %d: %v", len(toolRounds), n, toolRounds)
	}
	sum := &pb.Usage{}
	for i, s := range toolRounds {
		if s.GetRound() != int32(i+1) {
			t.Fatalf("tool_rounds[%d].round = %d, want %d", i, s.GetRound(), i+1)
		}
		checkUsage(t, "tool round", s)
		sum = addUsage(sum, s.GetUsage())
	}
	// A whole phase is round 0; a phase of one round may be either.
	if r := toolPhase.GetRound(); (r != 0 && (n != 1 || r != 1)) || toolPhase.GetFinishReason() != toolRounds[n-1].GetFinishReason() {
		t.Fatalf("tool_phase %v, want round 0 (the whole phase) and the last round's finish reason %q", toolPhase, toolRounds[n-1].GetFinishReason())
	}
	if !proto.Equal(toolPhase.GetUsage(), sum) {
		t.Fatalf("tool_phase usage %v, want the rounds' usage summed: %v", toolPhase.GetUsage(), sum)
	}
	if synthesis != nil {
		checkUsage(t, "synthesis phase", synthesis)
		sum = addUsage(sum, synthesis.GetUsage())
	}
	if total == nil || !proto.Equal(total, sum) {
		t.Fatalf("total_usage %v, want every model call's usage summed: %v", total, sum)
	}
}

// roundsStream is what a [rounds3] stream held, by round.
type roundsStream struct {
	summaries []*pb.ToolSummary
	toolText  map[int32]string // tool phase text by round
	synText   strings.Builder
	synRounds map[int32]int // synthesis chunks by round
	calls     toolchain.ToolCalls
	done      *pb.Done
}

func readRounds(t *testing.T, s *toolchain.Stream) *roundsStream {
	t.Helper()
	evs, err := events(t, s)
	if err != nil {
		t.Fatalf("stream failed: %v", err)
	}
	out := &roundsStream{toolText: map[int32]string{}, synRounds: map[int32]int{}}
	for _, ev := range evs {
		switch e := ev.Event.(type) {
		case *pb.StageEvent_Chunk:
			switch e.Chunk.GetPhase() {
			case pb.Phase_PHASE_TOOL:
				out.toolText[e.Chunk.GetRound()] += e.Chunk.GetContent()
				out.calls.Add(e.Chunk)
			case pb.Phase_PHASE_SYNTHESIS:
				out.synRounds[e.Chunk.GetRound()]++
				out.synText.WriteString(e.Chunk.GetContent())
			}
		case *pb.StageEvent_ToolSummary:
			out.summaries = append(out.summaries, e.ToolSummary)
		case *pb.StageEvent_Done:
			out.done = e.Done
		default:
			t.Fatalf("unexpected event %v", ev)
		}
	}
	if s.Rounds() != len(out.summaries) {
		t.Fatalf("Rounds() = %d after %d summaries", s.Rounds(), len(out.summaries))
	}
	return out
}

// checkStreamedCalls asserts the calls assembled from the tool chunks of
// rounds 1..n: one per round, index 0 in each.
func checkStreamedCalls(t *testing.T, n int, calls *toolchain.ToolCalls) {
	t.Helper()
	got := calls.List()
	if len(got) != n {
		t.Fatalf("assembled tool calls %+v, want %d (one per round)", got, n)
	}
	for i, c := range got {
		want := roundCalls[i]
		var args map[string]any
		if c.Round != int32(i+1) || c.Index != 0 || c.ID != want.id || c.Name != "calculator" ||
			json.Unmarshal([]byte(c.Arguments), &args) != nil || args["expression"] != want.expression {
			t.Fatalf("assembled call %+v, want round %d index 0 %s calculator %q", c, i+1, want.id, want.expression)
		}
	}
}

// Three tool rounds, then the synthesis phase (round 4) on all three results.
func TestStreamSynthesisRounds3(t *testing.T) {
	stream, err := plain(t).StreamSynthesis(timeout(t, wait), rounds(3))
	if err != nil {
		t.Fatal(err)
	}
	got := readRounds(t, stream)
	if len(got.summaries) != 3 {
		t.Fatalf("%d ToolSummary events, want 3: %v", len(got.summaries), got.summaries)
	}
	for i, s := range got.summaries {
		if s.GetRound() != int32(i+1) || len(s.GetResults()) != 1 {
			t.Fatalf("summary %d: %v, want round %d with one result", i, s, i+1)
		}
		checkRoundResult(t, i+1, s.GetResults()[0])
	}
	checkStreamedCalls(t, 3, &got.calls)
	if len(got.synRounds) != 1 || got.synRounds[4] == 0 || got.synText.String() != roundsAnswer {
		t.Fatalf("synthesis chunks by round %v saying %q, want round 4 only, saying %q", got.synRounds, got.synText.String(), roundsAnswer)
	}
	d := got.done
	if d.GetText() != roundsAnswer || !d.GetRoundsExhausted() || d.GetSynthesisPhase() == nil {
		t.Fatalf("Done %v, want text %q, rounds_exhausted, a synthesis phase", d, roundsAnswer)
	}
	checkRoundStats(t, 3, d.GetToolRounds(), d.GetToolPhase(), d.GetSynthesisPhase(), d.GetTotalUsage())
}

func TestRunSynthesisRounds3(t *testing.T) {
	resp, err := plain(t).RunSynthesis(timeout(t, wait), rounds(3))
	if err != nil {
		t.Fatal(err)
	}
	checkRoundResults(t, 3, resp.GetToolResults())
	if resp.GetText() != roundsAnswer || !resp.GetRoundsExhausted() || resp.GetSynthesisPhase() == nil {
		t.Fatalf("%v, want text %q, rounds_exhausted, a synthesis phase", resp, roundsAnswer)
	}
	checkRoundStats(t, 3, resp.GetToolRounds(), resp.GetToolPhase(), resp.GetSynthesisPhase(), resp.GetTotalUsage())
}

// Tools only, three rounds allowed: the third still calls, so the rounds are
// exhausted and Done.text is that round's text (none).
func TestStreamToolsRounds3(t *testing.T) {
	stream, err := plain(t).StreamTools(timeout(t, wait), rounds(3))
	if err != nil {
		t.Fatal(err)
	}
	got := readRounds(t, stream)
	if len(got.summaries) != 3 {
		t.Fatalf("%d ToolSummary events, want 3", len(got.summaries))
	}
	for i, s := range got.summaries {
		if s.GetRound() != int32(i+1) || len(s.GetResults()) != 1 {
			t.Fatalf("summary %d: %v, want round %d with one result", i, s, i+1)
		}
		checkRoundResult(t, i+1, s.GetResults()[0])
	}
	checkStreamedCalls(t, 3, &got.calls)
	d := got.done
	if !d.GetRoundsExhausted() || d.GetText() != "" || d.GetSynthesisPhase() != nil {
		t.Fatalf("Done %v, want rounds_exhausted, no text, no synthesis phase", d)
	}
	checkRoundStats(t, 3, d.GetToolRounds(), d.GetToolPhase(), nil, d.GetTotalUsage())
}

// Four rounds allowed: the fourth makes no call and answers in text, which
// ends the loop; its summary is empty and nothing is exhausted.
func TestStreamToolsRounds4(t *testing.T) {
	stream, err := plain(t).StreamTools(timeout(t, wait), rounds(4))
	if err != nil {
		t.Fatal(err)
	}
	got := readRounds(t, stream)
	if len(got.summaries) != 4 || got.summaries[3].GetRound() != 4 || len(got.summaries[3].GetResults()) != 0 {
		t.Fatalf("summaries %v, want 4, the last (round 4) empty", got.summaries)
	}
	for i, s := range got.summaries[:3] {
		if s.GetRound() != int32(i+1) || len(s.GetResults()) != 1 {
			t.Fatalf("summary %d: %v, want round %d with one result", i, s, i+1)
		}
		checkRoundResult(t, i+1, s.GetResults()[0])
	}
	checkStreamedCalls(t, 3, &got.calls)
	if got.toolText[4] != roundsAnswer || len(got.synRounds) != 0 {
		t.Fatalf("round 4 tool text %q, synthesis chunks %v; want %q and none", got.toolText[4], got.synRounds, roundsAnswer)
	}
	d := got.done
	if d.GetRoundsExhausted() || d.GetText() != roundsAnswer || d.GetSynthesisPhase() != nil {
		t.Fatalf("Done %v, want text %q, not exhausted, no synthesis phase", d, roundsAnswer)
	}
	checkRoundStats(t, 4, d.GetToolRounds(), d.GetToolPhase(), nil, d.GetTotalUsage())
}

func TestRunToolsRounds4(t *testing.T) {
	resp, err := plain(t).RunTools(timeout(t, wait), rounds(4))
	if err != nil {
		t.Fatal(err)
	}
	checkRoundResults(t, 3, resp.GetToolResults())
	if resp.GetText() != roundsAnswer || resp.GetRoundsExhausted() {
		t.Fatalf("%v, want text %q, not exhausted", resp, roundsAnswer)
	}
	checkRoundStats(t, 4, resp.GetToolRounds(), resp.GetToolPhase(), nil, resp.GetTotalUsage())
}

// max_rounds unset: one round, as before rounds existed; its call made, the
// synthesis phase (round 2) answers.
func TestStreamSynthesisRoundsDefault(t *testing.T) {
	stream, err := plain(t).StreamSynthesis(timeout(t, wait), &pb.StageRequest{UserPrompt: rounds3})
	if err != nil {
		t.Fatal(err)
	}
	got := readRounds(t, stream)
	if len(got.summaries) != 1 || got.summaries[0].GetRound() != 1 || len(got.summaries[0].GetResults()) != 1 {
		t.Fatalf("summaries %v, want exactly one (round 1) with one result", got.summaries)
	}
	checkRoundResult(t, 1, got.summaries[0].GetResults()[0])
	if len(got.synRounds) != 1 || got.synRounds[2] == 0 || got.done.GetText() != roundsAnswer {
		t.Fatalf("synthesis chunks by round %v, Done.text %q; want round 2, %q", got.synRounds, got.done.GetText(), roundsAnswer)
	}
	// One round is the classic stage: never "exhausted" (StageRequest.max_rounds).
	if got.done.GetRoundsExhausted() {
		t.Fatalf("Done %v: rounds_exhausted set on a one-round stage", got.done)
	}
	d := got.done
	checkRoundStats(t, 1, d.GetToolRounds(), d.GetToolPhase(), d.GetSynthesisPhase(), d.GetTotalUsage())
}

// tool_choice NONE: the tools are not offered, so the fake answers in text
// (its synthesis answer) and no tool runs.
func TestToolChoiceNone(t *testing.T) {
	none := &pb.ToolChoice{Choice: &pb.ToolChoice_Mode{Mode: pb.ToolChoiceMode_TOOL_CHOICE_MODE_NONE}}
	stream, err := plain(t).StreamSynthesis(timeout(t, wait), &pb.StageRequest{UserPrompt: "What is 6*7? [calc]", ToolChoice: none})
	if err != nil {
		t.Fatal(err)
	}
	got := readRounds(t, stream)
	if len(got.summaries) != 1 || got.summaries[0].GetRound() != 1 || len(got.summaries[0].GetResults()) != 0 {
		t.Fatalf("summaries %v, want one empty summary of round 1", got.summaries)
	}
	if len(got.calls.List()) != 0 || got.toolText[1] != answer || len(got.synRounds) != 0 {
		t.Fatalf("calls %+v, tool text %q, synthesis chunks %v; want no call, %q, no synthesis", got.calls.List(), got.toolText[1], got.synRounds, answer)
	}
	if d := got.done; d.GetText() != answer || d.GetSynthesisPhase() != nil || d.GetRoundsExhausted() {
		t.Fatalf("Done %v, want text %q, no synthesis phase, not exhausted", d, answer)
	}

	resp, err := plain(t).RunTools(timeout(t, wait), &pb.StageRequest{UserPrompt: "What is 6*7? [calc]", ToolChoice: none})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetToolResults()) != 0 || resp.GetText() != answer {
		t.Fatalf("RunTools %v, want no results and text %q", resp, answer)
	}
}

// max_rounds outside 1 .. the server's ceiling: INVALID_ARGUMENT with a field
// violation of stage.max_rounds, unary and streamed.
func TestInvalidMaxRounds(t *testing.T) {
	for _, n := range []int32{0, 1000} {
		_, err := plain(t).RunTools(timeout(t, wait), rounds(n))
		e := wantError(t, err, codes.InvalidArgument, "INVALID_REQUEST")
		if d, ok := e.Violation("stage.max_rounds"); !ok || d == "" || len(e.FieldViolations) != 1 {
			t.Fatalf("max_rounds %d: field violations %v, want one of stage.max_rounds", n, e.FieldViolations)
		}

		stream, err := plain(t).StreamSynthesis(timeout(t, wait), rounds(n))
		if err != nil {
			t.Fatal(err)
		}
		evs, err := events(t, stream)
		e = wantError(t, err, codes.InvalidArgument, "INVALID_REQUEST")
		if len(evs) != 1 || evs[0].GetError() == nil {
			t.Fatalf("max_rounds %d: events %v, want one StageError", n, evs)
		}
		if _, ok := e.Violation("stage.max_rounds"); !ok {
			t.Fatalf("max_rounds %d: stream field violations %v, want stage.max_rounds", n, e.FieldViolations)
		}
	}
}
