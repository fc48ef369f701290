package fleet

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"time"
)

// Device statuses, as in an Azure device identity.
const (
	DeviceEnabled  = "enabled"
	DeviceDisabled = "disabled"
)

// MaxIDLength is the longest device or deployment id accepted (Azure's limit).
const MaxIDLength = 128

// Device is one device identity with its twin tags, modelled on an Azure IoT
// Hub device identity so that users of Azure recognise its JSON.
type Device struct {
	ID                 string         `json:"deviceId"`
	Tags               map[string]any `json:"tags"`
	Status             string         `json:"status"`
	CreatedTimeUTC     time.Time      `json:"createdTimeUtc"`
	LastUpdatedTimeUTC time.Time      `json:"lastUpdatedTimeUtc"`
	Etag               string         `json:"etag"`
	Authentication     Authentication `json:"authentication"`
	// Enrollment names the enrollment group through which the device
	// registered itself ("" for a device an operator created). Kept when
	// the device changes; revoking that group's devices
	// (enrollment rotate/delete --revoke-devices) finds it by this.
	Enrollment string `json:"enrollment,omitempty"`
	// ResetIndex is the raft index of the device's last reset (`appliance
	// device reset`), 0 if never: while no deployment targets it, a device
	// keeps what it last ran, unless it was reset after it last took a
	// document (then it is sent an empty one). Set only by the reset;
	// ignored in a PUT. ResetTimeUTC is when.
	ResetIndex   uint64     `json:"resetIndex,omitempty"`
	ResetTimeUTC *time.Time `json:"resetTimeUtc,omitempty"`
}

// Authentication describes how a device proves who it is. Only symmetric
// keys ("sas") exist today. The keys themselves are never stored: KeyHashes
// holds their SHA-256 digests, and SymmetricKey is filled only in the
// response that created (or regenerated) them.
type Authentication struct {
	Type         string        `json:"type"`
	SymmetricKey *SymmetricKey `json:"symmetricKey,omitempty"`
	KeyHashes    *KeyHashes    `json:"keyHashes,omitempty"`
}

// SymmetricKey is a device's pair of keys in clear; shown exactly once.
type SymmetricKey struct {
	PrimaryKey   string `json:"primaryKey"`
	SecondaryKey string `json:"secondaryKey"`
}

// KeyHashes are the stored digests of a device's two keys.
type KeyHashes struct {
	Primary   string `json:"primary"`
	Secondary string `json:"secondary"`
}

// Public returns a copy of d that is safe to show to anyone holding the
// operator token: key hashes are dropped and clear keys never appear.
func (d Device) Public() Device {
	d.Authentication = Authentication{Type: d.Authentication.Type}
	return d
}

// NewKey returns a fresh random device key (32 bytes, base64), the same
// shape as an Azure symmetric key.
func NewKey() (string, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate device key: %w", err)
	}
	return base64.StdEncoding.EncodeToString(b[:]), nil
}

// HashKey returns the digest stored for a key. Keys are 256 random bits, so
// a plain SHA-256 is enough: there is nothing to brute-force.
func HashKey(key string) string {
	sum := sha256.Sum256([]byte(key))
	return base64.StdEncoding.EncodeToString(sum[:])
}

// CheckKey reports, in constant time, whether key is one of the device's two keys.
func (h KeyHashes) CheckKey(key string) bool {
	got := []byte(HashKey(key))
	p := subtle.ConstantTimeCompare(got, []byte(h.Primary))
	s := subtle.ConstantTimeCompare(got, []byte(h.Secondary))
	return p|s == 1
}

// ValidateDeviceID checks an id against Azure's device-id rules: 1 to 128
// characters, letters, digits and - . % _ * ? ! ( ) , : = @ $ '.
func ValidateDeviceID(id string) error {
	if id == "" {
		return Invalid("deviceId", "must not be empty")
	}
	if len(id) > MaxIDLength {
		return Invalid("deviceId", "is %d characters long; at most %d are allowed", len(id), MaxIDLength)
	}
	for i, r := range id {
		if !isDeviceIDRune(r) {
			return Invalid("deviceId", "character %q at position %d is not allowed (letters, digits and - . %% _ * ? ! ( ) , : = @ $ ' are)", r, i+1)
		}
	}
	return nil
}

func isDeviceIDRune(r rune) bool {
	switch {
	case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		return true
	}
	switch r {
	case '-', '.', '%', '_', '*', '?', '!', '(', ')', ',', ':', '=', '@', '$', '\'':
		return true
	}
	return false
}

// ValidateDeviceStatus accepts "" (meaning enabled), enabled and disabled.
func ValidateDeviceStatus(s string) error {
	switch s {
	case "", DeviceEnabled, DeviceDisabled:
		return nil
	}
	return Invalid("status", "must be %q or %q; got %q", DeviceEnabled, DeviceDisabled, s)
}

// ValidateTags checks that tags is a JSON object that can be stored and
// matched. Any JSON value is allowed inside, nested objects included.
func ValidateTags(tags map[string]any) error {
	for k := range tags {
		if k == "" {
			return Invalid("tags", "a tag name must not be empty")
		}
	}
	if decodedJSON(tags, 0) {
		return nil // what a JSON decoder made always encodes: no need to try
	}
	if _, err := json.Marshal(tags); err != nil {
		return Invalid("tags", "cannot be encoded as JSON: %v", err)
	}
	return nil
}

// decodedJSON reports whether v holds only what encoding/json decodes
// into an any (strings, finite float64s, booleans, nulls, []any and
// map[string]any), up to a depth that no cycle passes. json.Marshal
// cannot fail on such a value; anything else is left to it to judge.
func decodedJSON(v any, depth int) bool {
	if depth > 32 {
		return false
	}
	switch x := v.(type) {
	case nil, string, bool:
		return true
	case float64:
		return !math.IsInf(x, 0) && !math.IsNaN(x)
	case map[string]any:
		for _, e := range x {
			if !decodedJSON(e, depth+1) {
				return false
			}
		}
		return true
	case []any:
		for _, e := range x {
			if !decodedJSON(e, depth+1) {
				return false
			}
		}
		return true
	}
	return false
}
