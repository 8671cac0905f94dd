package toolchain

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/toolchain-grpc/toolchain-grpc/clients/go/toolchainv1"
)

// Domain is the ErrorInfo domain of the toolchain.v1 errors.
const Domain = "toolchain.v1"

// FieldViolation is one invalid request field (google.rpc.BadRequest).
type FieldViolation struct {
	// Field is the path of the field relative to the request message, e.g.
	// "stage.user_prompt".
	Field string
	// Description says what is wrong with it.
	Description string
}

// Error is a failed call, decoded from its final gRPC status and the
// google.rpc.Status details of the `grpc-status-details-bin` trailer. For a
// stream that ended with a StageError or Cancel event, the event is attached
// too (the stream helper has checked that it agrees with the status).
//
// It implements GRPCStatus, so status.Code(err) and status.FromError(err)
// work on it as on any grpc-go error.
type Error struct {
	// Code is the gRPC status code.
	Code codes.Code
	// Message is the status message.
	Message string
	// Reason is google.rpc.ErrorInfo.reason: the name of an ErrorReason value
	// (e.g. "BACKEND_UNAVAILABLE"); empty when the status had no ErrorInfo
	// (errors made by grpc-go itself: connection failures, a local deadline or
	// cancel). See [Error.ErrorReason] for the enum value.
	Reason string
	// Domain is ErrorInfo.domain ("toolchain.v1" for this server's errors).
	Domain string
	// Metadata is ErrorInfo.metadata; the server sets "phase" (a Phase name).
	Metadata map[string]string
	// Phase is the failed phase, from Metadata["phase"] (or StageError.phase);
	// PHASE_UNSPECIFIED when none had started or it was not given.
	Phase pb.Phase
	// FieldViolations are the google.rpc.BadRequest field violations, in the
	// server's order.
	FieldViolations []FieldViolation
	// Retryable is true when the status carried google.rpc.RetryInfo: sending
	// the same request again after RetryDelay can succeed.
	Retryable bool
	// RetryDelay is RetryInfo.retry_delay; zero when not Retryable.
	RetryDelay time.Duration

	// StageID is the stage of a stream's terminal event; empty for unary
	// calls and for streams that ended without a terminal event.
	StageID string
	// StageError is the stream's terminal StageError event, when it had one.
	StageError *pb.StageError
	// Cancel is the stream's terminal Cancel event, when it had one.
	Cancel *pb.Cancel

	status *status.Status
}

// FromError decodes err: nil for nil, err itself when it is already an *Error
// (or wraps one), else the error's gRPC status (codes.Unknown for an error
// that has none; context errors map to CANCELLED and DEADLINE_EXCEEDED).
func FromError(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	st, ok := status.FromError(err)
	if !ok {
		if s := status.FromContextError(err); s.Code() != codes.Unknown {
			st = s
		}
	}
	return fromStatus(st)
}

func fromStatus(st *status.Status) *Error {
	e := &Error{Code: st.Code(), Message: st.Message(), status: st}
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			if e.Reason == "" && e.Domain == "" {
				e.Reason, e.Domain, e.Metadata = d.GetReason(), d.GetDomain(), d.GetMetadata()
				if v, ok := pb.Phase_value[e.Metadata["phase"]]; ok {
					e.Phase = pb.Phase(v)
				}
			}
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				e.FieldViolations = append(e.FieldViolations, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		case *errdetails.RetryInfo:
			e.Retryable = true
			e.RetryDelay = d.GetRetryDelay().AsDuration()
		}
	}
	return e
}

// GRPCStatus is the call's status, with its details.
func (e *Error) GRPCStatus() *status.Status {
	if e.status == nil {
		return status.New(e.Code, e.Message)
	}
	return e.status
}

// ErrorReason is Reason as the generated enum, and whether the reason is one
// this client knows (a newer server may send reasons added since; treat those
// by Code).
func (e *Error) ErrorReason() (pb.ErrorReason, bool) {
	v, ok := pb.ErrorReason_value[e.Reason]
	if !ok || v == 0 {
		return pb.ErrorReason_ERROR_REASON_UNSPECIFIED, false
	}
	return pb.ErrorReason(v), true
}

// Violation is the description of the violation of field, and whether there
// is one.
func (e *Error) Violation(field string) (string, bool) {
	for _, v := range e.FieldViolations {
		if v.Field == field {
			return v.Description, true
		}
	}
	return "", false
}

// CodeName is the canonical name of the status code, e.g. "UNAVAILABLE".
func CodeName(c codes.Code) string { return code.Code(c).String() }

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("toolchain: ")
	b.WriteString(CodeName(e.Code))
	if e.Reason != "" {
		fmt.Fprintf(&b, " (%s)", e.Reason)
	}
	if e.Message != "" {
		b.WriteString(": ")
		b.WriteString(e.Message)
	}
	for _, v := range e.FieldViolations {
		fmt.Fprintf(&b, "; %s: %s", v.Field, v.Description)
	}
	if e.Retryable {
		fmt.Fprintf(&b, "; retry after %s", e.RetryDelay)
	}
	return b.String()
}

// ProtocolError is a stream that broke an invariant of the contract: a
// sequence gap, an empty or changing stage_id, an event after the terminal
// one, a final status that disagrees with the terminal event, and so on. The
// stream helper cancels the call when it finds one.
type ProtocolError struct {
	// StageID is the stage's id as far as it was known.
	StageID string
	// Sequence is the sequence of the offending event, or -1 when the problem
	// is the end of the stream.
	Sequence int64
	// Problem says what was wrong.
	Problem string
	// Status is the stream's final error when the problem concerns it.
	Status *Error
}

func (e *ProtocolError) Error() string {
	where := "at its end"
	if e.Sequence >= 0 {
		where = fmt.Sprintf("at event %d", e.Sequence)
	}
	msg := fmt.Sprintf("toolchain: stream of stage %q broke the contract %s: %s", e.StageID, where, e.Problem)
	if e.Status != nil {
		msg += " (final status: " + e.Status.Error() + ")"
	}
	return msg
}

// Unwrap is the final status, when there is one.
func (e *ProtocolError) Unwrap() error {
	if e.Status == nil {
		return nil
	}
	return e.Status
}
