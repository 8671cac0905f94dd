package toolchain

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

// Stream reads the events of a streamed stage (StreamTools or
// StreamSynthesis) and checks the contract's invariants as it goes. It is not
// safe for concurrent use.
type Stream struct {
	ctx    context.Context
	cancel context.CancelFunc
	recv   func() (*pb.StageEvent, error)
	check  checker
	err    error // the final result once the stream ended: io.EOF or an error
}

func newStream(ctx context.Context, cancel context.CancelFunc, synthesis bool, recv func() (*pb.StageEvent, error)) *Stream {
	return &Stream{ctx: ctx, cancel: cancel, recv: recv, check: checker{synthesis: synthesis}}
}

// Recv returns the next event. After the last event it returns io.EOF when
// the stage finished (a Done event and status OK), an *Error when the call
// failed (a Cancel or StageError event and the matching status, or a status
// without a terminal event: a connection failure, a local cancel or
// deadline), or a *ProtocolError when the stream broke the contract. Every
// later call returns the same.
func (s *Stream) Recv() (*pb.StageEvent, error) {
	if s.err != nil {
		return nil, s.err
	}
	ev, err := s.recv()
	if err != nil {
		s.finish(s.check.end(err, s.ctx.Err()))
		return nil, s.err
	}
	if perr := s.check.event(ev); perr != nil {
		s.finish(perr)
		return nil, s.err
	}
	return ev, nil
}

func (s *Stream) finish(err error) {
	s.err = err
	s.cancel()
}

// All iterates over the remaining events. The iteration ends after the last
// event when the stage finished, or with one (nil, err) pair where Recv
// returns an error other than io.EOF. Breaking out of the loop cancels the
// call.
func (s *Stream) All() iter.Seq2[*pb.StageEvent, error] {
	return func(yield func(*pb.StageEvent, error) bool) {
		for {
			ev, err := s.Recv()
			if errors.Is(err, io.EOF) {
				return
			}
			if err != nil {
				yield(nil, err)
				return
			}
			if !yield(ev, nil) {
				s.Close()
				return
			}
		}
	}
}

// Wait reads the remaining events and returns the Done event of a finished
// stage, or the error Recv ended with.
func (s *Stream) Wait() (*pb.Done, error) {
	for _, err := range s.All() {
		if err != nil {
			return nil, err
		}
	}
	return s.check.terminal.GetDone(), nil
}

// Close cancels the call if it is still running (the server sees a client
// cancel); the next Recv returns CANCELLED unless the stream had ended.
func (s *Stream) Close() {
	if s.err == nil {
		s.cancel()
	}
}

// StageID is the stage_id of the events read so far (empty before the first).
func (s *Stream) StageID() string { return s.check.stageID }

// Terminal is the terminal event, once it was read.
func (s *Stream) Terminal() *pb.StageEvent { return s.check.terminal }

// Rounds is the number of ToolSummary events read so far: the tool rounds
// that have ended.
func (s *Stream) Rounds() int { return s.check.rounds }

// roundMode says how a stream numbers its tool rounds; the first chunk or
// ToolSummary decides it.
type roundMode int

const (
	roundsUnknown  roundMode = iota // no chunk or ToolSummary yet
	roundsNumbered                  // rounds 1, 2, ...; synthesis chunks: last round + 1
	roundsLegacy                    // round 0 everywhere: a server from before tool rounds, one round at most
)

// checker holds the invariant state of one stream.
type checker struct {
	synthesis bool // StreamSynthesis: synthesis chunks are allowed
	next      uint32
	stageID   string
	mode      roundMode
	rounds    int  // ToolSummary events so far
	synStart  bool // a synthesis chunk was read
	terminal  *pb.StageEvent
}

// round checks the round number of a chunk or ToolSummary. Tool events carry
// the round in progress (the number of summaries so far + 1), synthesis
// chunks the last tool round + 1: both are rounds+1. A server that numbers no
// round (0 on every event so far) is a server from before tool rounds, and
// must then keep to 0 and to one round.
func (c *checker) round(seq int64, what string, round int32) *ProtocolError {
	if c.mode == roundsUnknown {
		c.mode = roundsNumbered
		if round == 0 {
			c.mode = roundsLegacy
		}
	}
	if c.mode == roundsLegacy {
		if round != 0 {
			return c.fail(seq, "%s of round %d in a stream whose earlier events had round 0", what, round)
		}
		return nil
	}
	if want := int32(c.rounds + 1); round != want {
		return c.fail(seq, "%s of round %d where round %d was due", what, round, want)
	}
	return nil
}

func (c *checker) fail(seq int64, format string, args ...any) *ProtocolError {
	return &ProtocolError{StageID: c.stageID, Sequence: seq, Problem: fmt.Sprintf(format, args...)}
}

// event checks one event; a non-nil result ends the stream.
func (c *checker) event(ev *pb.StageEvent) *ProtocolError {
	if ev == nil {
		return c.fail(int64(c.next), "a response without its event")
	}
	seq := int64(ev.GetSequence())
	if c.terminal != nil {
		return c.fail(seq, "an event after the terminal event %d", c.terminal.GetSequence())
	}
	if ev.GetSequence() != c.next {
		return c.fail(seq, "sequence %d where %d was due", ev.GetSequence(), c.next)
	}
	if ev.GetStageId() == "" {
		return c.fail(seq, "an empty stage_id")
	}
	if c.stageID == "" {
		c.stageID = ev.GetStageId()
	} else if ev.GetStageId() != c.stageID {
		return c.fail(seq, "stage_id %q in a stream of stage %q", ev.GetStageId(), c.stageID)
	}
	switch e := ev.GetEvent().(type) {
	case *pb.StageEvent_Chunk:
		switch e.Chunk.GetPhase() {
		case pb.Phase_PHASE_TOOL:
			if c.synStart {
				return c.fail(seq, "a tool phase chunk after the synthesis phase started")
			}
			if c.mode == roundsLegacy && c.rounds > 0 {
				return c.fail(seq, "a tool phase chunk after the ToolSummary")
			}
			if p := c.round(seq, "a tool phase chunk", e.Chunk.GetRound()); p != nil {
				return p
			}
		case pb.Phase_PHASE_SYNTHESIS:
			if !c.synthesis {
				return c.fail(seq, "a synthesis chunk in a tools-only stream")
			}
			if c.rounds == 0 {
				return c.fail(seq, "a synthesis chunk before the ToolSummary")
			}
			if p := c.round(seq, "a synthesis chunk", e.Chunk.GetRound()); p != nil {
				return p
			}
			c.synStart = true
		default:
			return c.fail(seq, "a chunk of phase %v", e.Chunk.GetPhase())
		}
	case *pb.StageEvent_ToolSummary:
		if c.synStart {
			return c.fail(seq, "a ToolSummary after the synthesis phase started")
		}
		if c.mode == roundsLegacy && c.rounds > 0 {
			return c.fail(seq, "a second ToolSummary in a stream without round numbers")
		}
		if p := c.round(seq, "a ToolSummary", e.ToolSummary.GetRound()); p != nil {
			return p
		}
		c.rounds++
	case *pb.StageEvent_Done:
		if c.rounds == 0 {
			return c.fail(seq, "Done without a ToolSummary before it")
		}
		c.terminal = ev
	case *pb.StageEvent_Cancel, *pb.StageEvent_Error:
		c.terminal = ev
	default:
		return c.fail(seq, "an event with none of its oneof set")
	}
	c.next++
	return nil
}

// end checks how the stream ended: err is what the generated stream's Recv
// returned (io.EOF for status OK), ctxErr the caller's context's error. The
// result is io.EOF, an *Error or a *ProtocolError.
func (c *checker) end(err error, ctxErr error) error {
	if errors.Is(err, io.EOF) {
		switch {
		case c.terminal == nil:
			return c.fail(-1, "status OK without a terminal event")
		case c.terminal.GetDone() == nil:
			return c.fail(-1, "status OK after a %s event", eventName(c.terminal))
		}
		return io.EOF
	}
	e := FromError(err)
	local := ctxErr != nil && (e.Code == codes.Canceled || e.Code == codes.DeadlineExceeded)
	t := c.terminal
	if t == nil {
		// No terminal event: a status from grpc-go itself (connection failure,
		// local cancel or deadline), a server that could not send the event
		// (reader not reading, a deadline), or a failure before the stage
		// (authentication). The status is all there is.
		return e
	}
	e.StageID = t.GetStageId()
	bad := func(format string, args ...any) error {
		p := c.fail(-1, format, args...)
		p.Status = e
		return p
	}
	switch t.GetEvent().(type) {
	case *pb.StageEvent_Done:
		if local {
			return e // the caller cancelled after Done but before the status
		}
		return bad("status %s after a Done event", CodeName(e.Code))
	case *pb.StageEvent_Cancel:
		e.Cancel = t.GetCancel()
		if e.Code != codes.Canceled && e.Code != codes.DeadlineExceeded {
			return bad("status %s after a Cancel event", CodeName(e.Code))
		}
		return e
	}
	se := t.GetError()
	e.StageError = se
	if e.Phase == pb.Phase_PHASE_UNSPECIFIED {
		e.Phase = se.GetPhase()
	}
	if local {
		return e // the local cancel or deadline overtook the server's status
	}
	if problem := disagreement(se, e); problem != "" {
		return bad("the StageError event and the final status disagree: %s", problem)
	}
	return e
}

// disagreement says how the StageError event and the status decoded into e
// differ; empty when they agree.
func disagreement(se *pb.StageError, e *Error) string {
	switch {
	case codes.Code(se.GetCode()) != e.Code:
		return fmt.Sprintf("code %s vs %s", CodeName(codes.Code(se.GetCode())), CodeName(e.Code))
	case se.GetMessage() != e.Message:
		return fmt.Sprintf("message %q vs %q", se.GetMessage(), e.Message)
	case se.GetReason() != e.Reason:
		return fmt.Sprintf("reason %q vs ErrorInfo.reason %q", se.GetReason(), e.Reason)
	case e.Reason != "" && se.GetPhase().String() != e.Metadata["phase"]:
		return fmt.Sprintf("phase %s vs ErrorInfo metadata phase %q", se.GetPhase(), e.Metadata["phase"])
	case se.GetRetryable() != (se.GetRetryDelay() != nil):
		return fmt.Sprintf("retryable %v with retry_delay %v", se.GetRetryable(), se.GetRetryDelay())
	case se.GetRetryable() != e.Retryable:
		return fmt.Sprintf("retryable %v vs RetryInfo present %v", se.GetRetryable(), e.Retryable)
	case se.GetRetryable() && se.GetRetryDelay().AsDuration() != e.RetryDelay:
		return fmt.Sprintf("retry_delay %s vs RetryInfo %s", se.GetRetryDelay().AsDuration(), e.RetryDelay)
	}
	got := make([]FieldViolation, 0, len(se.GetFieldViolations()))
	for _, v := range se.GetFieldViolations() {
		got = append(got, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
	}
	if !slices.Equal(got, e.FieldViolations) && (len(got) > 0 || len(e.FieldViolations) > 0) {
		return fmt.Sprintf("field_violations %v vs BadRequest %v", got, e.FieldViolations)
	}
	return ""
}

func eventName(ev *pb.StageEvent) string {
	switch ev.GetEvent().(type) {
	case *pb.StageEvent_Cancel:
		return "Cancel"
	case *pb.StageEvent_Error:
		return "StageError"
	case *pb.StageEvent_Done:
		return "Done"
	}
	return string(proto.MessageName(ev))
}
