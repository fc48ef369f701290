package evaluator

import (
	"bufio"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"
)

// The corpus holds target conditions seen in Azure's documentation and
// tests (copied from /work/shared/corpus). Lines that name properties.* or
// are whole queries ("from devices.modules where ...") are not target
// conditions: Compile refuses them with a message saying so, and
// CompileQuery accepts the properties ones.

func readLines(t testing.TB, name string) []string {
	t.Helper()
	f, err := os.Open(filepath.Join("testdata", "corpus", name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if line := sc.Text(); strings.TrimSpace(line) != "" {
			out = append(out, line)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestCompile_Corpus(t *testing.T) {
	doc := map[string]any{"environment": "test", "building": 9.0, "location": map[string]any{"state": "Oregon"}, "dashboard": true}
	for _, line := range readLines(t, "target-conditions.txt") {
		t.Run(line, func(t *testing.T) {
			_, err := Compile(line)
			switch {
			case strings.HasPrefix(strings.ToLower(line), "from "):
				if err == nil || !strings.Contains(err.Error(), "column 1: write only the condition: a target condition has no SELECT, FROM or WHERE") {
					t.Fatalf("Compile = %v, want the no-query-clause error", err)
				}
			case strings.Contains(line, "properties."):
				col := utf8.RuneCountInString(line[:strings.Index(line, "properties.")]) + 1
				var se *SyntaxError
				if !errors.As(err, &se) || se.Column != col || !strings.Contains(se.Msg, "only tags and deviceId may be used") {
					t.Fatalf("Compile = %v, want column %d: only tags and deviceId", err, col)
				}
				q, err := CompileQuery(line, "properties")
				if err != nil {
					t.Fatalf("CompileQuery: %v", err)
				}
				if _, err := q.EvalCEL(map[string]any{"properties": map[string]any{"reported": map[string]any{"devicemodel": "4000x"}}}); err != nil {
					t.Fatal(err)
				}
			default:
				if err != nil {
					t.Fatalf("Compile: %v", err)
				}
				evalAll(t, line, "linuxprod1", doc)
			}
		})
	}
}

func TestCompile_CorpusMalformed(t *testing.T) {
	want := map[string]string{
		"deviceId='jetsonnano0":   "column 10: unterminated string",
		"deviceId=''$DEVICE_ID''": "column 12: unexpected $DEVICE_ID after a complete condition",
	}
	for _, line := range readLines(t, "target-conditions-malformed.txt") {
		_, err := Compile(line)
		if err == nil {
			t.Errorf("Compile(%q) succeeded", line)
			continue
		}
		w, ok := want[line]
		if !ok {
			t.Errorf("no expectation for %q (error %v)", line, err)
			continue
		}
		if !strings.HasPrefix(err.Error(), w) {
			t.Errorf("Compile(%q) = %q, want prefix %q", line, err, w)
		}
	}
}

var fuzzDocs = []map[string]any{
	DeviceDocument("linuxprod1", map[string]any{"environment": "prod", "location": "westus", "operator": "John"}),
	DeviceDocument("d'2", map[string]any{"a": 1.0, "b": map[string]any{"c": "x", "d": nil}, "e": []any{1.0}, "f": true}),
	DeviceDocument("", nil),
	{"deviceId": 3.0, "tags": "not an object", "properties": map[string]any{"reported": map[string]any{"x": 1.0}}},
	{},
}

// FuzzCompile: compiling never panics, a refused condition gets a
// SyntaxError with a column inside it, and an accepted one evaluates
// without error, identically through CEL and the document evaluator, and
// compiles in the wider query language too.
func FuzzCompile(f *testing.F) {
	for _, name := range []string{"target-conditions.txt", "target-conditions-malformed.txt"} {
		for _, line := range readLines(f, name) {
			f.Add(line)
		}
	}
	f.Fuzz(func(t *testing.T, cond string) {
		c, err := Compile(cond)
		if err != nil {
			var se *SyntaxError
			if !errors.As(err, &se) || !errors.Is(err, ErrInvalidCondition) {
				t.Fatalf("Compile(%q) = %T %v, want *SyntaxError", cond, err, err)
			}
			if se.Column < 1 || se.Column > utf8.RuneCountInString(cond)+1 {
				t.Fatalf("Compile(%q): column %d outside the condition", cond, se.Column)
			}
			if se.Msg == "" {
				t.Fatalf("Compile(%q): empty message", cond)
			}
			return
		}
		q, err := CompileQuery(cond, "properties")
		if err != nil {
			t.Fatalf("Compile accepts %q but CompileQuery refuses it: %v", cond, err)
		}
		for _, doc := range fuzzDocs {
			for _, c := range []*Condition{c, q} {
				want, err := c.EvalCEL(doc)
				if err != nil {
					t.Fatalf("%q: CEL failed: %v\nCEL: %s", cond, err, c.CEL())
				}
				if got := c.EvalDocument(doc); got != want {
					t.Fatalf("%q on %v: EvalDocument = %v, CEL = %v\nCEL: %s", cond, doc, got, want, c.CEL())
				}
			}
		}
		e := NewEngine()
		for i, doc := range fuzzDocs[:3] {
			e.PutDevice(doc["deviceId"].(string)+strings.Repeat("_", i), doc["tags"].(map[string]any))
		}
		if _, err := e.PutDeployment(Deployment{ID: "x", Condition: cond}); err != nil {
			t.Fatalf("PutDeployment(%q): %v", cond, err)
		}
		ids, err := e.Match(c)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for i, doc := range fuzzDocs[:3] {
			if c.Eval(doc["deviceId"].(string)+strings.Repeat("_", i), doc["tags"].(map[string]any)) {
				n++
			}
		}
		if tg, _ := e.Counts("x"); len(ids) != n || tg != n {
			t.Fatalf("%q: engine matches %v (targets %d), Eval %d", cond, ids, tg, n)
		}
	})
}
