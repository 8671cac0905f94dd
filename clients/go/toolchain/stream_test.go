package toolchain

import (
	"context"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

// These tests need no server: they feed the stream helper scripted events and
// a final status, and check what a reader observes.

func chunk(phase pb.Phase, round int32, text string) *pb.StageEvent {
	return &pb.StageEvent{Event: &pb.StageEvent_Chunk{Chunk: &pb.Chunk{Phase: phase, Content: text, Round: round}}}
}

// tool and syn are chunks of the tool phase and of the synthesis phase.
func tool(round int32, text string) *pb.StageEvent { return chunk(pb.Phase_PHASE_TOOL, round, text) }
func syn(round int32, text string) *pb.StageEvent {
	return chunk(pb.Phase_PHASE_SYNTHESIS, round, text)
}

func summary(round int32) *pb.StageEvent {
	return &pb.StageEvent{Event: &pb.StageEvent_ToolSummary{ToolSummary: &pb.ToolSummary{Round: round}}}
}

func done() *pb.StageEvent {
	return &pb.StageEvent{Event: &pb.StageEvent_Done{Done: &pb.Done{Text: "ok"}}}
}

func cancelEv(r pb.CancelReason) *pb.StageEvent {
	return &pb.StageEvent{Event: &pb.StageEvent_Cancel{Cancel: &pb.Cancel{Reason: r}}}
}

func stageErr(se *pb.StageError) *pb.StageEvent {
	return &pb.StageEvent{Event: &pb.StageEvent_Error{Error: se}}
}

// numbered gives the events stage_id "s" and sequences 0, 1, 2, ...
func numbered(events ...*pb.StageEvent) []*pb.StageEvent {
	for i, ev := range events {
		ev.StageId, ev.Sequence = "s", uint32(i)
	}
	return events
}

// script is a stream over events whose end is final (nil: status OK).
func script(synthesis bool, events []*pb.StageEvent, final error) *Stream {
	ctx, cancel := context.WithCancel(context.Background())
	i := 0
	return newStream(ctx, cancel, synthesis, func() (*pb.StageEvent, error) {
		if i < len(events) {
			i++
			return events[i-1], nil
		}
		if final == nil {
			return nil, io.EOF
		}
		return nil, final
	})
}

func drain(s *Stream) (int, error) {
	n := 0
	for {
		_, err := s.Recv()
		if err != nil {
			return n, err
		}
		n++
	}
}

func unavailable(t *testing.T) (*pb.StageError, error) {
	t.Helper()
	st, err := status.New(codes.Unavailable, "backend down").WithDetails(
		&errdetails.ErrorInfo{Reason: "BACKEND_UNAVAILABLE", Domain: Domain, Metadata: map[string]string{"phase": "PHASE_TOOL"}},
		&errdetails.RetryInfo{RetryDelay: durationpb.New(3 * time.Second)},
	)
	if err != nil {
		t.Fatal(err)
	}
	se := &pb.StageError{
		Code: int32(codes.Unavailable), Message: "backend down", Phase: pb.Phase_PHASE_TOOL,
		Retryable: true, Reason: "BACKEND_UNAVAILABLE", RetryDelay: durationpb.New(3 * time.Second),
	}
	return se, st.Err()
}

func TestStreamFinished(t *testing.T) {
	s := script(true, numbered(tool(1, "a"), summary(1), syn(2, "b"), done()), nil)
	d, err := s.Wait()
	if err != nil || d.GetText() != "ok" {
		t.Fatalf("Wait() = %v, %v; want Done, nil", d, err)
	}
	if s.StageID() != "s" || s.Terminal().GetDone() == nil {
		t.Fatalf("StageID %q Terminal %v", s.StageID(), s.Terminal())
	}
	if _, err := s.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("Recv after the end = %v, want io.EOF", err)
	}
}

// Three tool rounds, then the synthesis phase as round 4.
func TestStreamRounds(t *testing.T) {
	evs := numbered(tool(1, "a"), tool(1, "b"), summary(1), tool(2, "c"), summary(2), summary(3),
		syn(4, "d"), syn(4, "e"), done())
	s := script(true, evs, nil)
	for i := range evs {
		ev, err := s.Recv()
		if err != nil || ev != evs[i] {
			t.Fatalf("event %d: %v, %v", i, ev, err)
		}
		if want := []int{0, 0, 1, 1, 2, 3, 3, 3, 3}[i]; s.Rounds() != want {
			t.Fatalf("after event %d: Rounds() = %d, want %d", i, s.Rounds(), want)
		}
	}
	if _, err := s.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("end: %v, want io.EOF", err)
	}
}

// Tools-only streams have rounds too, and no synthesis chunks.
func TestStreamToolRounds(t *testing.T) {
	s := script(false, numbered(tool(1, "a"), summary(1), tool(2, "b"), summary(2), tool(3, "c"), summary(3), done()), nil)
	if d, err := s.Wait(); err != nil || d == nil || s.Rounds() != 3 {
		t.Fatalf("Wait() = %v, %v; Rounds() = %d", d, err, s.Rounds())
	}
}

// A stage that fails in its second round ends with the StageError, no Done.
func TestStreamRoundFails(t *testing.T) {
	se, final := unavailable(t)
	s := script(true, numbered(tool(1, "a"), summary(1), tool(2, "b"), stageErr(se)), final)
	n, err := drain(s)
	var e *Error
	if n != 4 || !errors.As(err, &e) || e.Code != codes.Unavailable || s.Rounds() != 1 {
		t.Fatalf("n %d err %v", n, err)
	}
}

// A server from before tool rounds numbers nothing: round 0 on every event.
func TestStreamWithoutRoundNumbers(t *testing.T) {
	for _, synthesis := range []bool{true, false} {
		evs := []*pb.StageEvent{tool(0, "a"), summary(0)}
		if synthesis {
			evs = append(evs, syn(0, "b"))
		}
		s := script(synthesis, numbered(append(evs, done())...), nil)
		if d, err := s.Wait(); err != nil || d == nil || s.Rounds() != 1 {
			t.Fatalf("synthesis %v: Wait() = %v, %v; Rounds() = %d", synthesis, d, err, s.Rounds())
		}
	}
}

func TestStreamStageError(t *testing.T) {
	se, final := unavailable(t)
	_, err := drain(script(true, numbered(stageErr(se)), final))
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("err = %v, want *Error", err)
	}
	if e.Code != codes.Unavailable || e.Reason != "BACKEND_UNAVAILABLE" || !e.Retryable || e.RetryDelay != 3*time.Second ||
		e.Phase != pb.Phase_PHASE_TOOL || e.StageError == nil || e.StageID != "s" {
		t.Fatalf("decoded %+v", e)
	}
	if r, ok := e.ErrorReason(); !ok || r != pb.ErrorReason_BACKEND_UNAVAILABLE {
		t.Fatalf("ErrorReason() = %v, %v", r, ok)
	}
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("status.Code = %v", status.Code(err))
	}
}

func TestStreamCancel(t *testing.T) {
	for _, c := range []codes.Code{codes.Canceled, codes.DeadlineExceeded} {
		_, err := drain(script(true, numbered(tool(1, "x"), cancelEv(pb.CancelReason_CANCEL_REASON_CANCEL_STAGE)), status.Error(c, "cancelled")))
		var e *Error
		if !errors.As(err, &e) || e.Code != c || e.Cancel.GetReason() != pb.CancelReason_CANCEL_REASON_CANCEL_STAGE {
			t.Fatalf("%v: err = %v", c, err)
		}
	}
}

func TestStreamStatusWithoutTerminal(t *testing.T) {
	n, err := drain(script(true, numbered(tool(1, "x")), status.Error(codes.DeadlineExceeded, "deadline")))
	var e *Error
	if n != 1 || !errors.As(err, &e) || e.Code != codes.DeadlineExceeded {
		t.Fatalf("n %d err %v", n, err)
	}
}

func TestStreamViolations(t *testing.T) {
	se, final := unavailable(t)
	other := proto.Clone(se).(*pb.StageError)
	other.RetryDelay = durationpb.New(2 * time.Second)
	gap := numbered(tool(1, "a"), summary(1), done())
	gap[2].Sequence = 3
	changed := numbered(tool(1, "a"), summary(1), done())
	changed[1].StageId = "t"
	empty := numbered(stageErr(se))
	empty[0].StageId = ""
	cases := map[string]struct {
		synthesis bool
		events    []*pb.StageEvent
		final     error
		problem   string
	}{
		"gap":                 {true, gap, nil, "sequence 3 where 2 was due"},
		"stage_id changes":    {true, changed, nil, `stage_id "t"`},
		"empty stage_id":      {true, empty, final, "empty stage_id"},
		"no terminal":         {true, numbered(tool(1, "a"), summary(1)), nil, "without a terminal event"},
		"two terminals":       {true, numbered(summary(1), done(), done()), nil, "after the terminal event"},
		"done then error":     {true, numbered(summary(1), done()), final, "after a Done event"},
		"cancel then OK":      {true, numbered(cancelEv(pb.CancelReason_CANCEL_REASON_CANCEL_STAGE)), nil, "status OK after a Cancel"},
		"cancel then other":   {true, numbered(cancelEv(pb.CancelReason_CANCEL_REASON_CANCEL_STAGE)), final, "UNAVAILABLE after a Cancel"},
		"error then OK":       {true, numbered(stageErr(se)), nil, "status OK after a StageError"},
		"error code differs":  {true, numbered(stageErr(se)), status.Error(codes.Internal, "backend down"), "code UNAVAILABLE vs INTERNAL"},
		"retry delay differs": {true, numbered(stageErr(other)), final, "retry_delay 2s vs RetryInfo 3s"},
		"synthesis in tools":  {false, numbered(summary(1), syn(2, "b"), done()), nil, "tools-only"},
		"synthesis first":     {true, numbered(syn(1, "b"), summary(1), done()), nil, "synthesis chunk before the ToolSummary"},
		"done, no summary":    {true, numbered(tool(1, "a"), done()), nil, "without a ToolSummary"},
		"unset event":         {true, numbered(&pb.StageEvent{}), nil, "none of its oneof"},
		// Tool rounds.
		"summary repeated":        {true, numbered(summary(1), summary(1), done()), nil, "ToolSummary of round 1 where round 2 was due"},
		"summary round skipped":   {true, numbered(tool(1, "a"), summary(1), tool(2, "b"), summary(3), done()), nil, "ToolSummary of round 3 where round 2 was due"},
		"first summary round 2":   {true, numbered(summary(2), done()), nil, "ToolSummary of round 2 where round 1 was due"},
		"tool chunk, old round":   {true, numbered(summary(1), tool(1, "b"), summary(2), done()), nil, "tool phase chunk of round 1 where round 2 was due"},
		"tool chunk, next round":  {true, numbered(tool(1, "a"), tool(2, "b"), summary(1), done()), nil, "tool phase chunk of round 2 where round 1 was due"},
		"tool chunk, round 0":     {true, numbered(tool(1, "a"), summary(1), tool(0, "b"), summary(2), done()), nil, "tool phase chunk of round 0 where round 2 was due"},
		"tool after synthesis":    {true, numbered(summary(1), syn(2, "b"), tool(2, "c"), summary(2), done()), nil, "tool phase chunk after the synthesis phase started"},
		"summary after synthesis": {true, numbered(summary(1), syn(2, "b"), summary(2), done()), nil, "ToolSummary after the synthesis phase started"},
		"synthesis round":         {true, numbered(summary(1), summary(2), syn(2, "b"), done()), nil, "synthesis chunk of round 2 where round 3 was due"},
		"synthesis round 0":       {true, numbered(tool(1, "a"), summary(1), syn(0, "b"), done()), nil, "synthesis chunk of round 0 where round 2 was due"},
		// A server without round numbers (round 0 throughout): the one-round rules.
		"old: numbered later":   {true, numbered(tool(0, "a"), summary(1), done()), nil, "ToolSummary of round 1 in a stream whose earlier events had round 0"},
		"old: synthesis round":  {true, numbered(summary(0), syn(1, "b"), done()), nil, "synthesis chunk of round 1 in a stream whose earlier"},
		"old: second summary":   {true, numbered(summary(0), summary(0), done()), nil, "second ToolSummary"},
		"old: tool after summ.": {true, numbered(summary(0), tool(0, "b"), done()), nil, "tool phase chunk after the ToolSummary"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := drain(script(c.synthesis, c.events, c.final))
			var p *ProtocolError
			if !errors.As(err, &p) || !strings.Contains(p.Problem, c.problem) {
				t.Fatalf("err = %v, want a ProtocolError about %q", err, c.problem)
			}
		})
	}
}

func TestFromError(t *testing.T) {
	st, err := status.New(codes.InvalidArgument, "bad").WithDetails(
		&errdetails.ErrorInfo{Reason: "INVALID_REQUEST", Domain: Domain, Metadata: map[string]string{"phase": "PHASE_UNSPECIFIED"}},
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: "stage.user_prompt", Description: "required"},
			{Field: "stage.tool_phase.temperature", Description: "0.0 to 2.0"},
		}},
	)
	if err != nil {
		t.Fatal(err)
	}
	e := FromError(st.Err())
	if e.Code != codes.InvalidArgument || e.Reason != "INVALID_REQUEST" || e.Retryable || len(e.FieldViolations) != 2 {
		t.Fatalf("decoded %+v", e)
	}
	if d, ok := e.Violation("stage.tool_phase.temperature"); !ok || d != "0.0 to 2.0" {
		t.Fatalf("Violation = %q, %v", d, ok)
	}
	want := "toolchain: INVALID_ARGUMENT (INVALID_REQUEST): bad; stage.user_prompt: required; stage.tool_phase.temperature: 0.0 to 2.0"
	if e.Error() != want {
		t.Fatalf("Error() = %q", e.Error())
	}
	if FromError(nil) != nil || FromError(e) != e {
		t.Fatal("FromError(nil) or FromError(*Error) changed")
	}
	if c := FromError(context.DeadlineExceeded).Code; c != codes.DeadlineExceeded {
		t.Fatalf("context error: %v", c)
	}
	if _, ok := FromError(status.Error(codes.Unknown, "x")).ErrorReason(); ok {
		t.Fatal("an empty reason is known")
	}
}

func TestToolCalls(t *testing.T) {
	var calls ToolCalls
	calls.Add(&pb.Chunk{ToolCalls: []*pb.ToolCallDelta{{Index: 1, Id: "b", Name: "y"}, {Index: 0, Id: "a", Name: "x", ArgumentsFragment: `{"e":`}}})
	calls.Add(&pb.Chunk{ToolCalls: []*pb.ToolCallDelta{{Index: 0, ArgumentsFragment: `1}`}}})
	got := calls.List()
	if len(got) != 2 || got[0] != (ToolCall{0, "a", "x", `{"e":1}`, 0}) || got[1] != (ToolCall{1, "b", "y", "", 0}) {
		t.Fatalf("List() = %+v", got)
	}
}

// Indexes start at 0 in every round: the calls of two rounds stay apart.
func TestToolCallsRounds(t *testing.T) {
	var calls ToolCalls
	calls.Add(&pb.Chunk{Round: 2, ToolCalls: []*pb.ToolCallDelta{{Index: 0, Id: "r2", Name: "calculator", ArgumentsFragment: `{"expression": "2*3"}`}}})
	calls.Add(&pb.Chunk{Round: 1, ToolCalls: []*pb.ToolCallDelta{{Index: 0, Id: "r1", Name: "calculator", ArgumentsFragment: `{"expression":`}}})
	calls.Add(&pb.Chunk{Round: 1, ToolCalls: []*pb.ToolCallDelta{{Index: 0, ArgumentsFragment: ` "1+1"}`}}})
	got := calls.List()
	want := []ToolCall{
		{Index: 0, ID: "r1", Name: "calculator", Arguments: `{"expression": "1+1"}`, Round: 1},
		{Index: 0, ID: "r2", Name: "calculator", Arguments: `{"expression": "2*3"}`, Round: 2},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("List() = %+v, want %+v", got, want)
	}
	if r := calls.Round(2); !slices.Equal(r, want[1:]) {
		t.Fatalf("Round(2) = %+v", r)
	}
	if r := calls.Round(3); len(r) != 0 {
		t.Fatalf("Round(3) = %+v", r)
	}
}
