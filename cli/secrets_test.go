package cli

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestSecretFlags: every secret can be given without the process list
// seeing it (--NAME-file, NAME env, NAME_FILE env), the first way given
// wins in that order, and a wrong use is one readable line.
func TestSecretFlags(t *testing.T) {
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tokenFile := file("token", "tok-from-file\n")
	envTokenFile := file("env-token", " tok-from-env-file ")
	empty := file("empty", "\n")

	var mu sync.Mutex
	var seen []string // Authorization headers the API got
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("Authorization"))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"items":[]}`))
	}))
	defer api.Close()
	list := []string{"device", "list", "--server", api.URL, "--data-dir", dir}

	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		auth string // the token the API must see; "" when the command must fail
		err  string
	}{
		{"token file", append(list, "--token-file", tokenFile), nil, "tok-from-file", ""},
		{"token env", list, map[string]string{"APPLIANCE_TOKEN": "tok-from-env"}, "tok-from-env", ""},
		{"token env file", list, map[string]string{"APPLIANCE_TOKEN_FILE": envTokenFile}, "tok-from-env-file", ""},
		{"flag file before env", append(list, "--token-file", tokenFile), map[string]string{"APPLIANCE_TOKEN": "tok-from-env"}, "tok-from-file", ""},
		{"env before env file", list, map[string]string{"APPLIANCE_TOKEN": "tok-from-env", "APPLIANCE_TOKEN_FILE": envTokenFile}, "tok-from-env", ""},
		{"token and token file", append(list, "--token", "x", "--token-file", tokenFile), nil, "", "give --token or --token-file, not both"},
		{"token file missing", append(list, "--token-file", filepath.Join(dir, "nope")), nil, "", "flag --token-file: open "},
		{"token file empty", append(list, "--token-file", empty), nil, "", "flag --token-file: " + empty + " is empty"},
		{"token env file empty", list, map[string]string{"APPLIANCE_TOKEN_FILE": empty}, "", "APPLIANCE_TOKEN_FILE: " + empty + " is empty"},
		{"device key and its file", []string{"agent", "--server", "mqtts://127.0.0.1:1", "--device-id", "d1", "--device-key", "k", "--device-key-file", tokenFile}, nil, "", "give --device-key or --device-key-file, not both"},
		{"device key file and enroll token file", []string{"agent", "--server", "mqtts://127.0.0.1:1", "--device-id", "d1", "--device-key-file", tokenFile, "--enroll-token-file", tokenFile}, nil, "", "not both"},
		{"enroll token env file empty", []string{"agent", "--server", "mqtts://127.0.0.1:1", "--device-id", "d1"}, map[string]string{"APPLIANCE_AGENT_ENROLL_TOKEN_FILE": empty}, "", "APPLIANCE_AGENT_ENROLL_TOKEN_FILE: " + empty + " is empty"},
		{"join token and its file", []string{"serve", "--data-dir", filepath.Join(dir, "node"), "--join", "https://127.0.0.1:1", "--join-token", "x", "--join-token-file", tokenFile}, nil, "", "give --join-token or --join-token-file, not both"},
		{"sim enroll token file missing", []string{"sim", "--server", "mqtts://127.0.0.1:1", "--devices", "1", "--enroll-token-file", filepath.Join(dir, "nope")}, nil, "", "flag --enroll-token-file: open "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mu.Lock()
			seen = nil
			mu.Unlock()
			getenv := func(k string) string {
				if k == "HOME" {
					return dir
				}
				return tc.env[k]
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var out, errb bytes.Buffer
			code := Execute(ctx, tc.args, &out, &errb, getenv, "test")
			if tc.err != "" {
				lines := strings.Split(strings.TrimSpace(errb.String()), "\n")
				if code == 0 || len(lines) != 1 || !strings.Contains(lines[0], tc.err) {
					t.Fatalf("exit %d, stderr %q; want one error line containing %q", code, errb.String(), tc.err)
				}
				return
			}
			if code != 0 {
				t.Fatalf("exit %d: %s", code, errb.String())
			}
			mu.Lock()
			defer mu.Unlock()
			if len(seen) == 0 || seen[0] != "Bearer "+tc.auth {
				t.Fatalf("the API saw %q; want the token %q", seen, tc.auth)
			}
		})
	}
}

// TestAgent_ServerWithoutScheme: a server without a scheme and no CA is
// refused with one line naming the flag, before any connection (before,
// the agent connected over plaintext MQTT, silently).
func TestAgent_ServerWithoutScheme(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, []byte("k"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	code := Execute(ctx, []string{"agent", "--server", "127.0.0.1:1883", "--device-id", "d1", "--device-key-file", key, "--runtime", "process", "--data-dir", dir},
		&out, &errb, func(k string) string { return map[string]string{"HOME": dir}[k] }, "test")
	const want = `error: flag --server: "127.0.0.1:1883": no scheme: write mqtts://127.0.0.1:1883 (TLS`
	if lines := strings.Split(strings.TrimSpace(errb.String()), "\n"); code == 0 || len(lines) != 1 || !strings.HasPrefix(lines[0], want) {
		t.Fatalf("exit %d, stderr %q; want one line starting %q", code, errb.String(), want)
	}
}
