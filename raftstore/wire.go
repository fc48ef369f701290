package raftstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"appliance/fleet"
)

// Error codes: the class of an error, as it crosses the wire between a
// follower and the leader. They are stable strings: nodes of different
// versions must understand each other.
const (
	codeNotLeader          = "not_leader"
	codeUnknownOutcome     = "unknown_outcome"
	codeClosed             = "closed"
	codeNotFound           = "not_found"
	codeExists             = "exists"
	codePreconditionFailed = "precondition_failed"
	codeInvalid            = "invalid"
	codeImmutable          = "immutable"
	codeConflict           = "conflict"
	codeDeadlineExceeded   = "deadline_exceeded"
	codeCanceled           = "canceled"
	codeClusterBehind      = "cluster_behind"
	codeInternal           = "internal"
)

// codeSentinels maps each code to its sentinel, in the order ErrorCode
// tries them: ErrUnknownOutcome first, because an error may wrap it
// together with ErrClosed, and the uncertainty is what a caller must see.
var codeSentinels = []struct {
	code string
	err  error
}{
	{codeUnknownOutcome, ErrUnknownOutcome},
	{codeNotLeader, ErrNotLeader},
	{codeClosed, ErrClosed},
	{codeNotFound, fleet.ErrNotFound},
	{codeExists, fleet.ErrExists},
	{codePreconditionFailed, fleet.ErrPreconditionFailed},
	{codeImmutable, fleet.ErrImmutable},
	{codeConflict, fleet.ErrConflict},
	{codeInvalid, fleet.ErrInvalid},
	{codeDeadlineExceeded, context.DeadlineExceeded},
	{codeCanceled, context.Canceled},
	{codeClusterBehind, ErrClusterBehind},
}

// ErrorCode names the class of err for the wire: "" for nil; one of
// not_leader, unknown_outcome, closed, not_found, exists,
// precondition_failed, invalid, immutable, deadline_exceeded, canceled,
// cluster_behind for an error wrapping ErrNotLeader, ErrUnknownOutcome,
// ErrClosed, the fleet sentinels, the context errors or ErrClusterBehind;
// internal otherwise. ErrorFromCode on
// the other side rebuilds an error of the same class.
func ErrorCode(err error) string {
	if err == nil {
		return ""
	}
	for _, cs := range codeSentinels {
		if errors.Is(err, cs.err) {
			return cs.code
		}
	}
	return codeInternal
}

// ErrorFromCode rebuilds an error sent as ErrorCode(err) and err.Error():
// its message is msg and errors.Is matches the sentinel of code. It returns
// nil for the empty code; an unknown code (from a newer node) gives a plain
// error. Apply treats an error built here as the leader's own answer,
// certain about the outcome unless its code says otherwise: build one only
// from what the leader returned, never for a transport failure.
func ErrorFromCode(code, msg string) error {
	if code == "" {
		return nil
	}
	e := &wireError{code: code, msg: msg}
	for _, cs := range codeSentinels {
		if cs.code == code {
			e.sentinel = cs.err
		}
	}
	if e.msg == "" {
		e.msg = code
		if e.sentinel != nil {
			e.msg = e.sentinel.Error()
		}
	}
	return e
}

// wireError is an error received from another node: its text as it was
// there, its class as a sentinel, and the field of a validation error.
type wireError struct {
	code       string
	msg        string
	sentinel   error
	validation *fleet.ValidationError
}

func (e *wireError) Error() string { return e.msg }

func (e *wireError) Unwrap() []error {
	var errs []error
	if e.sentinel != nil {
		errs = append(errs, e.sentinel)
	}
	if e.validation != nil {
		errs = append(errs, e.validation)
	}
	return errs
}

// resultJSON is the wire form of a Result.
type resultJSON struct {
	Index      uint64            `json:"index"`
	Created    bool              `json:"created,omitempty"`
	Stored     int               `json:"stored,omitempty"`
	Device     *fleet.Device     `json:"device,omitempty"`
	Deployment *fleet.Deployment `json:"deployment,omitempty"`
	Enrollment *fleet.Enrollment `json:"enrollment,omitempty"`
	Consumer   *fleet.Consumer   `json:"consumer,omitempty"`
	Revoked    []string          `json:"revoked,omitempty"`
	Import     *ImportResult     `json:"import,omitempty"`
	Err        *errorJSON        `json:"err,omitempty"`
}

type errorJSON struct {
	Code string `json:"code"`
	Msg  string `json:"msg"`
	// Validation is set when the error held a *fleet.ValidationError.
	Validation *validationJSON `json:"validation,omitempty"`
}

type validationJSON struct {
	Field string `json:"field,omitempty"`
	Msg   string `json:"msg"`
}

// MarshalResult encodes a Result for the trip from the leader back to the
// follower that forwarded the command (JSON). Result.Err keeps its text, its
// class (see ErrorCode) and, for a *fleet.ValidationError, Field and Msg.
func MarshalResult(r *Result) ([]byte, error) {
	if r == nil {
		return nil, errors.New("marshal result: nil result")
	}
	out := resultJSON{
		Index: r.Index, Created: r.Created, Stored: r.Stored,
		Device: r.Device, Deployment: r.Deployment, Enrollment: r.Enrollment, Consumer: r.Consumer, Revoked: r.Revoked, Import: r.Import,
	}
	if r.Err != nil {
		out.Err = &errorJSON{Code: ErrorCode(r.Err), Msg: r.Err.Error()}
		var ve *fleet.ValidationError
		if errors.As(r.Err, &ve) {
			out.Err.Validation = &validationJSON{Field: ve.Field, Msg: ve.Msg}
		}
	}
	b, err := json.Marshal(out)
	if err != nil {
		return nil, fmt.Errorf("marshal result of entry %d: %w", r.Index, err)
	}
	return b, nil
}

// UnmarshalResult is the inverse of MarshalResult: errors.Is and errors.As
// work on the returned Result.Err as they did on the leader's.
func UnmarshalResult(b []byte) (*Result, error) {
	var in resultJSON
	if err := json.Unmarshal(b, &in); err != nil {
		return nil, fmt.Errorf("unmarshal result: %w", err)
	}
	r := &Result{
		Index: in.Index, Created: in.Created, Stored: in.Stored,
		Device: in.Device, Deployment: in.Deployment, Enrollment: in.Enrollment, Consumer: in.Consumer, Revoked: in.Revoked, Import: in.Import,
	}
	if in.Err != nil {
		code := in.Err.Code
		if code == "" {
			code = codeInternal
		}
		we := ErrorFromCode(code, in.Err.Msg).(*wireError)
		if v := in.Err.Validation; v != nil {
			we.validation = &fleet.ValidationError{Field: v.Field, Msg: v.Msg}
		}
		r.Err = we
	}
	return r, nil
}
