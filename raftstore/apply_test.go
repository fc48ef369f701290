package raftstore

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"appliance/fleet"
)

// forwardingCluster is a three-node cluster whose followers forward writes
// through peers, the in-process fake of the cluster package's hop.
func forwardingCluster(t *testing.T) ([]*Store, *peerSet) {
	t.Helper()
	peers := newPeerSet()
	stores := newTestCluster(t, 3, func(cfg *Config) { cfg.Forward = peers.forward })
	peers.add(stores...)
	return stores, peers
}

// TestStore_Apply_ForwardedMatchesLeader runs each command twice, once on
// the leader and once on a follower that forwards it, on separate ids, and
// expects the same result, rule rejections included (their class survives
// the trip through MarshalResult/UnmarshalResult).
func TestStore_Apply_ForwardedMatchesLeader(t *testing.T) {
	stores, peers := forwardingCluster(t)
	leader, follower := stores[0], stores[1]
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		// setup runs on the leader; cmd is the command under test. Both
		// name their objects with the prefix p.
		setup   func(p string) []Command
		cmd     func(p string) Command
		wantErr error
	}{
		{
			name: "create device",
			cmd: func(p string) Command {
				return PutDevice{Time: t0, Device: fleet.Device{ID: p + "dev", Tags: map[string]any{"env": "prod"}}}
			},
		},
		{
			name:  "replace device",
			setup: func(p string) []Command { return []Command{PutDevice{Time: t0, Device: fleet.Device{ID: p + "dev"}}} },
			cmd: func(p string) Command {
				return PutDevice{Time: t0.Add(time.Minute), Device: fleet.Device{ID: p + "dev", Tags: map[string]any{"n": 2.0}}}
			},
		},
		{
			name:  "create an existing device",
			setup: func(p string) []Command { return []Command{PutDevice{Time: t0, Device: fleet.Device{ID: p + "dev"}}} },
			cmd: func(p string) Command {
				return PutDevice{Precondition: Precondition{IfNoneMatch: "*"}, Time: t0, Device: fleet.Device{ID: p + "dev"}}
			},
			wantErr: fleet.ErrExists,
		},
		{
			name:    "patch a missing device",
			cmd:     func(p string) Command { return PatchDevice{ID: p + "missing", Time: t0} },
			wantErr: fleet.ErrNotFound,
		},
		{
			name:  "stale etag",
			setup: func(p string) []Command { return []Command{PutDevice{Time: t0, Device: fleet.Device{ID: p + "dev"}}} },
			cmd: func(p string) Command {
				return PatchDevice{Precondition: Precondition{IfMatch: "1"}, ID: p + "dev", Status: fleet.DeviceDisabled, Time: t0}
			},
			wantErr: fleet.ErrPreconditionFailed,
		},
		{
			name: "change a deployment's content",
			setup: func(p string) []Command {
				return []Command{PutDeployment{Time: t0, Deployment: fleet.Deployment{ID: p + "dep", Content: content("a:1")}}}
			},
			cmd: func(p string) Command {
				return PutDeployment{Time: t0, Deployment: fleet.Deployment{ID: p + "dep", Content: content("a:2")}}
			},
			wantErr: fleet.ErrImmutable,
		},
		{
			name: "create enrollment",
			cmd: func(p string) Command {
				return PutEnrollment{Time: t0, Enrollment: fleet.Enrollment{Name: p + "grp", DerivationKey: "k", Tags: map[string]any{}}}
			},
		},
		{
			name:  "store reports",
			setup: func(p string) []Command { return []Command{PutDevice{Time: t0, Device: fleet.Device{ID: p + "dev"}}} },
			cmd: func(p string) Command {
				return PutReports{Reports: []Report{
					{DeviceID: p + "dev", Document: []byte(`{"ok":true}`), Time: t0},
					{DeviceID: p + "gone", Document: []byte(`{}`), Time: t0},
				}}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testContext(t)
			var got [2]string
			for i, s := range []*Store{leader, follower} {
				p := fmt.Sprintf("%s-%d-", strings.ReplaceAll(tc.name, " ", "-"), i)
				if tc.setup != nil {
					for _, c := range tc.setup(p) {
						if _, err := leader.Apply(ctx, c); err != nil {
							t.Fatal(err)
						}
					}
				}
				before := peers.calls.Load()
				res, err := s.Apply(ctx, tc.cmd(p))
				if forwarded := peers.calls.Load() - before; forwarded != int64(i) {
					t.Fatalf("%s forwarded %d times, want %d", s.NodeID(), forwarded, i)
				}
				if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
					t.Fatalf("%s: err = %v, want %v", s.NodeID(), err, tc.wantErr)
				}
				if res == nil || res.Index == 0 || (err != nil && res.Err == nil) {
					t.Fatalf("%s: result %+v", s.NodeID(), res)
				}
				// A follower reads its own forwarded write once it has
				// applied the result's index.
				if err := s.WaitApplied(ctx, res.Index); err != nil {
					t.Fatal(err)
				}
				got[i] = normalizeResult(t, res, p)
			}
			if got[0] != got[1] {
				t.Fatalf("results differ:\nleader    %s\nforwarded %s", got[0], got[1])
			}
		})
	}
}

// quotedNumber matches an etag: a quoted number, its quotes escaped or not.
var quotedNumber = regexp.MustCompile(`\\?"\d+\\?"`)

// normalizeResult renders a result without what differs between two runs:
// the raft index, etags (quoted numbers, also in messages) and the ids'
// prefix.
func normalizeResult(t *testing.T, res *Result, prefix string) string {
	t.Helper()
	r := *res
	r.Index = 0
	b, err := MarshalResult(&r)
	if err != nil {
		t.Fatal(err)
	}
	return quotedNumber.ReplaceAllString(strings.ReplaceAll(string(b), prefix, ""), `"N"`)
}

// TestStore_Apply_ForwardUnknownOutcomeNotRetried: the hop delivers the
// write to the leader, which applies it, but the answer is lost (a
// transport error after sending). The follower must report
// ErrUnknownOutcome and must not send it again: a retry would apply the
// write twice (here it would fail with ErrExists instead).
func TestStore_Apply_ForwardUnknownOutcomeNotRetried(t *testing.T) {
	stores, peers := forwardingCluster(t)
	peers.fail = func(_ int64, leader *Store, entry []byte) (bool, error) {
		if _, err := leader.ApplyEncoded(context.Background(), entry); err != nil {
			return false, err
		}
		return false, errors.New("read tcp 127.0.0.1:4711: connection reset by peer")
	}
	ctx := testContext(t)
	cmd := PutDevice{Precondition: Precondition{IfNoneMatch: "*"}, Time: time.Now().UTC(), Device: fleet.Device{ID: "once"}}
	res, err := stores[1].Apply(ctx, cmd)
	if !errors.Is(err, ErrUnknownOutcome) || errors.Is(err, ErrNotLeader) || res != nil {
		t.Fatalf("Apply = %v, %v; want ErrUnknownOutcome only", res, err)
	}
	if !strings.Contains(err.Error(), "connection reset by peer") {
		t.Errorf("error %q lost the transport error", err)
	}
	if n := peers.calls.Load(); n != 1 {
		t.Fatalf("Forward called %d times, want 1", n)
	}
	// It was applied, exactly once.
	if ids := deviceIDs(t, stores[0]); fmt.Sprint(ids) != "[once]" {
		t.Fatalf("leader has devices %v", ids)
	}
}

// TestStore_Apply_ForwardRetriesNotLeader: answers that prove nothing was
// applied (the remote is not the leader, or the request never left) are
// retried until one lands.
func TestStore_Apply_ForwardRetriesNotLeader(t *testing.T) {
	stores, peers := forwardingCluster(t)
	peers.fail = func(call int64, _ *Store, _ []byte) (bool, error) {
		switch call {
		case 1:
			return false, ErrorFromCode(ErrorCode(ErrNotLeader), "apply forwarded put-device: not the raft leader")
		case 2:
			return false, fmt.Errorf("dial 127.0.0.1:4711: connection refused: %w", ErrNotLeader)
		}
		return true, nil
	}
	res, err := stores[2].Apply(testContext(t), PutDevice{Precondition: Precondition{IfNoneMatch: "*"}, Time: time.Now().UTC(), Device: fleet.Device{ID: "third-time"}})
	if err != nil || res == nil || !res.Created {
		t.Fatalf("Apply = %+v, %v", res, err)
	}
	if n := peers.calls.Load(); n != 3 {
		t.Fatalf("Forward called %d times, want 3", n)
	}
}

// TestStore_Apply_ForwardDefiniteErrorsNotRetried: an answer from the
// leader that is certain (a rule rejection sent as an error, a deadline
// before raft took the entry) is returned as it is.
func TestStore_Apply_ForwardDefiniteErrorsNotRetried(t *testing.T) {
	stores, peers := forwardingCluster(t)
	for _, tc := range []struct {
		name    string
		answer  error
		wantErr error
	}{
		{"rejected by the leader's RPC server", fmt.Errorf("forward write: bad entry: %w", fleet.ErrInvalid), fleet.ErrInvalid},
		{"leader's deadline", ErrorFromCode("deadline_exceeded", "timed out enqueuing operation"), context.DeadlineExceeded},
		{"leader's own unknown outcome", ErrorFromCode("unknown_outcome", "leadership lost while committing log"), ErrUnknownOutcome},
	} {
		t.Run(tc.name, func(t *testing.T) {
			peers.calls.Store(0)
			peers.fail = func(int64, *Store, []byte) (bool, error) { return false, tc.answer }
			_, err := stores[1].Apply(testContext(t), DeleteDevice{ID: "x"})
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if tc.wantErr != ErrUnknownOutcome && errors.Is(err, ErrUnknownOutcome) {
				t.Fatalf("err = %v: a certain answer became an unknown outcome", err)
			}
			if n := peers.calls.Load(); n != 1 {
				t.Fatalf("Forward called %d times, want 1", n)
			}
		})
	}
}

// TestStore_Apply_ForwardAcrossFailover stops the leader and writes through
// a follower at once: the follower waits for the new leader (its own
// ErrNotLeader answers while no leader is known are certain) and the write
// lands there.
func TestStore_Apply_ForwardAcrossFailover(t *testing.T) {
	stores, _ := forwardingCluster(t)
	putDevice(t, stores[0], "before", nil)
	stores[0].Close()
	for i, s := range stores[1:] {
		res, err := s.Apply(testContext(t), PutDevice{Time: time.Now().UTC(), Device: fleet.Device{ID: fmt.Sprintf("after-%d", i)}})
		if err != nil || res == nil {
			t.Fatalf("write via %s after the leader stopped: %v", s.NodeID(), err)
		}
	}
	leader := leaderOf(t, stores[1:])
	if ids := deviceIDs(t, leader); fmt.Sprint(ids) != "[after-0 after-1 before]" {
		t.Fatalf("new leader has %v", ids)
	}
}

// TestStore_Apply_NoForward keeps the old behaviour without Forward: a
// follower refuses the write with ErrNotLeader.
func TestStore_Apply_NoForward(t *testing.T) {
	stores := newTestCluster(t, 2, nil)
	_, err := stores[1].Apply(testContext(t), DeleteDevice{ID: "x"})
	if !errors.Is(err, ErrNotLeader) || errors.Is(err, ErrUnknownOutcome) {
		t.Fatalf("err = %v, want ErrNotLeader", err)
	}
}

// TestStore_ApplyEncoded checks what the leader's side of forwarding
// refuses.
func TestStore_ApplyEncoded(t *testing.T) {
	stores := newTestCluster(t, 2, nil)
	ctx := testContext(t)
	good, err := Encode(PutDevice{Time: time.Now().UTC(), Device: fleet.Device{ID: "enc"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		store   *Store
		entry   []byte
		wantErr error
	}{
		{"empty entry", stores[0], nil, fleet.ErrInvalid},
		{"unknown command type", stores[0], []byte{200, '{', '}'}, fleet.ErrInvalid},
		{"bad payload", stores[0], []byte{byte(CmdPutDevice), '['}, fleet.ErrInvalid},
		{"on a follower", stores[1], good, ErrNotLeader},
		{"on the leader", stores[0], good, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := tc.store.ApplyEncoded(ctx, tc.entry)
			if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if tc.wantErr == nil && (res == nil || res.Device == nil || res.Device.ID != "enc") {
				t.Fatalf("result %+v", res)
			}
		})
	}
}

// TestClassifyRaftError pins which of raft's answers prove the entry was
// not appended.
func TestClassifyRaftError(t *testing.T) {
	for _, tc := range []struct {
		raftErr          error
		want, wantNotErr error
	}{
		{raft.ErrNotLeader, ErrNotLeader, ErrUnknownOutcome},
		{raft.ErrLeadershipTransferInProgress, ErrNotLeader, ErrUnknownOutcome},
		{raft.ErrEnqueueTimeout, context.DeadlineExceeded, ErrUnknownOutcome},
		{raft.ErrLeadershipLost, ErrUnknownOutcome, ErrNotLeader},
		{raft.ErrAbortedByRestore, ErrUnknownOutcome, ErrNotLeader},
		{raft.ErrRaftShutdown, ErrUnknownOutcome, ErrNotLeader},
		{errors.New("disk full"), ErrUnknownOutcome, ErrNotLeader},
	} {
		t.Run(tc.raftErr.Error(), func(t *testing.T) {
			err := classifyRaftError(tc.raftErr)
			if !errors.Is(err, tc.want) || errors.Is(err, tc.wantNotErr) {
				t.Fatalf("classifyRaftError(%v) = %v, want %v and not %v", tc.raftErr, err, tc.want, tc.wantNotErr)
			}
		})
	}
	if err := classifyRaftError(raft.ErrRaftShutdown); !errors.Is(err, ErrClosed) {
		t.Fatalf("shutdown: %v, want ErrClosed too", err)
	}
}
