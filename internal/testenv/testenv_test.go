package testenv

import "testing"

func TestCI(t *testing.T) {
	for _, tc := range []struct {
		value string
		want  bool
	}{{"", false}, {"0", false}, {"false", false}, {"FALSE", false}, {"true", true}, {"1", true}, {"yes", true}} {
		t.Setenv("CI", tc.value)
		if got := CI(); got != tc.want {
			t.Errorf("CI=%q: CI() = %v, want %v", tc.value, got, tc.want)
		}
	}
}

// recorder is a testing.TB that records how a helper ended it.
type recorder struct {
	testing.TB
	failed, skipped bool
	msg             string
}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.failed, r.msg = true, format
}
func (r *recorder) Skipf(format string, args ...any) {
	r.skipped, r.msg = true, format
}

func TestMissing_FailsUnderCISkipsElsewhere(t *testing.T) {
	for _, ci := range []string{"true", ""} {
		t.Setenv("CI", ci)
		r := &recorder{TB: t}
		LookPath(r, "no-such-program-anywhere", "apt-get install nothing")
		if r.failed != (ci == "true") || r.skipped != (ci == "") {
			t.Errorf("CI=%q: failed %v, skipped %v", ci, r.failed, r.skipped)
		}
		r = &recorder{TB: t}
		Dir(r, "/no/such/dir", "clone it")
		if r.failed != (ci == "true") || r.skipped != (ci == "") {
			t.Errorf("CI=%q, Dir: failed %v, skipped %v", ci, r.failed, r.skipped)
		}
	}
	r := &recorder{TB: t}
	Dir(r, t.TempDir(), "")
	if r.failed || r.skipped {
		t.Error("Dir ended a test for a directory that exists")
	}
}
