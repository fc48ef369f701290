//go:build e2e

package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"appliance/raftstore/raftlog"
)

// TestServe_StopsOnUnknownCommand: a node whose log holds an entry of a
// command type its build does not know (what a newer release's leader
// writes) exits non-zero with one line saying to upgrade it, instead of
// skipping the entry (the previous release did, and diverged from its
// peers) or panicking. The entry is written into the stopped node's raft
// log as a newer leader would have replicated it.
func TestServe_StopsOnUnknownCommand(t *testing.T) {
	dir := t.TempDir()
	s := startServer(t, dir)
	cli(t, dir, "device", "create", "press-01").mustSucceed(t)
	s.stop()

	logs, err := raftlog.Open(filepath.Join(dir, "raft", "log"), raftlog.Options{})
	if err != nil {
		t.Fatal(err)
	}
	last, err := logs.LastIndex()
	if err != nil {
		t.Fatal(err)
	}
	var prev raft.Log
	if err := logs.GetLog(last, &prev); err != nil {
		t.Fatal(err)
	}
	if err := logs.StoreLog(&raft.Log{Index: last + 1, Term: prev.Term, Type: raft.LogCommand, Data: []byte{200, '{', '}'}}); err != nil {
		t.Fatal(err)
	}
	logs.Close()

	p := launchServer(t, dir)
	select {
	case <-p.exited:
	case <-time.After(60 * time.Second):
		t.Fatalf("the node kept running with an entry it cannot apply; log:\n%s", p.logs.String())
	}
	if code := p.cmd.ProcessState.ExitCode(); code == 0 {
		t.Fatalf("exit code 0; log:\n%s", p.logs.String())
	}
	var errLines []string
	for _, l := range strings.Split(strings.TrimSpace(p.logs.String()), "\n") {
		if strings.HasPrefix(l, "error: ") {
			errLines = append(errLines, l)
		}
	}
	want := []string{fmt.Sprintf("raft entry %d", last+1), "command type 200", "upgrade this node"}
	if len(errLines) != 1 || strings.Contains(p.logs.String(), "goroutine ") {
		t.Fatalf("want one error line and no trace; log:\n%s", p.logs.String())
	}
	for _, w := range want {
		if !strings.Contains(errLines[0], w) {
			t.Errorf("error line %q does not say %q", errLines[0], w)
		}
	}
}
