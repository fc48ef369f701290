package fleet

import (
	"strings"
	"testing"
)

func TestNestingDepth(t *testing.T) {
	for _, tc := range []struct {
		doc  string
		want int
	}{
		{`1`, 0},
		{`"{[{["`, 0},
		{`{}`, 1},
		{`{"a":[1,{"b":"]}\"{"}],"c":{}}`, 3},
		{`{"a":"\\","b":[[]]}`, 3},
		{strings.Repeat(`[`, 10000) + strings.Repeat(`]`, 10000), 10000},
	} {
		if got := NestingDepth([]byte(tc.doc)); got != tc.want {
			t.Errorf("NestingDepth(%.40q) = %d, want %d", tc.doc, got, tc.want)
		}
	}
}
