package routing

import (
	"errors"
	"testing"
	"unicode/utf8"
)

// FuzzParse compiles arbitrary route text: it must never panic, an error
// must be a *SyntaxError pointing inside the text (or just past its end),
// and a route that compiles must evaluate any message without panicking.
// The seed corpus is in testdata/fuzz/FuzzParse; run it longer with
// go test -run '^$' -fuzz FuzzParse -fuzztime 60s ./routing/
func FuzzParse(f *testing.F) {
	f.Add("FROM /messages/modules/a/outputs/o WHERE alert = 'true' AND $body.x > 3 INTO BrokeredEndpoint(\"/modules/b/inputs/in\")")
	messages := []*Message{
		msg("a", "o", "alert=true", "x=1"),
		jsonMsg(`{"x": 4, "a": {"b": [1, "two", null, {"c": true}]}}`),
		jsonMsg(`not json`),
		{Source: "", Properties: nil, SystemProperties: nil},
	}
	f.Fuzz(func(t *testing.T, text string) {
		r, err := Parse(text)
		if err != nil {
			var se *SyntaxError
			if !errors.As(err, &se) {
				t.Fatalf("error %v (%T) is not a *SyntaxError", err, err)
			}
			if n := utf8.RuneCountInString(text); se.Column < 1 || se.Column > n+1 {
				t.Fatalf("column %d outside 1..%d: %v", se.Column, n+1, err)
			}
			return
		}
		for _, m := range messages {
			r.Matches(m)
		}
		NewTable([]*Route{r}).Route(messages[1])
	})
}
