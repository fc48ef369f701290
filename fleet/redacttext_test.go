package fleet

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"appliance/internal/secrettest"
)

// SecretValues finds every secret secrettest plants, in every placement,
// and nothing that is not secret; RedactText then hides each of them in
// free text, alone or inside other text.
func TestSecretValues_EveryPlantedSecret(t *testing.T) {
	secrets := secrettest.Secrets()
	content := secrettest.Manifest([]string{"/opt/app"}, secrets)
	found := SecretValues(content)
	has := map[string]bool{}
	for _, v := range found {
		has[v] = true
	}
	for _, s := range secrets {
		if !has[s.Value] && !slices.ContainsFunc(found, func(v string) bool { return strings.Contains(s.Value, v) && strings.Contains(v, secrettest.Marker) }) {
			t.Errorf("%s %s: its value %q is not among the secrets", s.Placement, s.Name, s.Value)
		}
	}
	if !has[secrettest.RegistryPassword] {
		t.Errorf("the registry password is not among the secrets")
	}
	for v := range secrettest.Harmless {
		if has[secrettest.Harmless[v]] {
			t.Errorf("harmless value %q taken for a secret", secrettest.Harmless[v])
		}
	}
	for _, v := range found {
		if !strings.Contains(v, secrettest.Marker) {
			t.Errorf("%q taken for a secret: it is not one of the planted values", v)
		}
	}
	if !slices.IsSortedFunc(found, func(a, b string) int { return len(b) - len(a) }) {
		t.Errorf("not longest first: %q", found)
	}

	// A module that prints its environment, or its settings, in any way.
	var text strings.Builder
	for _, s := range secrets {
		text.WriteString("env " + s.Name + "=" + s.Value + "\n")
		text.WriteString(`{"setting": "` + s.Value + `"} and alone: ` + s.Value + "\n")
		for _, p := range secretParts(s.Value) {
			text.WriteString("the key is " + p + ".\n")
		}
	}
	text.WriteString("registry login with " + secrettest.RegistryPassword + "\n")
	out := RedactText(text.String(), found)
	if strings.Contains(out, secrettest.Marker) {
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, secrettest.Marker) {
				t.Errorf("left in the text: %s", l)
			}
		}
	}
	for _, v := range secrettest.Harmless {
		if RedactText("LOG "+v, found) != "LOG "+v {
			t.Errorf("harmless %q redacted", v)
		}
	}
}

func TestSecretValues_Unreadable(t *testing.T) {
	for _, c := range []string{`not json`, `{"modulesContent": {"$edgeAgent": {"properties.desired": {"modules": {"a": {"Env": {"P": {"value": "x"}}}}}}}}`} {
		if got := SecretValues(json.RawMessage(c)); got != nil {
			t.Errorf("SecretValues(%s) = %q, want none", c, got)
		}
	}
}

// What RedactText hides without being told: the rules, in text as modules
// print it.
func TestRedactText_Rules(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"connecting with HostName=h;DeviceId=d;SharedAccessKey=abc123== now",
			"connecting with HostName=h;DeviceId=d;SharedAccessKey=<redacted> now"},
		{"Server=db;User Id=app;password=pa55;Encrypt=true", "Server=db;User Id=app;password=<redacted>;Encrypt=true"},
		{"signing with SharedAccessSignature sr=hub%2Fdevices%2Fd&sig=xyz&se=1 ok", "signing with SharedAccessSignature <redacted> ok"},
		{"auth: SharedAccessSignature sr=x&sig=y", "auth: <redacted> <redacted>"}, // the name hides the first word too
		{"dsn postgres://app:s3cret@db:5432/x", "dsn postgres://app:<redacted>@db:5432/x"},
		{"API_KEY=abcdef LOG_LEVEL=debug", "API_KEY=<redacted> LOG_LEVEL=debug"},
		{`{"apiKey": "abcdef", "threshold": 30}`, `{"apiKey": "<redacted>", "threshold": 30}`},
		{"db_password: 'x y z' mode: fast", "db_password: '<redacted>' mode: fast"},
		{`token="t0k3n" user=bob`, `token="<redacted>" user=bob`},
		{"time=2026-12-06T08:00:00Z level=INFO msg=started module=a", "time=2026-12-06T08:00:00Z level=INFO msg=started module=a"},
		{"see https://example.com:8443/path and 10:30", "see https://example.com:8443/path and 10:30"},
		{"AUTHOR=me PATH=/bin MONKEY=1", "AUTHOR=me PATH=/bin MONKEY=1"},
		{"already API_KEY=<redacted>", "already API_KEY=<redacted>"},
		{`credentials: {"user": "bob"}`, `credentials: {"user": "bob"}`},
	} {
		if got := RedactText(tc.in, nil); got != tc.want {
			t.Errorf("RedactText(%q)\n  = %q\nwant %q", tc.in, got, tc.want)
		}
	}
	// Known values, however they appear; short ones are not looked for.
	if got := RedactText("pin 42, word hunter2xx in passing", []string{"hunter2xx", "42"}); got != "pin 42, word <redacted> in passing" {
		t.Errorf("known values: %q", got)
	}
}

func TestParseLogTime(t *testing.T) {
	now := time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		in   string
		want time.Time
	}{
		{"", time.Time{}},
		{"10m", now.Add(-10 * time.Minute)},
		{"1h30m", now.Add(-90 * time.Minute)},
		{"1d", now.Add(-24 * time.Hour)},
		{"2 days 3 hours 2 minutes", now.Add(-(51*time.Hour + 2*time.Minute))},
		{"90 minutes", now.Add(-90 * time.Minute)},
		{"2026-12-06T11:00:00Z", now.Add(-time.Hour)},
		{"2026-12-06T11:00:00.123456789Z", now.Add(-time.Hour + 123456789)},
		{"1765018800", time.Unix(1765018800, 0).UTC()},
		{"1765018800.5", time.Unix(1765018800, 500000000).UTC()},
	} {
		got, err := ParseLogTime(tc.in, now)
		if err != nil || !got.Equal(tc.want) {
			t.Errorf("ParseLogTime(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"yesterday", "-10m", "10 fortnights", "1e9", "10m ago"} {
		if _, err := ParseLogTime(bad, now); err == nil || !strings.Contains(err.Error(), "not a time") {
			t.Errorf("ParseLogTime(%q): %v, want an error", bad, err)
		}
	}
}

func TestLogLevelOf(t *testing.T) {
	for in, want := range map[string]int{"<3> 2026-12-06 error": 3, "<7>x": 7, "plain": 6, "<9> no": 6, "": 6} {
		if got := LogLevelOf(in); got != want {
			t.Errorf("LogLevelOf(%q) = %d, want %d", in, got, want)
		}
	}
}

// FuzzRedactText: whatever the text, every known secret (of the length
// looked for) is gone from what RedactText returns, and valid UTF-8 stays
// valid.
func FuzzRedactText(f *testing.F) {
	f.Add("env DB_PASSWORD=hunter2 and HostName=h;SharedAccessKey=abc== at postgres://u:pw@db/x", "hunter2")
	f.Add(`{"apiKey": "k3y-value", "token": 'x'}`, "k3y-value")
	f.Add("SharedAccessSignature sr=a&sig=b&se=1", "sig=b")
	f.Add("", "")
	f.Fuzz(func(t *testing.T, text, secret string) {
		out := RedactText(text, []string{secret})
		if len(secret) >= MinSecretLength && !strings.Contains(Redacted, secret) && strings.Contains(out, secret) {
			t.Fatalf("RedactText(%q, %q) = %q: the secret is still there", text, secret, out)
		}
		if utf8.ValidString(text) && utf8.ValidString(secret) && !utf8.ValidString(out) {
			t.Fatalf("RedactText(%q) = %q: not UTF-8", text, out)
		}
	})
}

// FuzzParseLogTime: any input is a time or an error, never a panic; a
// time it reads is not before the Unix epoch unless written so.
func FuzzParseLogTime(f *testing.F) {
	for _, s := range []string{"10m", "1h30m", "2 days 3 hours", "2026-12-06T11:00:00.5Z", "1765018800.123456789", "", "yesterday"} {
		f.Add(s)
	}
	now := time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseLogTime(s, now)
		if err == nil && strings.TrimSpace(s) != "" && got.IsZero() {
			t.Fatalf("ParseLogTime(%q) = zero time, no error", s)
		}
	})
}
