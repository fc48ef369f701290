package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
)

func TestParseTags(t *testing.T) {
	for _, tc := range []struct {
		name    string
		json    string
		pairs   []string
		want    string
		wantErr string
	}{
		{name: "strings", pairs: []string{"environment=prod", "location=westus"}, want: `{"environment":"prod","location":"westus"}`},
		{name: "numbers and booleans stay typed", pairs: []string{"building=43", "ratio=0.5", "dashboard=true"}, want: `{"building":43,"dashboard":true,"ratio":0.5}`},
		{name: "leading zeros stay a string", pairs: []string{"line=007"}, want: `{"line":"007"}`},
		{name: "dotted keys nest", pairs: []string{"site.hall=B", "site.line=3"}, want: `{"site":{"hall":"B","line":3}}`},
		{name: "value with =", pairs: []string{"expr=a=b"}, want: `{"expr":"a=b"}`},
		{name: "json then pairs", json: `{"a":{"b":1}}`, pairs: []string{"a.c=x"}, want: `{"a":{"b":1,"c":"x"}}`},
		{name: "no =", pairs: []string{"novalue"}, wantErr: "--tag must be key=value"},
		{name: "empty key", pairs: []string{"=x"}, wantErr: "--tag must be key=value"},
		{name: "bad json", json: `[1]`, wantErr: "--tags must be a JSON object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseTags(tc.json, tc.pairs)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if b, _ := json.Marshal(got); string(b) != tc.want {
				t.Fatalf("got %s, want %s", b, tc.want)
			}
		})
	}
}

func TestExecute_UsageErrorsAreOneLine(t *testing.T) {
	env := map[string]string{"HOME": t.TempDir()}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"device", "show"}, "takes 1 argument(s): ID"},
		{[]string{"deployment", "create", "x", "--priority", "high"}, "--priority"},
		{[]string{"version", "-o", "yaml"}, "-o/--output must be table or json"},
		{[]string{"no-such-command"}, "unknown command"},
		{[]string{"device", "list", "--server", "http://127.0.0.1:1"}, "no admin token"},
		{[]string{"serve", "--data-dir", env["HOME"] + "/d", "--shed-devices-after", "-1s"}, "flag --shed-devices-after: -1s is negative"},
		// A rollout policy's mistakes name the flag, before any request.
		{[]string{"deployment", "create", "x", "--content", "m.json", "--waves", "10%,5%"}, "flag --waves: waves must increase: 5% does not exceed the wave before (10%)"},
		{[]string{"deployment", "create", "x", "--content", "m.json", "--waves", "50%,150%"}, "flag --waves: must be between 0% and 100%"},
		{[]string{"deployment", "create", "x", "--content", "m.json", "--waves", "10%", "--wave-success", "120%"}, "flag --wave-success: must be between 0% and 100%"},
		{[]string{"deployment", "create", "x", "--content", "m.json", "--max-failures", "-1%"}, "flag --max-failures: must be between 0% and 100%"},
		{[]string{"deployment", "create", "x", "--content", "m.json", "--waves", "5%", "--on-failure", "retry"}, "flag --on-failure: must be pause or rollback"},
		{[]string{"deployment", "update", "x", "--wave-timeout", "never"}, "flag --wave-timeout: must be a duration"},
		{[]string{"deployment", "rollout", "pause"}, "takes 1 argument(s): ID"},
	} {
		var out, errb bytes.Buffer
		code := Execute(context.Background(), tc.args, &out, &errb, func(k string) string { return env[k] }, "test")
		lines := strings.Split(strings.TrimSpace(errb.String()), "\n")
		if code == 0 || len(lines) != 1 || !strings.HasPrefix(lines[0], "error: ") || !strings.Contains(lines[0], tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want one error line containing %q", tc.args, code, errb.String(), tc.want)
		}
	}
}

func TestExecute_Version(t *testing.T) {
	var out, errb bytes.Buffer
	if code := Execute(context.Background(), []string{"version", "-o", "json"}, &out, &errb, func(string) string { return "" }, "v1.2.3"); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	if strings.TrimSpace(out.String()) != "{\n  \"version\": \"v1.2.3\"\n}" {
		t.Fatalf("version json: %q", out.String())
	}
}
