package workload

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const hub = "appliance-hub"

func openService(t *testing.T, dir string, names ...string) *Service {
	t.Helper()
	s, err := Open(Config{Dir: dir, DeviceID: "press-01", HubName: hub, ServerNames: names})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// unixClient talks HTTP to one unix socket.
func unixClient(path string) *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
}

// signVia asks a module's socket to sign data for module/genID, as
// edge_hsm.py does.
func signVia(t *testing.T, s *Service, socketOf, module, genID string, data []byte) (int, string) {
	t.Helper()
	c := unixClient(filepath.Join(s.SocketDir(socketOf), SocketName))
	body, _ := json.Marshal(signRequest{KeyID: "primary", Algo: "HMACSHA256", Data: base64.StdEncoding.EncodeToString(data)})
	resp, err := c.Post(fmt.Sprintf("http://workload/modules/%s/genid/%s/sign?api-version=%s", module, genID, APIVersion), "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return resp.StatusCode, string(b)
	}
	var out struct{ Digest string }
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return 200, out.Digest
}

// The flow of create_from_edge_environment: trust bundle, then a SAS token
// signed through the socket, which the hub then accepts.
func TestWorkload_SignedTokenAuthenticates(t *testing.T) {
	s := openService(t, t.TempDir(), "127.0.0.1", hub)
	if _, err := s.Sync([]string{"sensor", "filter"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Serve(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The trust bundle verifies the hub's certificate.
	resp, err := unixClient(filepath.Join(s.SocketDir("sensor"), SocketName)).Get("http://workload/trust-bundle?api-version=" + APIVersion)
	if err != nil {
		t.Fatal(err)
	}
	var tb struct{ Certificate string }
	if err := json.NewDecoder(resp.Body).Decode(&tb); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(tb.Certificate)) {
		t.Fatal("trust bundle holds no certificate")
	}
	leaf := s.TLSConfig().Certificates[0].Leaf
	for _, name := range []string{"127.0.0.1", hub} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: name}); err != nil {
			t.Errorf("hub certificate for %s: %v", name, err)
		}
	}

	id, _ := s.Identity("sensor")
	// Build the token exactly as azure-iot-device's RenewableSasToken does.
	sr := queryEscape(hub + "/devices/press-01/modules/sensor")
	se := fmt.Sprint(time.Now().Add(time.Hour).Unix())
	code, digest := signVia(t, s, "sensor", "sensor", id.GenerationID, []byte(sr+"\n"+se))
	if code != 200 {
		t.Fatalf("sign: %d %s", code, digest)
	}
	token := "SharedAccessSignature sr=" + sr + "&sig=" + queryEscape(digest) + "&se=" + se
	if err := authErr(s, "press-01", "sensor", token); err != nil {
		t.Fatalf("token signed through the socket refused: %v", err)
	}
	// That token opens nothing else.
	if err := authErr(s, "press-01", "filter", token); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("sensor's token for filter: %v", err)
	}
	if err := authErr(s, "press-02", "sensor", token); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("sensor's token on another device: %v", err)
	}

	// A socket signs only for its own module, and only its current generation.
	filterID, _ := s.Identity("filter")
	if code, msg := signVia(t, s, "sensor", "filter", filterID.GenerationID, []byte("x")); code != 404 {
		t.Errorf("sensor's socket signed for filter: %d %s", code, msg)
	}
	if code, msg := signVia(t, s, "sensor", "sensor", "123", []byte("x")); code != 404 || !strings.Contains(msg, "generation") {
		t.Errorf("a stale generation was signed for: %d %s", code, msg)
	}
}

func TestVerifySAS(t *testing.T) {
	key := bytes.Repeat([]byte{7}, 32)
	now := time.Now()
	good := NewSAS(hub, "d", "m", key, now.Add(time.Hour))
	if err := VerifySAS(good, hub, "d", "m", key, now); err != nil {
		t.Fatalf("good token: %v", err)
	}
	if err := VerifySAS(good, "APPLIANCE-HUB", "d", "m", key, now); err != nil {
		t.Errorf("hub names ignore case: %v", err)
	}
	swap := func(old, new string) string { return strings.Replace(good, old, new, 1) }
	tests := []struct {
		name, token string
		msg         string
	}{
		{"expired", NewSAS(hub, "d", "m", key, now.Add(-time.Second)), "expired"},
		{"other module", NewSAS(hub, "d", "other", key, now.Add(time.Hour)), "is for"},
		{"other device", NewSAS(hub, "d2", "m", key, now.Add(time.Hour)), "is for"},
		{"device only", NewSAS(hub, "d", "", key, now.Add(time.Hour)), "is for"},
		{"other key", NewSAS(hub, "d", "m", bytes.Repeat([]byte{8}, 32), now.Add(time.Hour)), "wrong signature"},
		{"extended expiry", swap("&se=", "&se=9"), "wrong signature"},
		{"no prefix", strings.TrimPrefix(good, "SharedAccessSignature "), "malformed"},
		{"policy", good + "&skn=iothubowner", "key name"},
		{"duplicate field", good + "&se=1", "malformed"},
		{"bad base64", swap("&sig=", "&sig=%%%"), "malformed"},
		{"empty", "", "malformed"},
	}
	for _, tt := range tests {
		err := VerifySAS(tt.token, hub, "d", "m", key, now)
		if !errors.Is(err, ErrUnauthorized) || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("%s: %v; want ErrUnauthorized saying %q", tt.name, err, tt.msg)
		}
	}
}

// Identities survive a restart; a module that leaves and comes back gets a
// new generation and key, and its old tokens stop working.
func TestWorkload_IdentitiesPersistAndRenew(t *testing.T) {
	dir := t.TempDir()
	s := openService(t, dir, "127.0.0.1")
	if _, err := s.Sync([]string{"a", "b"}); err != nil {
		t.Fatal(err)
	}
	a1, _ := s.Identity("a")
	tok, _ := s.Token("a", time.Hour)
	caPEM := s.TrustBundle()
	s.Close()

	s = openService(t, dir, "127.0.0.1")
	if a, _ := s.Identity("a"); a.GenerationID != a1.GenerationID || !bytes.Equal(a.Key, a1.Key) {
		t.Fatal("identity of a changed across a restart")
	}
	if !bytes.Equal(s.TrustBundle(), caPEM) {
		t.Fatal("device CA changed across a restart")
	}
	if err := authErr(s, "press-01", "a", tok); err != nil {
		t.Fatalf("token from before the restart: %v", err)
	}
	if changed, _ := s.Sync([]string{"b", "a"}); changed {
		t.Error("Sync with the same modules reported a change")
	}
	if _, err := s.Sync([]string{"b"}); err != nil {
		t.Fatal(err)
	}
	if err := authErr(s, "press-01", "a", tok); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("a removed module still authenticates: %v", err)
	}
	if _, err := s.Sync([]string{"a", "b"}); err != nil {
		t.Fatal(err)
	}
	if a, _ := s.Identity("a"); a.GenerationID == a1.GenerationID {
		t.Error("a module that came back kept its generation id")
	}
	if err := authErr(s, "press-01", "a", tok); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("the old generation's token still authenticates: %v", err)
	}
	// New names give a new server certificate from the same CA.
	old := s.TLSConfig().Certificates[0].Leaf
	s.Close()
	s = openService(t, dir, "127.0.0.1", "10.0.0.7")
	leaf := s.TLSConfig().Certificates[0].Leaf
	if leaf.SerialNumber.Cmp(old.SerialNumber) == 0 {
		t.Fatal("server certificate not reissued for new names")
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: "10.0.0.7"}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "ca.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("ca.key mode: %v %v", fi.Mode(), err)
	}
}

// A socket refuses processes the peer check refuses, with 403.
func TestWorkload_PeerCheck(t *testing.T) {
	dir := t.TempDir()
	me := os.Getpid()
	var asked []int
	s, err := Open(Config{Dir: dir, DeviceID: "press-01", HubName: hub, PeerCheck: func(module string, pid int) error {
		asked = append(asked, pid)
		if module == "blocked" {
			return errors.New("process is not the module's")
		}
		return nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Sync([]string{"ok", "blocked"})
	s.Serve(context.Background())
	for _, m := range []string{"ok", "blocked"} {
		resp, err := unixClient(filepath.Join(s.SocketDir(m), SocketName)).Get("http://workload/trust-bundle")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if want := map[string]int{"ok": 200, "blocked": 403}[m]; resp.StatusCode != want {
			t.Errorf("%s: %d; want %d", m, resp.StatusCode, want)
		}
	}
	if len(asked) == 0 || asked[0] != me {
		t.Errorf("peer check saw pids %v; want ours (%d)", asked, me)
	}
}

// The TLS configuration serves the certificate clients verify with the
// trust bundle.
func TestWorkload_TLSHandshake(t *testing.T) {
	s := openService(t, t.TempDir(), "127.0.0.1")
	ln, err := tls.Listen("tcp", "127.0.0.1:0", s.TLSConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(s.TrustBundle())
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// authErr is Authenticate's error.
func authErr(s *Service, device, module, token string) error {
	_, err := s.Authenticate(device, module, token)
	return err
}

// Authenticate says when the token expires: the hub ends the session then.
func TestWorkload_AuthenticateReturnsExpiry(t *testing.T) {
	s := openService(t, t.TempDir())
	s.Sync([]string{"m"})
	tok, _ := s.Token("m", time.Hour)
	exp, err := s.Authenticate("press-01", "m", tok)
	if err != nil || exp.Before(time.Now().Add(59*time.Minute)) || exp.After(time.Now().Add(time.Hour+time.Second)) {
		t.Fatalf("expiry %s, %v", exp, err)
	}
}

// A service directory too long for a unix socket path below it (a long
// --data-dir) keeps its modules' sockets in a short directory of its own,
// and they answer there; a short directory another user could write to is
// refused, with an error naming the directory that is too long.
func TestWorkload_LongDirectoryUsesShortSocketDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 40))
	s := openService(t, dir, "127.0.0.1")
	if s.shortBase == "" {
		t.Fatal("no short socket directory for a service directory of", len(dir), "bytes")
	}
	t.Cleanup(func() { os.RemoveAll(s.shortBase) })
	module := strings.Repeat("m", 30)
	if _, err := s.Sync([]string{module}); err != nil {
		t.Fatal(err)
	}
	if err := s.Serve(context.Background()); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(s.SocketDir(module), SocketName)
	if len(sock) > maxSocketPath || !strings.HasPrefix(sock, s.shortBase+"/") {
		t.Fatalf("socket %s (%d bytes) not in the short directory %s", sock, len(sock), s.shortBase)
	}
	resp, err := unixClient(sock).Get("http://workload/trust-bundle?api-version=" + APIVersion)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("trust bundle through the short socket: %d", resp.StatusCode)
	}
	if st, code := signVia(t, s, module, module, s.ids[module].GenerationID, []byte("x")); st != 200 {
		t.Fatalf("sign through the short socket: %d %s", st, code)
	}

	// Roots another user could write to are refused.
	old := shortSocketRoots
	t.Cleanup(func() { shortSocketRoots = old })
	open := t.TempDir()
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	shortSocketRoots = []func() string{func() string { return open }}
	_, err = Open(Config{Dir: filepath.Join(dir, "other"), DeviceID: "press-01", HubName: hub})
	var spe *SocketPathError
	if !errors.As(err, &spe) || spe.Dir != filepath.Join(dir, "other") || !strings.Contains(err.Error(), "written by others") {
		t.Fatalf("a root others can write to: %v", err)
	}
}
