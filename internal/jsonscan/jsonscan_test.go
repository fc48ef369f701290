package jsonscan_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
	"unicode/utf8"

	"appliance/internal/jsonscan"
)

// members reads every member of b, or the error that stopped the reading.
func members(b []byte) ([]jsonscan.Member, error) {
	o, err := jsonscan.NewObject(b)
	if err != nil {
		return nil, err
	}
	var out []jsonscan.Member
	var m jsonscan.Member
	for o.Next(&m) {
		out = append(out, m)
	}
	return out, o.Err()
}

func TestObject(t *testing.T) {
	for _, tc := range []struct {
		name, doc string
		want      []string // key=value, a key with an escape marked "~"
		err       bool
	}{
		{name: "empty", doc: ` {} `},
		{name: "members", doc: `{"deviceId":"a","tags":{"site":{"line":3},"x":[1,{"y":null}]},"n":-1.5e+3,"t":true,"f":false}`,
			want: []string{`deviceId="a"`, `tags={"site":{"line":3},"x":[1,{"y":null}]}`, `n=-1.5e+3`, `t=true`, `f=false`}},
		{name: "white space", doc: "{ \"a\" :\t1 ,\n\"b\"\r: \"x y\" }", want: []string{`a=1`, `b="x y"`}},
		{name: "escaped key", doc: `{"t\u0061gs":1,"q\"":"\\"}`, want: []string{`~t\u0061gs=1`, `~q\"="\\"`}},
		{name: "duplicates kept", doc: `{"a":1,"a":2}`, want: []string{`a=1`, `a=2`}},
		{name: "not an object", doc: `[1]`, err: true},
		{name: "nothing", doc: ``, err: true},
		{name: "unterminated", doc: `{"a":1`, err: true},
		{name: "trailing comma", doc: `{"a":1,}`, err: true},
		{name: "trailing bytes", doc: `{"a":1} x`, err: true},
		{name: "two documents", doc: `{}{}`, err: true},
		{name: "bad number", doc: `{"a":01}`, err: true},
		{name: "bad fraction", doc: `{"a":1.}`, err: true},
		{name: "bad exponent", doc: `{"a":1e}`, err: true},
		{name: "bad literal", doc: `{"a":tru}`, err: true},
		{name: "control character", doc: "{\"a\":\"x\ny\"}", err: true},
		{name: "bad escape", doc: `{"a":"\x"}`, err: true},
		{name: "short unicode escape", doc: `{"a":"\u12"}`, err: true},
		{name: "bad nested", doc: `{"a":{"b":[1,]}}`, err: true},
		{name: "missing colon", doc: `{"a" 1}`, err: true},
		{name: "unquoted key", doc: `{a:1}`, err: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ms, err := members([]byte(tc.doc))
			if tc.err {
				if !errors.Is(err, jsonscan.ErrSyntax) {
					t.Fatalf("err %v, want ErrSyntax", err)
				}
				if json.Valid([]byte(tc.doc)) && bytes.HasPrefix(bytes.TrimSpace([]byte(tc.doc)), []byte("{")) {
					t.Fatalf("refused a document encoding/json accepts")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, m := range ms {
				k := string(m.Key)
				if !m.Plain {
					k = "~" + k
				}
				got = append(got, k+"="+string(m.Value))
			}
			if len(got) != len(tc.want) {
				t.Fatalf("members %q, want %q", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("members %q, want %q", got, tc.want)
				}
			}
		})
	}
}

// FuzzObject: the scanner accepts exactly the objects encoding/json
// accepts, and hands out each member's key and value as encoding/json
// reads them.
func FuzzObject(f *testing.F) {
	for _, s := range []string{`{}`, `{"a":1}`, `{"deviceId":"d","tags":{"site":{"line":3},"env":"prod"},"k":[1,2,{"x":null}]}`,
		`{"a":"\u00e9\n"}`, `{"a":-0.5E-3,"b":true,"c":false}`, `{"a":01}`, `[]`, `{"a":1}x`, "{\"\xff\":1}"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if got, want := jsonscan.Valid(b), json.Valid(b); got != want {
			t.Fatalf("Valid(%q) = %v, encoding/json says %v", b, got, want)
		}
		ms, err := members(b)
		var asMap map[string]json.RawMessage
		jerr := json.Unmarshal(b, &asMap)
		isObject := jerr == nil && asMap != nil
		if (err == nil) != isObject {
			t.Fatalf("members of %q: err %v; encoding/json: %v", b, err, jerr)
		}
		if err != nil {
			return
		}
		// The last of equal keys is what encoding/json keeps.
		last := map[string][]byte{}
		for _, m := range ms {
			if !json.Valid(m.Value) {
				t.Fatalf("member %q of %q: value %q is not valid", m.Key, b, m.Value)
			}
			var key string
			if err := json.Unmarshal(append(append([]byte{'"'}, m.Key...), '"'), &key); err != nil {
				t.Fatalf("key %q of %q: %v", m.Key, b, err)
			}
			// A plain key is the key itself (encoding/json replaces
			// invalid UTF-8, which callers check for).
			if m.Plain && utf8.Valid(m.Key) && key != string(m.Key) {
				t.Fatalf("plain key %q reads as %q", m.Key, key)
			}
			last[key] = m.Value
		}
		if len(last) != len(asMap) {
			t.Fatalf("%q: %d distinct keys, encoding/json %d", b, len(last), len(asMap))
		}
		for k, v := range asMap {
			if !bytes.Equal(last[k], v) {
				t.Fatalf("%q: member %q is %q, encoding/json %q", b, k, last[k], v)
			}
		}
	})
}
