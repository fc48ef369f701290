// Package testutil holds what the tests of every package share for waiting
// on something that should happen: one bound, long enough that a correct
// build never fails on a loaded machine (two cores, the race detector,
// other tests at once), so a test that reaches it has found a bug, not a
// slow run. Tests assert what happened, never how long it took. Beside
// the waits: fixed loopback ports no other test takes (ports.go), a TCP
// proxy a test can cut (proxy.go), device keys (keys.go).
package testutil

import (
	"context"
	"testing"
	"time"
)

// WaitTimeout bounds every wait for something that should happen.
const WaitTimeout = time.Minute

// Bound is how long to wait for something a test says should happen
// within d: d, or WaitTimeout when that is longer. A short d written for
// an idle machine does not make the test fail on a busy one.
func Bound(d time.Duration) time.Duration { return max(d, WaitTimeout) }

// WaitFor polls cond until it holds, failing t after WaitTimeout.
func WaitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(WaitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %s for %s", WaitTimeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Context is a context that ends after WaitTimeout or with the test.
func Context(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), WaitTimeout)
	t.Cleanup(cancel)
	return ctx
}
