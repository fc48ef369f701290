// Package storetest opens the one-node raft store that the tests of the
// packages over raftstore run against: real raft, a real raft log and
// bbolt state in the test's temporary directory, on 127.0.0.1, led by
// itself before the test goes on, closed when it ends. Test support only.
package storetest

import (
	"context"
	"log/slog"
	"testing"

	"appliance/internal/testlog"
	"appliance/internal/testutil"
	"appliance/raftstore"
)

// Open opens a one-node store (node n1) whose applied changes go to
// observer (nil: none), logging to t at level and above, and waits until
// it leads.
func Open(t testing.TB, observer raftstore.Observer, level slog.Level) *raftstore.Store {
	t.Helper()
	s, err := raftstore.Open(context.Background(), raftstore.Config{Dir: t.TempDir(), NodeID: "n1", BindAddr: "127.0.0.1:0",
		Bootstrap: true, Observer: observer, Logger: testlog.New(t, level)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if err := s.WaitLeader(testutil.Context(t)); err != nil {
		t.Fatal(err)
	}
	return s
}
