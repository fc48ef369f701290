package api

import (
	"bytes"
	"encoding"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strconv"
	"strings"

	"appliance/fleet"
)

// DecodeBody decodes a request body into v strictly: one JSON value and
// nothing after it, no object key twice (at any depth, the manifest
// included: Azure's own tools refuse those), no field v does not have, and
// a field's name spelled exactly as v's JSON tag (encoding/json alone
// would take "Priority" for "priority", and a second spelling of a key
// for the first). An empty body is {}. Errors are *fleet.ValidationError
// naming the offending key's path ("content.modulesContent.$edgeAgent")
// and, for syntax, the line and column.
func DecodeBody(data []byte, v any) error {
	if len(bytes.TrimSpace(data)) == 0 {
		data = []byte("{}")
	}
	if err := walkBody(data, reflect.TypeOf(v)); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return jsonError(data, err)
	}
	return nil
}

// walkBody reads data token by token, following the Go type t where it
// can (structs, maps, slices, pointers; json.RawMessage and any are walked
// untyped), and refuses what encoding/json would let through: a repeated
// key, a struct field in another case, data after the value.
func walkBody(data []byte, t reflect.Type) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	type frame struct {
		object  bool
		path    string
		typ     reflect.Type // nil: untyped
		keys    map[string]bool
		wantKey bool
		key     string // the current member's key (objects)
		index   int    // the current element's index (arrays)
	}
	var stack []*frame
	// childPath and childType describe the value that comes next.
	childPath := func() string {
		if len(stack) == 0 {
			return ""
		}
		f := stack[len(stack)-1]
		if f.object {
			if f.path == "" {
				return f.key
			}
			return f.path + "." + f.key
		}
		return f.path + "[" + strconv.Itoa(f.index) + "]"
	}
	childType := func() reflect.Type {
		if len(stack) == 0 {
			return deref(t)
		}
		f := stack[len(stack)-1]
		if f.typ == nil {
			return nil
		}
		switch f.typ.Kind() {
		case reflect.Struct:
			if sf, ok := jsonField(f.typ, f.key); ok {
				return deref(sf.Type)
			}
			return nil
		case reflect.Map, reflect.Slice, reflect.Array:
			return deref(f.typ.Elem())
		}
		return nil
	}
	// valueDone moves the parent on after a member or an element.
	valueDone := func() {
		if len(stack) == 0 {
			return
		}
		f := stack[len(stack)-1]
		if f.object {
			f.wantKey = true
		} else {
			f.index++
		}
	}
	for {
		off := dec.InputOffset()
		tok, err := dec.Token()
		if err != nil {
			return syntaxError(data, off, err)
		}
		if f := top(stack); f != nil && f.object && f.wantKey {
			if d, ok := tok.(json.Delim); ok && d == '}' {
				stack = stack[:len(stack)-1]
				valueDone()
			} else {
				key := tok.(string) // the decoder guarantees a string key here
				f.key, f.wantKey = key, false
				path := childPath()
				if f.keys[key] {
					return &fleet.ValidationError{Field: path, Msg: "duplicate key in the request body (a key may appear once per object)"}
				}
				f.keys[key] = true
				if f.typ != nil && f.typ.Kind() == reflect.Struct {
					if _, ok := jsonField(f.typ, key); !ok {
						msg := "unknown field in the request body"
						if exact, ok := jsonFieldFold(f.typ, key); ok {
							msg += fmt.Sprintf(" (field names are case-sensitive: %q)", exact)
						}
						return &fleet.ValidationError{Field: path, Msg: msg}
					}
				}
				continue
			}
		} else {
			typ := childType()
			if err := checkKind(typ, tok); err != nil {
				path := childPath()
				if path == "" {
					return &fleet.ValidationError{Msg: "request body must be " + err.Error()}
				}
				return &fleet.ValidationError{Field: path, Msg: "must be " + err.Error()}
			}
			switch tok {
			case json.Delim('{'), json.Delim('['):
				if typ == rawMessageType || (typ != nil && typ.Kind() == reflect.Interface) || decodesItself(typ) {
					typ = nil
				}
				stack = append(stack, &frame{object: tok == json.Delim('{'), path: childPath(), typ: typ, keys: map[string]bool{}, wantKey: true})
			case json.Delim(']'):
				stack = stack[:len(stack)-1]
				valueDone()
			default:
				valueDone()
			}
		}
		if len(stack) == 0 {
			// The value is complete: only white space may follow.
			off := dec.InputOffset()
			if _, err := dec.Token(); err != io.EOF {
				line, col := lineCol(data, skipSpace(data, off))
				return &fleet.ValidationError{Msg: fmt.Sprintf("request body: unexpected data after the JSON value at line %d, column %d", line, col)}
			}
			return nil
		}
	}
}

func top[F any](stack []*F) *F {
	if len(stack) == 0 {
		return nil
	}
	return stack[len(stack)-1]
}

// checkKind says what a value of Go type t must be when tok (a value's
// first token) is not that; nil t, and types that decode themselves, take
// anything. A null is always accepted (encoding/json leaves the field).
func checkKind(t reflect.Type, tok json.Token) error {
	if t == nil || tok == nil || t == rawMessageType || t.Kind() == reflect.Interface || decodesItself(t) {
		return nil
	}
	if d, ok := tok.(json.Delim); ok && d == ']' {
		return nil // the end of an array, not a value
	}
	var want, got string
	switch tok := tok.(type) {
	case json.Delim:
		got = map[json.Delim]string{'{': "an object", '[': "an array"}[tok]
	case string:
		got = "a string"
	case bool:
		got = "a boolean"
	case json.Number:
		got = "a number"
	}
	switch t.Kind() {
	case reflect.Struct, reflect.Map:
		want = "an object"
	case reflect.Slice, reflect.Array:
		want = "an array"
	case reflect.String:
		want = "a string"
	case reflect.Bool:
		want = "a boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		want = "an integer"
		if n, ok := tok.(json.Number); ok {
			if strings.ContainsAny(string(n), ".eE") {
				return fmt.Errorf("an integer, got %s", n)
			}
			if _, err := strconv.ParseInt(string(n), 10, t.Bits()); err != nil {
				return fmt.Errorf("an integer that fits in %d bits, got %s", t.Bits(), n)
			}
			return nil
		}
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		want = "a non-negative integer"
		if n, ok := tok.(json.Number); ok {
			if _, err := strconv.ParseUint(string(n), 10, t.Bits()); err != nil {
				return fmt.Errorf("a non-negative integer that fits in %d bits, got %s", t.Bits(), n)
			}
			return nil
		}
	case reflect.Float32, reflect.Float64:
		want = "a number"
	default:
		return nil
	}
	if want == got {
		return nil
	}
	return fmt.Errorf("%s, got %s", want, got)
}

// decodesItself reports whether encoding/json hands t's JSON to t's own
// UnmarshalJSON or UnmarshalText.
func decodesItself(t reflect.Type) bool {
	if t == nil {
		return false
	}
	p := reflect.PointerTo(t)
	return p.Implements(jsonUnmarshaler) || p.Implements(textUnmarshaler)
}

var (
	jsonUnmarshaler = reflect.TypeOf((*json.Unmarshaler)(nil)).Elem()
	textUnmarshaler = reflect.TypeOf((*encoding.TextUnmarshaler)(nil)).Elem()
)

var rawMessageType = reflect.TypeOf(json.RawMessage(nil))

func deref(t reflect.Type) reflect.Type {
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t
}

// jsonField finds the field of struct t whose JSON name is exactly name.
func jsonField(t reflect.Type, name string) (reflect.StructField, bool) {
	for _, f := range reflect.VisibleFields(t) {
		if n, ok := jsonName(f); ok && n == name {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

// jsonFieldFold finds the field whose JSON name equals name but for case.
func jsonFieldFold(t reflect.Type, name string) (string, bool) {
	for _, f := range reflect.VisibleFields(t) {
		if n, ok := jsonName(f); ok && strings.EqualFold(n, name) {
			return n, true
		}
	}
	return "", false
}

// jsonName is the name encoding/json uses for a struct field; false for
// fields it skips and for embedded structs (whose fields are promoted).
func jsonName(f reflect.StructField) (string, bool) {
	if !f.IsExported() {
		return "", false
	}
	tag := f.Tag.Get("json")
	if tag == "-" {
		return "", false
	}
	name, _, _ := strings.Cut(tag, ",")
	if f.Anonymous && name == "" && deref(f.Type).Kind() == reflect.Struct {
		return "", false
	}
	if name == "" {
		name = f.Name
	}
	return name, true
}

func skipSpace(data []byte, off int64) int64 {
	for off < int64(len(data)) && strings.IndexByte(" \t\r\n", data[off]) >= 0 {
		off++
	}
	return off
}

// syntaxError describes a syntax error at its line and column.
func syntaxError(data []byte, off int64, err error) error {
	var syn *json.SyntaxError
	if errors.As(err, &syn) {
		off = syn.Offset
	} else if errors.Is(err, io.ErrUnexpectedEOF) || err == io.EOF {
		off = int64(len(data))
		err = errors.New("unexpected end of JSON input")
	}
	line, col := lineCol(data, off)
	return &fleet.ValidationError{Msg: fmt.Sprintf("request body: invalid JSON at line %d, column %d: %v", line, col, err)}
}
