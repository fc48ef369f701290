// Package testenv decides what a test does when something it needs from
// the machine is missing: a Debian tool (mosquitto-clients, chromium,
// make), the Docker daemon, the shared corpus beside the clone
// (../shared). On a developer's machine the test skips, saying how to get
// it; under CI it fails, because there a missing tool is a broken runner
// and a skipped test would pass without testing anything (.ci/run installs
// every tool and sets CI=true).
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// CI reports whether the tests run under CI: the CI environment variable
// is set to anything but "", "0" or "false".
func CI() bool {
	switch strings.ToLower(strings.TrimSpace(os.Getenv("CI"))) {
	case "", "0", "false":
		return false
	}
	return true
}

// Missing ends t for want of something the machine lacks: a failure under
// CI, a skip elsewhere. The message says what is missing and how to get
// it.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if CI() {
		t.Fatalf("%s (CI is set: a test that needs it fails instead of skipping)", msg)
		return
	}
	t.Skipf("%s (skipped here; with CI=true it fails)", msg)
}

// LookPath finds a program on PATH, or ends t with Missing and hint (how
// to install it).
func LookPath(t testing.TB, name, hint string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, "%s not found: %s", name, hint)
	}
	return p
}

// Dir checks that a directory the test reads exists (the shared corpus),
// or ends t with Missing and hint.
func Dir(t testing.TB, path, hint string) {
	t.Helper()
	if st, err := os.Stat(path); err != nil || !st.IsDir() {
		Missing(t, "%s not found: %s", path, hint)
	}
}

// SkipUnderRace skips a test that cannot run under the race detector: a
// load test holding thousands of sockets (the detector allows 8,128 live
// goroutines, and the server it slows is then starved by the load it is
// meant to withstand). make unit runs such tests again without -race
// (NORACE_TESTS in the Makefile): a test that calls this must be listed
// there, or it runs nowhere.
func SkipUnderRace(t testing.TB, why string) {
	t.Helper()
	if Race {
		t.Skipf("not under the race detector (%s): make unit runs it in its pass without -race", why)
	}
}
