//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"appliance/api"
)

var binary string

// moduleBinary is agent/testdata/module built for the agent tests: a
// process module that records its starts and exits on request.
var moduleBinary string

// syncBuffer is a bytes.Buffer safe to read while a process writes to it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestMain(m *testing.M) {
	modDir, err := os.MkdirTemp("", "appliance-e2e-module")
	if err != nil {
		panic(err)
	}
	moduleBinary = filepath.Join(modDir, "module")
	build := exec.Command("go", "build", "-o", moduleBinary, "../agent/testdata/module")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		panic(fmt.Sprintf("build the test module: %v", err))
	}
	defer os.RemoveAll(modDir)
	binary = os.Getenv("APPLIANCE_BIN")
	if binary == "" {
		dir, err := os.MkdirTemp("", "appliance-e2e")
		if err != nil {
			panic(err)
		}
		binary = filepath.Join(dir, "appliance")
		cmd := exec.Command("go", "build", "-o", binary, "../cmd/appliance")
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			panic(fmt.Sprintf("build appliance: %v", err))
		}
		code := m.Run()
		os.RemoveAll(dir)
		os.RemoveAll(modDir)
		os.Exit(code)
	}
	code := m.Run()
	os.RemoveAll(modDir)
	os.Exit(code)
}

// server is one `appliance serve` process.
type server struct {
	t       *testing.T
	dataDir string
	cmd     *exec.Cmd
	logs    *syncBuffer
	url     string
	token   string
	// exited is closed when the process ends.
	exited chan struct{}
}

// watch reaps the process in the background so that a start that fails
// is seen at once rather than after a timeout.
func (s *server) watch() {
	s.exited = make(chan struct{})
	go func() {
		s.cmd.Wait()
		close(s.exited)
	}()
}

// startServer starts `appliance serve` on a data directory, on free
// loopback ports, and waits until it has a leader.
func startServer(t *testing.T, dataDir string, extra ...string) *server {
	t.Helper()
	return startServerOf(t, binary, dataDir, extra...)
}

// startServerOf is startServer with the binary bin (another release).
func startServerOf(t *testing.T, bin, dataDir string, extra ...string) *server {
	t.Helper()
	s := launchServerOf(t, bin, dataDir, extra...)
	s.waitReady()
	return s
}

// launchServer starts `appliance serve` without waiting for it to be
// ready: a node of a cluster that is restarted as a whole has no leader
// until enough of its peers are back.
func launchServer(t *testing.T, dataDir string, extra ...string) *server {
	t.Helper()
	return launchServerOf(t, binary, dataDir, extra...)
}

// launchServerOf is launchServer with the binary bin.
func launchServerOf(t *testing.T, bin, dataDir string, extra ...string) *server {
	t.Helper()
	os.Remove(filepath.Join(dataDir, "http-url"))
	args := append([]string{"serve", "--data-dir", dataDir, "--node-id", "n1",
		"--http-addr", "127.0.0.1:0", "--raft-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0"}, extra...)
	cmd := exec.Command(bin, args...)
	// The consumers' listener on a free port too (serve's default is
	// :1884); releases before it ignore the variable.
	cmd.Env = append(os.Environ(), "APPLIANCE_EVENTS_ADDR=127.0.0.1:0")
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{t: t, dataDir: dataDir, cmd: cmd, logs: logs}
	s.watch()
	t.Cleanup(func() {
		s.kill()
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
	})
	return s
}

func (s *server) waitReady() {
	s.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		select {
		case <-s.exited:
			s.t.Fatalf("server exited before it was ready; log:\n%s", s.logs.String())
		default:
		}
		if b, err := os.ReadFile(filepath.Join(s.dataDir, "http-url")); err == nil {
			s.url = strings.TrimSpace(string(b))
			tok, _ := os.ReadFile(filepath.Join(s.dataDir, "admin-token"))
			s.token = strings.TrimSpace(string(tok))
			if resp, err := s.httpClient().Get(s.url + "/readyz"); err == nil {
				resp.Body.Close()
				if resp.StatusCode == 200 {
					return
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.t.Fatalf("server did not become ready; log:\n%s", s.logs.String())
}

// kill sends SIGKILL: no graceful shutdown, no flush.
func (s *server) kill() {
	select {
	case <-s.exited:
		return
	default:
	}
	s.cmd.Process.Signal(syscall.SIGKILL)
	<-s.exited
}

// mqttURL is where the server's broker listens.
func (s *server) mqttURL() string {
	b, err := os.ReadFile(filepath.Join(s.dataDir, "mqtt-url"))
	if err != nil {
		s.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func (s *server) client() *api.Client {
	return &api.Client{BaseURL: s.url, Token: s.token, HTTP: s.httpClient()}
}

// caFile is the cluster CA the node's API and broker are verified with.
func (s *server) caFile() string { return filepath.Join(s.dataDir, "tls", "ca.crt") }

// httpClient trusts the node's cluster CA, as an operator's client does.
func (s *server) httpClient() *http.Client {
	pool := x509.NewCertPool()
	if pem, err := os.ReadFile(s.caFile()); err == nil {
		pool.AppendCertsFromPEM(pem)
	}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

// result of one CLI run.
type result struct {
	code           int
	stdout, stderr string
}

// cli runs the built binary as an operator would, with the data directory
// in the environment so it finds the node's address and token.
func cli(t *testing.T, dataDir string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return cliContext(ctx, t, dataDir, args...)
}

// cliContext runs the binary until it exits or ctx ends.
func cliContext(ctx context.Context, t *testing.T, dataDir string, args ...string) result {
	t.Helper()
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = os.Environ()
	if dataDir != "" {
		cmd.Env = append(cmd.Env, "APPLIANCE_DATA_DIR="+dataDir)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return result{code: code, stdout: out.String(), stderr: errb.String()}
}

func (r result) mustSucceed(t *testing.T) result {
	t.Helper()
	if r.code != 0 {
		t.Fatalf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	return r
}

// mustFailWithOneLine asserts a non-zero exit and a single readable line
// on stderr containing every one of want.
func (r result) mustFailWithOneLine(t *testing.T, want ...string) {
	t.Helper()
	if r.code == 0 {
		t.Fatalf("exit 0, want failure; stdout: %s", r.stdout)
	}
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	if len(lines) != 1 || !strings.HasPrefix(lines[0], "error: ") {
		t.Fatalf("stderr is not one error line:\n%s", r.stderr)
	}
	for _, w := range want {
		if !strings.Contains(lines[0], w) {
			t.Fatalf("error line %q does not mention %q", lines[0], w)
		}
	}
}
