// Package identityfile reads and writes device identities in the format
// `az iot hub device-identity export` writes: one JSON object per line
// (Azure's ExportImportDevice). A migration from Azure IoT Hub imports
// such a file with the devices' keys, so that no device needs a visit;
// `appliance device export` writes one, without keys (they are stored
// only as hashes).
//
// What a line is read for: id, status, authentication.type and
// authentication.symmetricKey.primaryKey/secondaryKey, tags. What is read
// and refused: a moduleId (a module identity), an authentication type
// other than sas (X.509 devices). Everything else is ignored: eTag,
// importMode (the import's --mode decides), statusReason, twinETag,
// properties, capabilities, deviceScope, parentScopes, x509Thumbprint,
// fields Azure may add later. Standard library and fleet only.
package identityfile

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"appliance/fleet"
)

// Identity is one device identity read from a line.
type Identity struct {
	ID string
	// Status is fleet.DeviceEnabled or fleet.DeviceDisabled.
	Status string
	// PrimaryKey and SecondaryKey are the device's keys in clear (base64,
	// as Azure shows them), both set or both empty: a line without keys
	// (an export of ours, or Azure's without --include-keys) gives none.
	PrimaryKey, SecondaryKey string
	// Tags is the twin's tags, never nil.
	Tags map[string]any
}

// HasKeys tells whether the line carried the device's keys.
func (i Identity) HasKeys() bool { return i.PrimaryKey != "" }

// KeyHashes are the digests stored for the identity's keys, nil without
// keys.
func (i Identity) KeyHashes() *fleet.KeyHashes {
	if !i.HasKeys() {
		return nil
	}
	return &fleet.KeyHashes{Primary: fleet.HashKey(i.PrimaryKey), Secondary: fleet.HashKey(i.SecondaryKey)}
}

// Azure's symmetric keys are base64 of 16 to 64 bytes.
const (
	minKeyBytes = 16
	maxKeyBytes = 64
)

// exportLine is what a line is read for; the decoder skips every other
// field without keeping it.
type exportLine struct {
	ID             *string `json:"id"`
	ModuleID       *string `json:"moduleId"`
	Status         *string `json:"status"`
	Authentication *struct {
		Type         *string `json:"type"`
		SymmetricKey *struct {
			PrimaryKey   *string `json:"primaryKey"`
			SecondaryKey *string `json:"secondaryKey"`
		} `json:"symmetricKey"`
	} `json:"authentication"`
	Tags map[string]any `json:"tags"`
}

// Parse reads one line (without its newline). An error is a
// *fleet.ValidationError naming the field (authentication.symmetricKey.
// primaryKey, tags...), or naming none for a line that is not a JSON
// object.
func Parse(line []byte) (Identity, error) {
	if t := bytes.TrimLeft(line, " \t\r\n"); len(t) == 0 || t[0] != '{' {
		var v any
		if err := json.Unmarshal(line, &v); err != nil {
			return Identity{}, &fleet.ValidationError{Msg: "not a JSON object: " + jsonProblem(err)}
		}
		return Identity{}, &fleet.ValidationError{Msg: fmt.Sprintf("not a JSON object: a JSON %s", jsonKind(v))}
	}
	var l exportLine
	if err := json.Unmarshal(line, &l); err != nil {
		var typ *json.UnmarshalTypeError
		if errors.As(err, &typ) && typ.Field != "" {
			field := typ.Field
			if strings.HasPrefix(field, "tags.") {
				field = "tags"
			}
			return Identity{}, fleet.Invalid(field, "must be %s, got a JSON %s", kindOf(field), typ.Value)
		}
		return Identity{}, &fleet.ValidationError{Msg: "not a JSON object: " + jsonProblem(err)}
	}
	id := Identity{ID: deref(l.ID), Status: deref(l.Status), Tags: l.Tags}
	if id.ID == "" {
		return Identity{}, fleet.Invalid("id", "is required")
	}
	if err := fleet.ValidateDeviceID(id.ID); err != nil {
		var ve *fleet.ValidationError
		if errors.As(err, &ve) {
			return Identity{}, fleet.Invalid("id", "%s", ve.Msg)
		}
		return Identity{}, err
	}
	if module := deref(l.ModuleID); module != "" {
		return Identity{}, fleet.Invalid("moduleId", "%q: a module identity; only device identities are imported (module identities come with their deployment)", module)
	}
	switch id.Status {
	case "":
		id.Status = fleet.DeviceEnabled
	case fleet.DeviceEnabled, fleet.DeviceDisabled:
	default:
		return Identity{}, fleet.Invalid("status", "must be %q or %q; got %q", fleet.DeviceEnabled, fleet.DeviceDisabled, id.Status)
	}
	if a := l.Authentication; a != nil {
		switch typ := deref(a.Type); typ {
		case "", "sas":
		default:
			return Identity{}, fleet.Invalid("authentication.type", "%q: only symmetric keys (sas) are supported; X.509 devices cannot be imported", typ)
		}
		if k := a.SymmetricKey; k != nil {
			id.PrimaryKey, id.SecondaryKey = deref(k.PrimaryKey), deref(k.SecondaryKey)
		}
	}
	if err := checkKeys(id); err != nil {
		return Identity{}, err
	}
	if id.Tags == nil {
		id.Tags = map[string]any{}
	} else if err := fleet.ValidateTags(id.Tags); err != nil {
		return Identity{}, err
	}
	return id, nil
}

func checkKeys(id Identity) error {
	switch {
	case id.PrimaryKey == "" && id.SecondaryKey == "":
		return nil
	case id.PrimaryKey == "":
		return fleet.Invalid("authentication.symmetricKey.primaryKey", "is missing while secondaryKey is given: give both keys or neither")
	case id.SecondaryKey == "":
		return fleet.Invalid("authentication.symmetricKey.secondaryKey", "is missing while primaryKey is given: give both keys or neither")
	}
	for _, k := range [2]struct{ field, key string }{{"primaryKey", id.PrimaryKey}, {"secondaryKey", id.SecondaryKey}} {
		n := base64.StdEncoding.DecodedLen(len(k.key))
		var buf [maxKeyBytes + 3]byte
		if n > len(buf) {
			return fleet.Invalid("authentication.symmetricKey."+k.field, "is %d characters long; a key is %d to %d bytes (base64)", len(k.key), minKeyBytes, maxKeyBytes)
		}
		got, err := base64.StdEncoding.Decode(buf[:], []byte(k.key))
		if err != nil {
			return fleet.Invalid("authentication.symmetricKey."+k.field, "is not base64")
		}
		if got < minKeyBytes || got > maxKeyBytes {
			return fleet.Invalid("authentication.symmetricKey."+k.field, "is %d bytes; a key is %d to %d bytes (base64)", got, minKeyBytes, maxKeyBytes)
		}
	}
	return nil
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// kindOf says what a field of a line must be.
func kindOf(field string) string {
	switch field {
	case "tags", "authentication", "authentication.symmetricKey":
		return "a JSON object"
	}
	return "a string"
}

func jsonKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case []any:
		return "array"
	case string:
		return "string"
	case float64:
		return "number"
	case bool:
		return "boolean"
	}
	return "value"
}

// jsonProblem says what is wrong with a line's JSON, without echoing it
// (a line may hold keys).
func jsonProblem(err error) string {
	var syn *json.SyntaxError
	if errors.As(err, &syn) {
		return fmt.Sprintf("invalid JSON at column %d", syn.Offset)
	}
	var typ *json.UnmarshalTypeError
	if errors.As(err, &typ) {
		return "a JSON " + typ.Value
	}
	return "invalid JSON"
}

// ExportedDevice is the line `appliance device export` writes for a
// device: Azure's ExportImportDevice shape, the keys null (they are stored
// only as hashes: an export never holds them).
type ExportedDevice struct {
	ID             string               `json:"id"`
	ETag           string               `json:"eTag"`
	Status         string               `json:"status"`
	Authentication exportedAuthenticate `json:"authentication"`
	Tags           map[string]any       `json:"tags"`
}

type exportedAuthenticate struct {
	Type         string       `json:"type"`
	SymmetricKey exportedKeys `json:"symmetricKey"`
}

// exportedKeys are always null: the file says it holds no keys.
type exportedKeys struct {
	PrimaryKey   *string `json:"primaryKey"`
	SecondaryKey *string `json:"secondaryKey"`
}

// Line encodes a device as one export line, with its newline.
func Line(d fleet.Device) ([]byte, error) {
	tags := d.Tags
	if tags == nil {
		tags = map[string]any{}
	}
	status := d.Status
	if status == "" {
		status = fleet.DeviceEnabled
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	err := enc.Encode(ExportedDevice{ID: d.ID, ETag: d.Etag, Status: status, Tags: tags,
		Authentication: exportedAuthenticate{Type: "sas"}})
	if err != nil {
		return nil, fmt.Errorf("export device %s: %w", d.ID, err)
	}
	return buf.Bytes(), nil
}

// ErrLineTooLong is returned by Reader.Next for a line over the reader's
// cap; the reader has skipped the rest of it and goes on with the next.
var ErrLineTooLong = errors.New("line too long")

// Reader reads a file line by line, each at most maxLine bytes, without
// ever holding more than that: a line over the cap is skipped and
// reported, the others are read as usual.
type Reader struct {
	r       *bufio.Reader
	maxLine int
	line    int
}

// NewReader reads r with lines of at most maxLine bytes (the newline not
// counted).
func NewReader(r io.Reader, maxLine int) *Reader {
	return &Reader{r: bufio.NewReaderSize(r, maxLine+2), maxLine: maxLine}
}

// Next returns the next line that is not blank, with its number (from 1,
// blank lines counted) and without its line ending. The slice is valid
// until the next call. At the end it returns io.EOF; a line over the cap
// gives an error wrapping ErrLineTooLong with the line's number; any other
// error is the underlying reader's.
func (lr *Reader) Next() (int, []byte, error) {
	for {
		data, err := lr.r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			lr.line++
			n := lr.line
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = lr.r.ReadSlice('\n')
			}
			if err != nil && !errors.Is(err, io.EOF) {
				return n, nil, err
			}
			return n, nil, fmt.Errorf("line %d: %w: over %d bytes", n, ErrLineTooLong, lr.maxLine)
		}
		if len(data) == 0 && err != nil {
			return lr.line, nil, err
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return lr.line, nil, err
		}
		lr.line++
		line := bytes.TrimSpace(data)
		if len(line) > lr.maxLine {
			return lr.line, nil, fmt.Errorf("line %d: %w: over %d bytes", lr.line, ErrLineTooLong, lr.maxLine)
		}
		if len(line) == 0 {
			if err != nil {
				return lr.line, nil, err
			}
			continue
		}
		return lr.line, line, nil
	}
}
