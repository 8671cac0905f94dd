package interop

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

// Test 3: cancelling the call client-side closes the backend request.
func TestClientCancelClosesBackendRequest(t *testing.T) {
	tag := unique(t, "go-client-cancel")
	ctx, cancel := context.WithCancel(timeout(t, wait))
	defer cancel()
	stream, err := plain(t).StreamSynthesis(ctx, &pb.StageRequest{UserPrompt: hang(tag)})
	if err != nil {
		t.Fatal(err)
	}
	firstChunk(t, stream)
	cancel()
	_, err = events(t, stream)
	e := wantError(t, err, codes.Canceled, "")
	if e.Cancel != nil || e.StageError != nil {
		t.Fatalf("a local cancel came with a server event: %v", e)
	}
	if !closed(t, tag) {
		t.Fatalf("the backend request [hang tag=%s] is still open after the client cancelled", tag)
	}
}

// Test 4: CancelStage from a second connection ends the stream with a Cancel
// event (CANCEL_STAGE) and CANCELLED.
func TestCancelStageFromAnotherConnection(t *testing.T) {
	tag := unique(t, "go-cancel-stage")
	id := unique(t, "go-stage")
	stream, err := plain(t).StreamSynthesis(timeout(t, wait), &pb.StageRequest{StageId: id, UserPrompt: hang(tag)})
	if err != nil {
		t.Fatal(err)
	}
	firstChunk(t, stream)
	other := plain(t) // a second channel
	resp, err := other.CancelStage(timeout(t, wait), id)
	if err != nil {
		t.Fatalf("CancelStage: %v", err)
	}
	if resp.GetStageId() != id {
		t.Fatalf("CancelStage answered stage_id %q, want %q", resp.GetStageId(), id)
	}
	evs, err := events(t, stream)
	e := wantError(t, err, codes.Canceled, "")
	if len(evs) == 0 || evs[len(evs)-1].GetCancel() == nil {
		t.Fatalf("events %v, want a Cancel event last", evs)
	}
	if r := e.Cancel.GetReason(); r != pb.CancelReason_CANCEL_REASON_CANCEL_STAGE {
		t.Fatalf("Cancel reason %v, want CANCEL_STAGE", r)
	}
	if e.StageID != id || stream.StageID() != id {
		t.Fatalf("stage ids %q %q, want %q", e.StageID, stream.StageID(), id)
	}
	if !closed(t, tag) {
		t.Fatalf("the backend request [hang tag=%s] is still open after CancelStage", tag)
	}
	// Now the stage has ended, CancelStage does not know it.
	_, err = other.CancelStage(timeout(t, wait), id)
	wantError(t, err, codes.NotFound, "NOT_FOUND")
}

// Test 5: a deadline ends the stream DEADLINE_EXCEEDED, with a Cancel event
// of reason DEADLINE or without one (the helper accepts both).
func TestDeadline(t *testing.T) {
	tag := unique(t, "go-deadline")
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	stream, err := plain(t).StreamSynthesis(ctx, &pb.StageRequest{UserPrompt: hang(tag)})
	if err != nil {
		t.Fatal(err)
	}
	evs, err := events(t, stream)
	e := wantError(t, err, codes.DeadlineExceeded, "")
	t.Logf("%d events before DEADLINE_EXCEEDED; Cancel event: %v", len(evs), e.Cancel)
	for _, ev := range evs {
		if c := ev.GetCancel(); c != nil && c.GetReason() != pb.CancelReason_CANCEL_REASON_DEADLINE {
			t.Fatalf("Cancel event reason %v, want DEADLINE", c.GetReason())
		}
		if ev.GetError() != nil || ev.GetDone() != nil {
			t.Fatalf("event %v on a stage past its deadline", ev)
		}
	}
	if e.Cancel != nil && e.Cancel.GetReason() != pb.CancelReason_CANCEL_REASON_DEADLINE {
		t.Fatalf("error carries Cancel %v", e.Cancel)
	}
}
