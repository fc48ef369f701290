package pki

import (
	"errors"
	"strings"
	"testing"
)

const testFP = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestParseJoinToken(t *testing.T) {
	const secret = "s3cr3t-Value_xyz"
	tests := []struct {
		name       string
		token      string
		wantFP     string
		wantSecret string
		wantErr    string
	}{
		{name: "good", token: "APL1" + testFP + "::" + secret, wantFP: testFP, wantSecret: secret},
		{name: "surrounding whitespace", token: " \t APL1" + testFP + "::" + secret + "\n", wantFP: testFP, wantSecret: secret},
		{name: "upper-case fingerprint", token: "APL1" + strings.ToUpper(testFP) + "::" + secret, wantFP: testFP, wantSecret: secret},
		{name: "secret containing ::", token: "APL1" + testFP + "::a::b", wantFP: testFP, wantSecret: "a::b"},
		{name: "k3s prefix", token: "K10" + testFP + "::" + secret, wantErr: "join token: must start with APL1"},
		{name: "lower-case prefix", token: "apl1" + testFP + "::" + secret, wantErr: "join token: must start with APL1"},
		{name: "empty", token: "", wantErr: "join token: must start with APL1"},
		{name: "short fingerprint", token: "APL1" + testFP[:63] + "::" + secret, wantErr: "join token: CA fingerprint must be 64 hex digits"},
		{name: "long fingerprint", token: "APL1" + testFP + "0::" + secret, wantErr: "join token: CA fingerprint must be 64 hex digits"},
		{name: "non-hex fingerprint", token: "APL1" + "g" + testFP[1:] + "::" + secret, wantErr: "join token: CA fingerprint must be 64 hex digits"},
		{name: "missing ::", token: "APL1" + testFP + secret, wantErr: "join token: missing ::<secret>"},
		{name: "fingerprint only", token: "APL1" + testFP, wantErr: "join token: missing ::<secret>"},
		{name: "single colon", token: "APL1" + testFP + ":" + secret, wantErr: "join token: missing ::<secret>"},
		{name: "empty secret", token: "APL1" + testFP + "::", wantErr: "join token: empty secret"},
		{name: "white-space secret", token: "APL1" + testFP + "::   ", wantErr: "join token: empty secret"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fp, sec, err := ParseJoinToken(tt.token)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr || !errors.Is(err, ErrJoinToken) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), secret) {
					t.Errorf("error %q reveals the secret", err)
				}
				return
			}
			if err != nil || fp != tt.wantFP || sec != tt.wantSecret {
				t.Errorf("got %q, %q, %v; want %q, %q", fp, sec, err, tt.wantFP, tt.wantSecret)
			}
		})
	}
}

func TestJoinToken_RoundTrip(t *testing.T) {
	ca := newTestCA(t, "alpha")
	secret, err := NewSecret()
	if err != nil {
		t.Fatal(err)
	}
	if len(secret) != 43 {
		t.Errorf("secret %d characters, want 43 (32 bytes)", len(secret))
	}
	fp, got, err := ParseJoinToken(FormatJoinToken(ca.Fingerprint(), secret))
	if err != nil || fp != ca.Fingerprint() || !SecretEqual(got, secret) {
		t.Fatalf("round trip: %q, %v", fp, err)
	}
	if other, _ := NewSecret(); SecretEqual(other, secret) {
		t.Error("two secrets are equal")
	}
}

func FuzzParseJoinToken(f *testing.F) {
	f.Add("APL1" + testFP + "::secret")
	f.Add("APL1" + testFP)
	f.Add("K10" + testFP + "::x")
	f.Fuzz(func(t *testing.T, s string) {
		fp, secret, err := ParseJoinToken(s)
		if err != nil {
			// A fixed set of messages cannot echo any part of the token.
			switch err.Error() {
			case "join token: must start with APL1", "join token: CA fingerprint must be 64 hex digits",
				"join token: missing ::<secret>", "join token: empty secret":
			default:
				t.Fatalf("unexpected error %q", err)
			}
			if !errors.Is(err, ErrJoinToken) {
				t.Fatalf("error %v does not match ErrJoinToken", err)
			}
			return
		}
		fp2, secret2, err := ParseJoinToken(FormatJoinToken(fp, secret))
		if err != nil || fp2 != fp || secret2 != secret {
			t.Fatalf("re-parse of %q: %q, %q, %v; want %q, %q", s, fp2, secret2, err, fp, secret)
		}
	})
}
