package raftstore

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"testing"
	"time"

	"appliance/fleet"
)

// TestMarshalResult_RoundTrip: a Result crosses the wire with its fields,
// and its Err keeps text, class and validation field.
func TestMarshalResult_RoundTrip(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	dev := &fleet.Device{ID: "d1", Tags: map[string]any{"env": "prod", "n": 3.0}, Status: "enabled", CreatedTimeUTC: t0, LastUpdatedTimeUTC: t0, Etag: "7"}
	for _, tc := range []struct {
		name    string
		res     *Result
		wantIs  error
		wantVal *fleet.ValidationError
	}{
		{name: "device created", res: &Result{Index: 7, Created: true, Device: dev}},
		{name: "reports stored", res: &Result{Index: 8, Stored: 12}},
		{name: "deployment", res: &Result{Index: 9, Deployment: &fleet.Deployment{ID: "dep", Content: content("a:1"), Priority: 3, CreatedTimeUTC: t0, LastUpdatedTimeUTC: t0, Etag: "9"}}},
		{name: "enrollment", res: &Result{Index: 10, Enrollment: &fleet.Enrollment{Name: "g", Tags: map[string]any{}, DerivationKey: "k", CreatedTimeUTC: t0, LastUpdatedTimeUTC: t0}}},
		{name: "not found", res: &Result{Index: 11, Err: fmt.Errorf("device %q: %w", "d1", fleet.ErrNotFound)}, wantIs: fleet.ErrNotFound},
		{name: "exists", res: &Result{Index: 12, Err: fmt.Errorf("device %q: %w", "d1", fleet.ErrExists)}, wantIs: fleet.ErrExists},
		{name: "precondition", res: &Result{Index: 13, Err: fmt.Errorf("%w: etag is %q", fleet.ErrPreconditionFailed, "3")}, wantIs: fleet.ErrPreconditionFailed},
		{name: "immutable", res: &Result{Index: 14, Err: fmt.Errorf("content: %w", fleet.ErrImmutable)}, wantIs: fleet.ErrImmutable},
		{name: "invalid", res: &Result{Index: 15, Err: fmt.Errorf("bad: %w", fleet.ErrInvalid)}, wantIs: fleet.ErrInvalid},
		{
			name:    "validation error",
			res:     &Result{Index: 16, Err: fmt.Errorf("deployment %q: %w", "dep", fleet.Invalid("content.modulesContent", "must be an object, not %s", "a string"))},
			wantIs:  fleet.ErrInvalid,
			wantVal: &fleet.ValidationError{Field: "content.modulesContent", Msg: "must be an object, not a string"},
		},
		{name: "unclassified", res: &Result{Index: 17, Err: errors.New("entry 17: decode command: unknown type 99")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := MarshalResult(tc.res)
			if err != nil {
				t.Fatal(err)
			}
			got, err := UnmarshalResult(b)
			if err != nil {
				t.Fatal(err)
			}
			gotErr := got.Err
			want := *tc.res
			want.Err, got.Err = nil, nil
			if !reflect.DeepEqual(&want, got) {
				t.Fatalf("round trip:\n got %+v\nwant %+v", got, &want)
			}
			if (tc.res.Err == nil) != (gotErr == nil) {
				t.Fatalf("sent error %v, got %v", tc.res.Err, gotErr)
			}
			if tc.res.Err == nil {
				return
			}
			if gotErr.Error() != tc.res.Err.Error() {
				t.Errorf("message %q, want %q", gotErr, tc.res.Err)
			}
			if tc.wantIs != nil && !errors.Is(gotErr, tc.wantIs) {
				t.Errorf("errors.Is(%v, %v) = false", gotErr, tc.wantIs)
			}
			var ve *fleet.ValidationError
			if errors.As(gotErr, &ve) != (tc.wantVal != nil) || (tc.wantVal != nil && *ve != *tc.wantVal) {
				t.Errorf("validation error = %+v, want %+v", ve, tc.wantVal)
			}
		})
	}
	if _, err := MarshalResult(nil); err == nil {
		t.Error("MarshalResult(nil) succeeded")
	}
	if _, err := UnmarshalResult([]byte("not json")); err == nil {
		t.Error("UnmarshalResult of garbage succeeded")
	}
}

// TestErrorCode_RoundTrip: ErrorFromCode(ErrorCode(err), err.Error()) has
// err's class and text.
func TestErrorCode_RoundTrip(t *testing.T) {
	for _, tc := range []struct {
		err      error
		code     string
		sentinel error
	}{
		{nil, "", nil},
		{fmt.Errorf("apply put-device: %w", ErrNotLeader), "not_leader", ErrNotLeader},
		{fmt.Errorf("apply put-device: leadership lost: %w", ErrUnknownOutcome), "unknown_outcome", ErrUnknownOutcome},
		{fmt.Errorf("apply: %w: %w", ErrClosed, ErrUnknownOutcome), "unknown_outcome", ErrUnknownOutcome},
		{fmt.Errorf("apply: %w", ErrClosed), "closed", ErrClosed},
		{fmt.Errorf("x: %w", fleet.ErrNotFound), "not_found", fleet.ErrNotFound},
		{fmt.Errorf("x: %w", fleet.ErrExists), "exists", fleet.ErrExists},
		{fmt.Errorf("x: %w", fleet.ErrPreconditionFailed), "precondition_failed", fleet.ErrPreconditionFailed},
		{fleet.Invalid("f", "bad"), "invalid", fleet.ErrInvalid},
		{fmt.Errorf("x: %w", fleet.ErrImmutable), "immutable", fleet.ErrImmutable},
		{fmt.Errorf("enqueue: %w", context.DeadlineExceeded), "deadline_exceeded", context.DeadlineExceeded},
		{context.Canceled, "canceled", context.Canceled},
		{errors.New("disk on fire"), "internal", nil},
	} {
		t.Run(tc.code, func(t *testing.T) {
			code := ErrorCode(tc.err)
			if code != tc.code {
				t.Fatalf("ErrorCode(%v) = %q, want %q", tc.err, code, tc.code)
			}
			if tc.err == nil {
				if ErrorFromCode("", "") != nil {
					t.Fatal("ErrorFromCode of the empty code is not nil")
				}
				return
			}
			back := ErrorFromCode(code, tc.err.Error())
			if back.Error() != tc.err.Error() {
				t.Errorf("message %q, want %q", back, tc.err)
			}
			if tc.sentinel != nil && !errors.Is(back, tc.sentinel) {
				t.Errorf("errors.Is(%v, %v) = false", back, tc.sentinel)
			}
			if ErrorCode(back) != code {
				t.Errorf("code changed to %q", ErrorCode(back))
			}
		})
	}
	if err := ErrorFromCode("from_a_newer_node", ""); err == nil || err.Error() == "" || ErrorCode(err) != "internal" {
		t.Errorf("unknown code gave %v", err)
	}
}
