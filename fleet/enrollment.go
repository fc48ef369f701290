package fleet

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"strings"
	"time"
)

// Enrollment is a group enrollment, like an Azure DPS enrollment group: a
// device that knows the enrollment's token registers itself on first
// connect, with the enrollment's initial tags, and the evaluator then
// targets it like any other device.
//
// The device never sends the token. It proves it holds it with the key
// derived from it, DeriveDeviceKey(token, deviceId) (HMAC-SHA256, as DPS
// derives device keys from a group key), and it presents, with that
// proof, a key of its own: 32 random bytes it made and stored before it
// first connected (EnrollmentKey). The controller registers the device
// with its own key only. Every holder of the token can compute any
// device's derived key, so the derived key opens no registered device:
// one device of a group cannot impersonate another.
type Enrollment struct {
	Name               string         `json:"name"`
	Tags               map[string]any `json:"tags"`
	CreatedTimeUTC     time.Time      `json:"createdTimeUtc"`
	LastUpdatedTimeUTC time.Time      `json:"lastUpdatedTimeUtc"`
	Etag               string         `json:"etag"`
	// DerivationKey is SHA-256 of the token's secret: enough to check a
	// device's derived key, never returned by a read.
	DerivationKey string `json:"derivationKey,omitempty"`
	// Token is set only in the response that created the enrollment.
	Token string `json:"token,omitempty"`
}

// Public drops the derivation key.
func (e Enrollment) Public() Enrollment {
	e.DerivationKey = ""
	return e
}

// NewEnrollmentToken returns a token for an enrollment and the derivation
// key the controller stores for it. The token is "<name>.<secret>".
func NewEnrollmentToken(name string) (token, derivationKey string, err error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", "", fmt.Errorf("generate enrollment token: %w", err)
	}
	secret := base64.RawURLEncoding.EncodeToString(b[:])
	token = name + "." + secret
	return token, derivationKeyOf(secret), nil
}

func derivationKeyOf(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return base64.StdEncoding.EncodeToString(sum[:])
}

// DeriveDeviceKey is the key a device enrolling with token uses.
func DeriveDeviceKey(token, deviceID string) (string, error) {
	_, secret, ok := strings.Cut(token, ".")
	if !ok || secret == "" {
		return "", Invalid("enrollToken", "is not an enrollment token (expected <name>.<secret>)")
	}
	return deviceKeyFrom(derivationKeyOf(secret), deviceID), nil
}

// DeviceKeyFor is the key a device enrolling with e must present.
func (e Enrollment) DeviceKeyFor(deviceID string) string {
	return deviceKeyFrom(e.DerivationKey, deviceID)
}

// EnrollmentKey is the MQTT password of a device that enrolls itself:
// the key derived from the group's token (the proof), ":", and the
// device's own key (what it will be registered with). A device key never
// contains ":" (base64), so the two forms cannot be confused.
func EnrollmentKey(derived, own string) string { return derived + ":" + own }

// ParseEnrollmentKey splits a password made by EnrollmentKey; ok is false
// for a plain device key.
func ParseEnrollmentKey(password string) (derived, own string, ok bool) {
	derived, own, ok = strings.Cut(password, ":")
	return derived, own, ok && derived != "" && own != ""
}

// ValidateOwnKey checks a device's own key: 32 bytes in standard base64,
// the shape NewKey makes, so that no device registers a guessable key.
func ValidateOwnKey(key string) error {
	b, err := base64.StdEncoding.DecodeString(key)
	if err != nil || len(b) != 32 {
		return Invalid("ownKey", "must be 32 random bytes in standard base64 (44 characters)")
	}
	return nil
}

func deviceKeyFrom(derivationKey, deviceID string) string {
	m := hmac.New(sha256.New, []byte(derivationKey))
	m.Write([]byte(deviceID))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// ValidateEnrollmentName: like a deployment id (lowercase letters, digits,
// - _ .), without the dot which separates a token's name from its secret.
func ValidateEnrollmentName(name string) error {
	if name == "" {
		return Invalid("name", "must not be empty")
	}
	if len(name) > MaxIDLength {
		return Invalid("name", "is %d characters long; at most %d are allowed", len(name), MaxIDLength)
	}
	for i, r := range name {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-', r == '_':
			continue
		}
		return Invalid("name", "character %q at position %d is not allowed (lowercase letters, digits, - and _ are)", r, i+1)
	}
	return nil
}
