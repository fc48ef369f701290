package identityfile

import (
	"errors"
	"io"
	"strings"
	"testing"

	"appliance/fleet"
)

const (
	key1 = "c2VjcmV0LWtleS0xLTMyLWJ5dGVzLWxvbmctZXhhY3Q=" // 32 bytes
	key2 = "c2VjcmV0LWtleS0yLTMyLWJ5dGVzLWxvbmctZXhhY3Q="
)

// An Azure export line as `az iot hub device-identity export` writes it,
// with the fields we ignore.
const azureLine = `{"id":"press-01","eTag":"MA==","status":"disabled","statusReason":null,"authentication":{"symmetricKey":{"primaryKey":"` + key1 + `","secondaryKey":"` + key2 + `"},"x509Thumbprint":{"primaryThumbprint":null,"secondaryThumbprint":null},"type":"sas"},"twinETag":"AAAAAAAAAAE=","tags":{"environment":"prod","site":{"line":3}},"properties":{"desired":{"$metadata":{}},"reported":{}},"capabilities":{"iotEdge":true},"deviceScope":"ms-azure-iot-edge://press-01-1","parentScopes":[]}`

func TestParse_AzureLine(t *testing.T) {
	id, err := Parse([]byte(azureLine))
	if err != nil {
		t.Fatal(err)
	}
	if id.ID != "press-01" || id.Status != fleet.DeviceDisabled || id.PrimaryKey != key1 || id.SecondaryKey != key2 {
		t.Fatalf("got %+v", id)
	}
	site, _ := id.Tags["site"].(map[string]any)
	if id.Tags["environment"] != "prod" || site["line"] != float64(3) {
		t.Fatalf("tags %v", id.Tags)
	}
	h := id.KeyHashes()
	if h == nil || !h.CheckKey(key1) || !h.CheckKey(key2) || h.CheckKey("other") {
		t.Fatalf("key hashes %+v do not open the device with its keys", h)
	}
}

func TestParse_ExportRoundTrip(t *testing.T) {
	line, err := Line(fleet.Device{ID: "a", Etag: "17", Status: fleet.DeviceEnabled, Tags: map[string]any{"x": "<y>"},
		Authentication: fleet.Authentication{Type: "sas", KeyHashes: &fleet.KeyHashes{Primary: "p", Secondary: "s"}}})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(line), `"p"`) || !strings.Contains(string(line), `"primaryKey":null`) || !strings.HasSuffix(string(line), "}\n") {
		t.Fatalf("export line %s: want no key hash, null keys, one line", line)
	}
	id, err := Parse([]byte(strings.TrimSpace(string(line))))
	if err != nil {
		t.Fatal(err)
	}
	if id.ID != "a" || id.Status != fleet.DeviceEnabled || id.HasKeys() || id.Tags["x"] != "<y>" {
		t.Fatalf("round trip: %+v", id)
	}
}

func TestParse_Refusals(t *testing.T) {
	for _, tc := range []struct {
		line, field string
	}{
		{`not json`, ""},
		{`[1,2]`, ""},
		{`null`, ""},
		{`{"eTag":"x"}`, "id"},
		{`{"id":7}`, "id"},
		{`{"id":"has space"}`, "id"},
		{`{"id":"` + strings.Repeat("a", 129) + `"}`, "id"},
		{`{"id":"a","moduleId":"m"}`, "moduleId"},
		{`{"id":"a","status":"Enabled"}`, "status"},
		{`{"id":"a","status":true}`, "status"},
		{`{"id":"a","tags":[1]}`, "tags"},
		{`{"id":"a","tags":{"":1}}`, "tags"},
		{`{"id":"a","authentication":"sas"}`, "authentication"},
		{`{"id":"a","authentication":{"type":"selfSigned"}}`, "authentication.type"},
		{`{"id":"a","authentication":{"symmetricKey":[]}}`, "authentication.symmetricKey"},
		{`{"id":"a","authentication":{"symmetricKey":{"primaryKey":"` + key1 + `"}}}`, "authentication.symmetricKey.secondaryKey"},
		{`{"id":"a","authentication":{"symmetricKey":{"secondaryKey":"` + key1 + `"}}}`, "authentication.symmetricKey.primaryKey"},
		{`{"id":"a","authentication":{"symmetricKey":{"primaryKey":"!!","secondaryKey":"` + key1 + `"}}}`, "authentication.symmetricKey.primaryKey"},
		{`{"id":"a","authentication":{"symmetricKey":{"primaryKey":"` + key1 + `","secondaryKey":"c2hvcnQ="}}}`, "authentication.symmetricKey.secondaryKey"},
		{`{"id":"a","authentication":{"symmetricKey":{"primaryKey":5,"secondaryKey":"` + key1 + `"}}}`, "authentication.symmetricKey.primaryKey"},
	} {
		_, err := Parse([]byte(tc.line))
		var ve *fleet.ValidationError
		if !errors.As(err, &ve) || ve.Field != tc.field {
			t.Errorf("%s: %v, want a validation error of field %q", tc.line, err, tc.field)
		}
		if err != nil && strings.Contains(err.Error(), key1) {
			t.Errorf("%s: the error echoes a key: %v", tc.line, err)
		}
	}
}

func TestParse_Defaults(t *testing.T) {
	id, err := Parse([]byte(`{"id":"a","status":null,"tags":null,"authentication":{"type":"sas","symmetricKey":{"primaryKey":null,"secondaryKey":null}}}`))
	if err != nil {
		t.Fatal(err)
	}
	if id.Status != fleet.DeviceEnabled || id.HasKeys() || id.KeyHashes() != nil || id.Tags == nil || len(id.Tags) != 0 {
		t.Fatalf("got %+v", id)
	}
}

func TestReader_NumbersLinesAndSkipsLongOnes(t *testing.T) {
	long := strings.Repeat("x", 40)
	in := "{\"id\":\"a\"}\n\n  \r\n" + long + "\n{\"id\":\"b\"}\r\n" + long + long + long + "\n{\"id\":\"c\"}"
	r := NewReader(strings.NewReader(in), 32)
	type got struct {
		n    int
		line string
		long bool
	}
	var all []got
	for {
		n, line, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil && !errors.Is(err, ErrLineTooLong) {
			t.Fatal(err)
		}
		all = append(all, got{n, string(line), errors.Is(err, ErrLineTooLong)})
	}
	want := []got{{1, `{"id":"a"}`, false}, {4, "", true}, {5, `{"id":"b"}`, false}, {6, "", true}, {7, `{"id":"c"}`, false}}
	if len(all) != len(want) {
		t.Fatalf("got %+v, want %+v", all, want)
	}
	for i := range want {
		if all[i] != want[i] {
			t.Fatalf("line %d: got %+v, want %+v", i, all[i], want[i])
		}
	}
}
