package identityfile

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	"appliance/fleet"
)

// FuzzParse: any line is either refused with a validation error, or read
// into an identity that the rest of the import can store as it is: a valid
// id and status, both keys or none, and tags that encode; a line that
// parses survives the export's encoding of it. The reader over the same
// bytes never returns a line over its cap and numbers lines upwards.
func FuzzParse(f *testing.F) {
	for _, seed := range []string{
		azureLine,
		`{"id":"a"}`,
		`{"id":"a","status":"disabled","tags":{"k":[1,{"x":null}]}}`,
		`{"id":"a","authentication":{"type":"sas","symmetricKey":{"primaryKey":null,"secondaryKey":null}}}`,
		`{"id":"a","authentication":{"symmetricKey":{"primaryKey":"` + key1 + `","secondaryKey":"` + key2 + `"}}}`,
		`{"id":"a","moduleId":"m"}`,
		`{"id":"a","authentication":{"type":"selfSigned"}}`,
		`{"id":"a","tags":{"":1}}`,
		"{\"id\":\"a\"}\n{\"id\":\"b\"}\r\n\n",
		`{"id":"\u00e9"}`,
		`{"id":"a","id":"b"}`,
		`nul`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		id, err := Parse(data)
		if err != nil {
			var ve *fleet.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("a refusal that is not a validation error: %v", err)
			}
		} else {
			if fleet.ValidateDeviceID(id.ID) != nil || (id.Status != fleet.DeviceEnabled && id.Status != fleet.DeviceDisabled) {
				t.Fatalf("accepted %+v", id)
			}
			if (id.PrimaryKey == "") != (id.SecondaryKey == "") || id.Tags == nil {
				t.Fatalf("accepted %+v", id)
			}
			line, err := Line(fleet.Device{ID: id.ID, Status: id.Status, Tags: id.Tags})
			if err != nil {
				t.Fatalf("export of an accepted line: %v", err)
			}
			back, err := Parse(bytes.TrimSpace(line))
			if err != nil || back.ID != id.ID || back.Status != id.Status || back.HasKeys() {
				t.Fatalf("export line %s read back as %+v, %v", line, back, err)
			}
		}
		const maxLine = 64
		r := NewReader(bytes.NewReader(data), maxLine)
		last := 0
		for {
			n, line, err := r.Next()
			if err == io.EOF {
				break
			}
			if err != nil && !errors.Is(err, ErrLineTooLong) {
				t.Fatal(err)
			}
			if n <= last || len(line) > maxLine || strings.TrimSpace(string(line)) != string(line) {
				t.Fatalf("line %d after %d: %q (%v)", n, last, line, err)
			}
			last = n
		}
	})
}
