package interop

import (
	"regexp"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchain"
	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

var uuid = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// invalid has two invalid fields: no user prompt and a temperature above 2.0.
func invalid() *pb.StageRequest {
	return &pb.StageRequest{ToolPhase: &pb.PhaseOptions{Temperature: proto.Float64(3.0)}}
}

func checkViolations(t *testing.T, e *toolchain.Error) {
	t.Helper()
	if len(e.FieldViolations) != 2 {
		t.Fatalf("field violations %v, want 2", e.FieldViolations)
	}
	for _, field := range []string{"stage.user_prompt", "stage.tool_phase.temperature"} {
		if d, ok := e.Violation(field); !ok || d == "" {
			t.Fatalf("no described violation of %s in %v", field, e.FieldViolations)
		}
	}
	if e.Retryable || e.RetryDelay != 0 {
		t.Fatalf("an invalid request is retryable: %v", e)
	}
}

// Test 6, unary: both field violations decoded from BadRequest.
func TestInvalidRequestUnary(t *testing.T) {
	_, err := plain(t).RunTools(timeout(t, wait), invalid())
	e := wantError(t, err, codes.InvalidArgument, "INVALID_REQUEST")
	checkViolations(t, e)
	if e.Phase != pb.Phase_PHASE_UNSPECIFIED {
		t.Fatalf("phase %v, want PHASE_UNSPECIFIED (no phase started)", e.Phase)
	}
}

// Test 6, stream: one StageError event, sequence 0, with a server-generated
// stage_id, agreeing with the status.
func TestInvalidRequestStream(t *testing.T) {
	stream, err := plain(t).StreamSynthesis(timeout(t, wait), invalid())
	if err != nil {
		t.Fatal(err)
	}
	evs, err := events(t, stream)
	e := wantError(t, err, codes.InvalidArgument, "INVALID_REQUEST")
	if len(evs) != 1 || evs[0].GetError() == nil || evs[0].GetSequence() != 0 {
		t.Fatalf("events %v, want one StageError at sequence 0", evs)
	}
	if id := evs[0].GetStageId(); !uuid.MatchString(id) || e.StageID != id {
		t.Fatalf("stage_id %q (error's %q), want one server-generated UUID", id, e.StageID)
	}
	if len(e.StageError.GetFieldViolations()) != 2 {
		t.Fatalf("StageError.field_violations %v, want 2", e.StageError.GetFieldViolations())
	}
	checkViolations(t, e)
}

// Test 7: retryable errors with their delays, unary and streamed.
func TestRetryable(t *testing.T) {
	cases := []struct {
		marker, reason string
		delay          time.Duration
	}{
		{"[unavailable]", "BACKEND_UNAVAILABLE", 3 * time.Second},
		{"[ratelimited]", "BACKEND_RATE_LIMITED", 2 * time.Second},
	}
	check := func(t *testing.T, e *toolchain.Error, delay time.Duration) {
		t.Helper()
		if !e.Retryable || e.RetryDelay != delay {
			t.Fatalf("retryable %v delay %s, want a retry after %s", e.Retryable, e.RetryDelay, delay)
		}
		if e.Metadata["phase"] != "PHASE_TOOL" || e.Phase != pb.Phase_PHASE_TOOL {
			t.Fatalf("metadata %v phase %v, want PHASE_TOOL", e.Metadata, e.Phase)
		}
	}
	for _, c := range cases {
		t.Run(c.reason, func(t *testing.T) {
			client := plain(t)
			_, err := client.RunTools(timeout(t, wait), &pb.StageRequest{UserPrompt: "What is 6*7? " + c.marker})
			check(t, wantError(t, err, codes.Unavailable, c.reason), c.delay)
			_, err = client.RunSynthesis(timeout(t, wait), &pb.StageRequest{UserPrompt: "What is 6*7? " + c.marker})
			check(t, wantError(t, err, codes.Unavailable, c.reason), c.delay)

			stream, err := client.StreamSynthesis(timeout(t, wait), &pb.StageRequest{UserPrompt: "What is 6*7? " + c.marker})
			if err != nil {
				t.Fatal(err)
			}
			evs, err := events(t, stream)
			e := wantError(t, err, codes.Unavailable, c.reason)
			check(t, e, c.delay)
			if len(evs) == 0 || evs[len(evs)-1].GetError() == nil {
				t.Fatalf("events %v, want a StageError last", evs)
			}
			se := e.StageError
			if !se.GetRetryable() || se.GetRetryDelay().AsDuration() != c.delay || se.GetReason() != c.reason ||
				se.GetPhase() != pb.Phase_PHASE_TOOL || codes.Code(se.GetCode()) != codes.Unavailable {
				t.Fatalf("StageError %v, want retryable UNAVAILABLE %s after %s in PHASE_TOOL", se, c.reason, c.delay)
			}
		})
	}
}
