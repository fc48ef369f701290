package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"testing"

	"appliance/fleet"
)

// requestTypes are the bodies the API decodes, indexed by the fuzz
// target's kind byte.
var requestTypes = []func() any{
	func() any { return &DeviceRequest{} },
	func() any { return &DevicePatch{} },
	func() any { return &DeploymentRequest{} },
	func() any { return &DeploymentPatch{} },
	func() any { return &EnrollmentRequest{} },
	func() any { return &RegenerateKeyRequest{} },
	func() any { return &RotateEnrollmentRequest{} },
	func() any { return &ConditionRequest{} },
	func() any { return &ManifestRequest{} },
}

// FuzzDecodeBody feeds arbitrary request bodies, as any client could send
// them, to DecodeBody for every request type (the committed corpus is in
// testdata/fuzz/FuzzDecodeBody). It must never panic; a refusal must be a
// *fleet.ValidationError (a 400 naming the key); and what it accepts is
// one JSON value without repeated keys that encoding/json decodes, with
// unknown fields refused, to the same value.
func FuzzDecodeBody(f *testing.F) {
	f.Add(uint8(2), []byte(`{"content":{"modulesContent":{}},"targetCondition":"*","priority":1}`))
	f.Fuzz(func(t *testing.T, kind uint8, body []byte) {
		newValue := requestTypes[int(kind)%len(requestTypes)]
		v := newValue()
		err := DecodeBody(body, v)
		if err != nil {
			var ve *fleet.ValidationError
			if !errors.As(err, &ve) || !errors.Is(err, fleet.ErrInvalid) {
				t.Fatalf("refused with %T, not a ValidationError: %v", err, err)
			}
			return
		}
		data := body
		if len(bytes.TrimSpace(data)) == 0 {
			data = []byte("{}")
		}
		if !json.Valid(data) {
			t.Fatalf("accepted a body that is not one JSON value: %q", body)
		}
		if dup, ok := duplicateKey(data); ok {
			t.Fatalf("accepted a body with the key %q twice: %q", dup, body)
		}
		want := newValue()
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(want); err != nil {
			t.Fatalf("accepted a body encoding/json refuses (%v): %q", err, body)
		}
		if !reflect.DeepEqual(v, want) {
			t.Fatalf("decoded %+v, encoding/json %+v, from %q", v, want, body)
		}
	})
}

// duplicateKey finds a key that appears twice in one object of a valid
// JSON text, by a different route than DecodeBody's walker: decoding into
// generic values and counting members.
func duplicateKey(data []byte) (string, bool) {
	dec := json.NewDecoder(bytes.NewReader(data))
	var walk func() (string, bool)
	walk = func() (string, bool) {
		tok, err := dec.Token()
		if err != nil {
			return "", false
		}
		switch tok {
		case json.Delim('{'):
			seen := map[string]bool{}
			for dec.More() {
				k, _ := dec.Token()
				key, _ := k.(string)
				if seen[key] {
					return key, true
				}
				seen[key] = true
				if dup, ok := walk(); ok {
					return dup, true
				}
			}
			dec.Token() // }
		case json.Delim('['):
			for dec.More() {
				if dup, ok := walk(); ok {
					return dup, true
				}
			}
			dec.Token() // ]
		}
		return "", false
	}
	return walk()
}
