package pki

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
)

// JoinTokenPrefix starts every join token; the digit is the format version.
const JoinTokenPrefix = "APL1"

const fingerprintLen = 64 // hex digits of a SHA-256

// NewSecret returns 32 random bytes, base64 RawURLEncoding: safe in a shell,
// a URL and a token.
func NewSecret() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generate join secret: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// FormatJoinToken returns APL1<caFingerprint>::<secret>. Like k3s' K10
// tokens, it lets a joiner authenticate the cluster (by the CA pin) before
// it hands over the secret that authenticates the joiner.
func FormatJoinToken(caFingerprint, secret string) string {
	return JoinTokenPrefix + caFingerprint + "::" + secret
}

// ParseJoinToken splits a token made by FormatJoinToken, ignoring
// surrounding white space (tokens get pasted). The fingerprint is returned
// in lowercase. Errors match ErrJoinToken and never contain the token,
// because they end up in logs.
func ParseJoinToken(s string) (caFingerprint, secret string, err error) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(s), JoinTokenPrefix)
	if !ok {
		return "", "", fmt.Errorf("%w: must start with %s", ErrJoinToken, JoinTokenPrefix)
	}
	fp, secret, found := strings.Cut(rest, "::")
	if !found && len(fp) > fingerprintLen {
		// Judge the fingerprint alone, so a token whose "::" was lost says so.
		fp = fp[:fingerprintLen]
	}
	if !isFingerprint(fp) {
		return "", "", fmt.Errorf("%w: CA fingerprint must be %d hex digits", ErrJoinToken, fingerprintLen)
	}
	if !found {
		return "", "", fmt.Errorf("%w: missing ::<secret>", ErrJoinToken)
	}
	if secret == "" {
		return "", "", fmt.Errorf("%w: empty secret", ErrJoinToken)
	}
	return strings.ToLower(fp), secret, nil
}

// SecretEqual compares two secrets in constant time (for equal lengths), so
// a joiner cannot guess the secret byte by byte from response times.
func SecretEqual(a, b string) bool {
	return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

func isFingerprint(s string) bool {
	if len(s) != fingerprintLen {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}
