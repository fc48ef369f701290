package cli

import (
	"bytes"
	"io"
	"strings"
	"testing"
)

// TestProgress_LinesWhenNotATerminal: on anything but a terminal the
// progress is whole lines (no carriage returns), the first at once and
// the last at the end, saying how far it got.
func TestProgress_LinesWhenNotATerminal(t *testing.T) {
	var out bytes.Buffer
	p := newProgress(&out, "import devices.txt", 4096)
	if _, err := io.Copy(io.Discard, p.reader(strings.NewReader(strings.Repeat("x", 4096)))); err != nil {
		t.Fatal(err)
	}
	p.done()
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if strings.Contains(out.String(), "\r") || len(lines) < 2 || !strings.HasPrefix(lines[0], "import devices.txt: ") || !strings.Contains(lines[len(lines)-1], "100%") {
		t.Fatalf("progress output %q", out.String())
	}
}
