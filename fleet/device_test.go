package fleet

import (
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
)

// TestValidateTags: tags as a JSON decoder makes them are accepted without
// being encoded; anything JSON cannot hold is refused naming "tags",
// however deep it sits (a cycle included).
func TestValidateTags(t *testing.T) {
	var decoded map[string]any
	if err := json.Unmarshal([]byte(`{"env":"prod","site":{"line":2,"cells":[1,"a",null,true,{"x":1.5}]},"gone":null}`), &decoded); err != nil {
		t.Fatal(err)
	}
	cycle := map[string]any{}
	cycle["self"] = cycle
	for _, tc := range []struct {
		name string
		tags map[string]any
		want string // "" accepted; else in the error
	}{
		{"decoded JSON", decoded, ""},
		{"none", nil, ""},
		{"Go ints", map[string]any{"line": 3, "n": int64(4)}, ""},
		{"empty name", map[string]any{"": "x"}, "a tag name must not be empty"},
		{"NaN", map[string]any{"t": math.NaN()}, "cannot be encoded as JSON"},
		{"infinity deep in a list", map[string]any{"a": []any{map[string]any{"b": math.Inf(1)}}}, "cannot be encoded as JSON"},
		{"a channel", map[string]any{"c": make(chan int)}, "cannot be encoded as JSON"},
		{"a cycle", cycle, "cannot be encoded as JSON"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateTags(tc.tags)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("ValidateTags: %v", err)
				}
				return
			}
			var ve *ValidationError
			if !errors.As(err, &ve) || !strings.Contains(err.Error(), "tags") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ValidateTags: %v, want a validation error of tags saying %q", err, tc.want)
			}
		})
	}
}
