package workload

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"appliance/internal/fsutil"
	"appliance/pki"
)

// APIVersion is what the agent sets IOTEDGE_APIVERSION to: the workload
// API version of IoT Edge 1.x. Requests of any version are answered.
const APIVersion = "2019-01-30"

// AuthScheme is IOTEDGE_AUTHSCHEME: modules authenticate with SAS tokens
// the workload API signs.
const AuthScheme = "sasToken"

// SocketName is the workload socket's name inside a module's socket
// directory, and ContainerSocketDir where a container sees that directory
// (IoT Edge's path: IOTEDGE_WORKLOADURI=unix:///var/run/iotedge/workload.sock).
const (
	SocketName         = "workload.sock"
	ContainerSocketDir = "/var/run/iotedge"
)

// Files in the service's directory.
const (
	caCertFile     = "ca.crt"
	caKeyFile      = "ca.key"
	serverCertFile = "hub.crt"
	serverKeyFile  = "hub.key"
	identitiesName = "identities.json"
	socketsDir     = "mnt"
)

// Config configures a Service.
type Config struct {
	// Dir holds the device CA, the hub's certificate, the identities and
	// the modules' socket directories. Created 0700.
	Dir string
	// DeviceID is this device's id.
	DeviceID string
	// HubName is the IoT hub host name modules are given
	// (IOTEDGE_IOTHUBHOSTNAME): the first part of their SAS resource.
	HubName string
	// ServerNames are the host names and IP addresses the hub's server
	// certificate is valid for: every IOTEDGE_GATEWAYHOSTNAME a module is
	// given. The certificate is issued again when they change.
	ServerNames []string
	// Logger receives the service's logs, tagged component=workload.
	Logger *slog.Logger
	// PeerCheck, when set, is asked about every connection to a module's
	// socket with the connecting process's pid (SO_PEERCRED, in the agent's
	// pid namespace; 0 if unknown): an error refuses its requests with 403.
	// The agent uses it to let only a process module's own processes use
	// its socket.
	PeerCheck func(module string, pid int) error
}

// Service is the device's identity service, the part of IoT Edge's
// security daemon modules talk to: it keeps the device CA and the hub's
// server certificate, an identity per module, and serves the workload API
// on one unix socket per module.
type Service struct {
	cfg    Config
	log    *slog.Logger
	ca     *pki.CA
	server tls.Certificate

	// shortBase, when set, holds the modules' socket directories instead
	// of Dir: Dir is too long for a unix socket path below it.
	shortBase string

	mu      sync.Mutex
	ids     map[string]Identity
	sockets map[string]*socket // by module, while served
	closed  bool
	srv     *http.Server
}

// Open loads the service's state from cfg.Dir, creating what is missing:
// the device CA on first use, the hub's certificate when the names it must
// hold change. It serves nothing until Serve.
func Open(cfg Config) (*Service, error) {
	if cfg.Dir == "" || cfg.DeviceID == "" || cfg.HubName == "" {
		return nil, errors.New("workload config: Dir, DeviceID and HubName are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if err := os.MkdirAll(filepath.Join(cfg.Dir, socketsDir), 0o700); err != nil {
		return nil, fmt.Errorf("create workload dir: %w", err)
	}
	if err := os.Chmod(cfg.Dir, 0o700); err != nil {
		return nil, err
	}
	s := &Service{cfg: cfg, log: cfg.Logger.With("component", "workload"), sockets: map[string]*socket{}}
	var err error
	if s.shortBase, err = shortSocketBase(cfg.Dir); err != nil {
		return nil, err
	}
	if s.shortBase != "" {
		s.log.Info("the modules' workload sockets are kept in a short directory: the service's own is too long for a unix socket path", "dir", s.shortBase, "serviceDir", cfg.Dir)
	}
	if s.ca, err = loadOrCreateCA(cfg.Dir, cfg.DeviceID); err != nil {
		return nil, err
	}
	if s.server, err = loadOrIssueServer(cfg.Dir, s.ca, cfg.ServerNames); err != nil {
		return nil, err
	}
	if s.ids, err = loadIdentities(filepath.Join(cfg.Dir, identitiesName)); err != nil {
		return nil, err
	}
	return s, nil
}

func loadOrCreateCA(dir, deviceID string) (*pki.CA, error) {
	certPath, keyPath := filepath.Join(dir, caCertFile), filepath.Join(dir, caKeyFile)
	certPEM, cerr := os.ReadFile(certPath)
	keyPEM, kerr := os.ReadFile(keyPath)
	if cerr == nil && kerr == nil {
		ca, err := pki.ParseCA(certPEM, keyPEM)
		if err != nil {
			return nil, fmt.Errorf("device CA in %s: %w", dir, err)
		}
		return ca, nil
	}
	if !errors.Is(cerr, os.ErrNotExist) || !errors.Is(kerr, os.ErrNotExist) {
		return nil, fmt.Errorf("device CA in %s: one of %s and %s is missing or unreadable (%v, %v)", dir, caCertFile, caKeyFile, cerr, kerr)
	}
	ca, err := pki.NewDeviceCA(deviceID, time.Now())
	if err != nil {
		return nil, err
	}
	key, err := ca.KeyPEM()
	if err != nil {
		return nil, err
	}
	if err := fsutil.WriteFileAtomic(keyPath, key, 0o600); err != nil {
		return nil, err
	}
	if err := fsutil.WriteFileAtomic(certPath, ca.CertPEM(), 0o644); err != nil {
		return nil, err
	}
	return ca, nil
}

// loadOrIssueServer keeps the stored server certificate if it was issued by
// ca for exactly names and is valid for another month; else it issues one.
func loadOrIssueServer(dir string, ca *pki.CA, names []string) (tls.Certificate, error) {
	certPath, keyPath := filepath.Join(dir, serverCertFile), filepath.Join(dir, serverKeyFile)
	want := slices.Clone(names)
	slices.Sort(want)
	want = slices.Compact(want)
	if certPEM, err := os.ReadFile(certPath); err == nil {
		if keyPEM, err := os.ReadFile(keyPath); err == nil {
			if c, err := tls.X509KeyPair(certPEM, keyPEM); err == nil && c.Leaf != nil &&
				c.Leaf.CheckSignatureFrom(ca.Cert) == nil && time.Until(c.Leaf.NotAfter) > 30*24*time.Hour &&
				slices.Equal(certNames(c.Leaf), want) {
				return c, nil
			}
		}
	}
	certPEM, keyPEM, err := ca.IssueServer("appliance device hub", want, time.Now())
	if err != nil {
		return tls.Certificate{}, err
	}
	if err := fsutil.WriteFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		return tls.Certificate{}, err
	}
	if err := fsutil.WriteFileAtomic(certPath, certPEM, 0o644); err != nil {
		return tls.Certificate{}, err
	}
	return tls.X509KeyPair(certPEM, keyPEM)
}

func certNames(c *x509.Certificate) []string {
	var out []string
	for _, ip := range c.IPAddresses {
		out = append(out, ip.String())
	}
	out = append(out, c.DNSNames...)
	slices.Sort(out)
	return slices.Compact(out)
}

// TLSConfig is the hub's server configuration: its certificate from the
// device CA, TLS 1.2 or later.
func (s *Service) TLSConfig() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{s.server}, MinVersion: tls.VersionTLS12}
}

// TrustBundle is the PEM of the device CA: what modules verify the hub with.
func (s *Service) TrustBundle() []byte { return s.ca.CertPEM() }

// Sync makes the registry hold exactly modules: a module new to it gets a
// new identity (so a module that left and came back has a new generation
// id and key, and its old tokens open nothing), a module no longer there
// loses its identity and its socket. The registry is written before Sync
// returns. It reports whether anything changed.
func (s *Service) Sync(modules []string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	next := map[string]Identity{}
	changed := false
	for _, m := range modules {
		if id, ok := s.ids[m]; ok {
			next[m] = id
			continue
		}
		id, err := newIdentity()
		if err != nil {
			return false, err
		}
		next[m] = id
		changed = true
	}
	for m := range s.ids {
		if _, ok := next[m]; !ok {
			changed = true
		}
	}
	if !changed {
		return false, nil
	}
	if err := saveIdentities(filepath.Join(s.cfg.Dir, identitiesName), next); err != nil {
		return false, fmt.Errorf("save module identities: %w", err)
	}
	s.ids = next
	s.syncSocketsLocked()
	return true, nil
}

// Identity returns a module's identity.
func (s *Service) Identity(module string) (Identity, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	id, ok := s.ids[module]
	return id, ok
}

// Modules lists the modules that have an identity, sorted.
func (s *Service) Modules() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return sortedNames(s.ids)
}

// Authenticate checks a module's MQTT password: a SAS token for exactly
// {HubName}/devices/{device}/modules/{module}, unexpired, signed with the
// module's current key. It returns when the token expires. Every refusal
// matches ErrUnauthorized.
func (s *Service) Authenticate(device, module, password string) (time.Time, error) {
	if device != s.cfg.DeviceID {
		return time.Time{}, fmt.Errorf("%w: device %q is not this device (%q)", ErrUnauthorized, device, s.cfg.DeviceID)
	}
	id, ok := s.Identity(module)
	if !ok {
		return time.Time{}, fmt.Errorf("%w: no module %q in the running deployment", ErrUnauthorized, module)
	}
	return verifySAS(password, s.cfg.HubName, device, module, id.Key, time.Now())
}

// Token signs a SAS token for a module valid for ttl, as a module would
// through the workload API (for the agent's own use and tests).
func (s *Service) Token(module string, ttl time.Duration) (string, error) {
	id, ok := s.Identity(module)
	if !ok {
		return "", fmt.Errorf("no identity for module %q", module)
	}
	return NewSAS(s.cfg.HubName, s.cfg.DeviceID, module, id.Key, time.Now().Add(ttl)), nil
}

// SocketDir is the host directory holding a module's workload socket: a
// process module is given <SocketDir>/workload.sock, a container has the
// directory mounted at ContainerSocketDir. Names whose path would exceed a
// unix socket's limit are hashed; when even that does not fit below the
// service's directory (a long --data-dir), the directories are below a
// short one of its own (shortSocketBase).
func (s *Service) SocketDir(module string) string {
	base := filepath.Join(s.cfg.Dir, socketsDir)
	if s.shortBase != "" {
		base = s.shortBase
	}
	dir := filepath.Join(base, module)
	if len(filepath.Join(dir, SocketName)) > maxSocketPath {
		dir = filepath.Join(base, hashName(module))
	}
	return dir
}

func hashName(name string) string {
	sum := sha256.Sum256([]byte(name))
	return hex.EncodeToString(sum[:8])
}

// maxSocketPath is the longest unix socket path Linux takes (sun_path is
// 108 bytes with its terminating NUL).
const maxSocketPath = 107

// shortSocketRoots are where a service whose directory is too long for
// its sockets keeps them, first that can be used: /run (the agent runs as
// root), then the temporary directory, per user.
var shortSocketRoots = []func() string{
	func() string { return "/run/appliance-workload" },
	func() string { return filepath.Join(os.TempDir(), fmt.Sprintf("appliance-workload-%d", os.Geteuid())) },
}

// shortSocketBase returns "" when a module's socket fits below dir (its
// name hashed if need be), else a short directory for the sockets of the
// service in dir: <root>/<hash of dir>, its root created 0700 or, if it
// exists, checked to be a directory of this user that no one else can
// write to (so that no other user can put a socket in a module's place).
func shortSocketBase(dir string) (string, error) {
	if len(filepath.Join(dir, socketsDir, hashName(""), SocketName)) <= maxSocketPath {
		return "", nil
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	var errs []error
	for _, root := range shortSocketRoots {
		r := root()
		if err := ownDir(r); err != nil {
			errs = append(errs, err)
			continue
		}
		base := filepath.Join(r, hashName(abs))
		if len(filepath.Join(base, hashName(""), SocketName)) > maxSocketPath {
			errs = append(errs, fmt.Errorf("%s is too long too", r))
			continue
		}
		if err := os.Mkdir(base, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			errs = append(errs, err)
			continue
		}
		return base, nil
	}
	return "", &SocketPathError{Dir: dir, Length: len(filepath.Join(dir, socketsDir, hashName(""), SocketName)), Err: errors.Join(errs...)}
}

// ownDir makes dir (0700) or checks that it is a directory of this user
// that no one else can write to.
func ownDir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err == nil || !errors.Is(err, os.ErrExist) {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	uid, ok := fileOwner(fi)
	switch {
	case !fi.IsDir():
		return fmt.Errorf("%s is not a directory", dir)
	case !ok || uid != os.Geteuid():
		return fmt.Errorf("%s belongs to another user", dir)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("%s can be written by others (mode %v)", dir, fi.Mode().Perm())
	}
	return nil
}

// SocketPathError: the modules' sockets fit neither below the service's
// directory nor in a short directory of its own.
type SocketPathError struct {
	Dir    string
	Length int // of a socket path below Dir
	Err    error
}

func (e *SocketPathError) Error() string {
	return fmt.Sprintf("the workload sockets below %s would be %d bytes long, over the %d of a unix socket path, and no short directory could be used instead: %v", e.Dir, e.Length, maxSocketPath, e.Err)
}

func (e *SocketPathError) Unwrap() error { return e.Err }

// socket is one module's listener.
type socket struct {
	module string
	ln     net.Listener
}

// Serve starts the workload API on a socket per module with an identity
// (and, as Sync changes the registry, on new modules' sockets), until ctx
// is done or Close.
func (s *Service) Serve(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil || s.closed {
		return errors.New("workload service already served or closed")
	}
	s.srv = &http.Server{
		Handler:           http.HandlerFunc(s.handle),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if mc, ok := c.(*moduleConn); ok {
				ctx = context.WithValue(ctx, moduleKey{}, mc.module)
				return context.WithValue(ctx, peerKey{}, peerPid(mc.Conn))
			}
			return ctx
		},
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	s.syncSocketsLocked()
	context.AfterFunc(ctx, func() { s.Close() })
	return nil
}

// Close stops serving and removes the sockets.
func (s *Service) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	for m, sk := range s.sockets {
		sk.ln.Close()
		delete(s.sockets, m)
	}
	if s.srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = s.srv.Shutdown(ctx)
	}
	return nil
}

// syncSocketsLocked listens on the socket of every module with an identity
// and stops listening on the others. s.mu is held.
func (s *Service) syncSocketsLocked() {
	if s.srv == nil || s.closed {
		return
	}
	for m, sk := range s.sockets {
		if _, ok := s.ids[m]; !ok {
			sk.ln.Close()
			delete(s.sockets, m)
			_ = os.RemoveAll(s.SocketDir(m))
		}
	}
	for _, m := range sortedNames(s.ids) {
		if _, ok := s.sockets[m]; ok {
			continue
		}
		ln, err := s.listen(m)
		if err != nil {
			s.log.Error("workload socket not served; the module cannot authenticate", "module", m, "error", err)
			continue
		}
		s.sockets[m] = &socket{module: m, ln: ln}
		go func() { _ = s.srv.Serve(ln) }()
	}
}

// listen creates the module's socket directory (0755, so that a container
// running as another user can reach the socket through its mount; the
// service's directory above it is 0700) and socket (0666 for the same
// reason), replacing a stale socket of an earlier run.
func (s *Service) listen(module string) (net.Listener, error) {
	dir := s.SocketDir(module)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, SocketName)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o666); err != nil {
		ln.Close()
		return nil, err
	}
	return &moduleListener{Listener: ln, module: module}, nil
}

// moduleListener tags each connection with the module whose socket it
// came through: a socket answers only for its module.
type moduleListener struct {
	net.Listener
	module string
}

func (l *moduleListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &moduleConn{Conn: c, module: l.module}, nil
}

type moduleConn struct {
	net.Conn
	module string
}

type (
	moduleKey struct{}
	peerKey   struct{}
)

// signRequest is the workload API's sign request (edge_hsm.py's).
type signRequest struct {
	KeyID string `json:"keyId"`
	Algo  string `json:"algo"`
	Data  string `json:"data"`
}

// maxSignData bounds what a module may ask to sign (a SAS string is short).
const maxSignData = 4 << 10

// handle serves IoT Edge's workload API as azure-iot-device's edge_hsm.py
// calls it: GET /trust-bundle, and POST
// /modules/{module}/genid/{generationId}/sign with {"keyId": "primary",
// "algo": "HMACSHA256", "data": <base64>}, answered {"digest": <base64>}.
// A socket signs only for its own module and current generation.
func (s *Service) handle(w http.ResponseWriter, r *http.Request) {
	module, _ := r.Context().Value(moduleKey{}).(string)
	fail := func(code int, msg string) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(map[string]string{"message": msg})
		s.log.Info("workload request refused", "module", module, "path", r.URL.Path, "status", code, "reason", msg)
	}
	if check := s.cfg.PeerCheck; check != nil {
		pid, _ := r.Context().Value(peerKey{}).(int)
		if err := check(module, pid); err != nil {
			fail(http.StatusForbidden, err.Error())
			return
		}
	}
	path := strings.Trim(r.URL.EscapedPath(), "/")
	if path == "trust-bundle" {
		if r.Method != http.MethodGet {
			fail(http.StatusMethodNotAllowed, "use GET")
			return
		}
		writeJSON(w, map[string]string{"certificate": string(s.TrustBundle())})
		return
	}
	parts := strings.Split(path, "/")
	if len(parts) != 5 || parts[0] != "modules" || parts[2] != "genid" || parts[4] != "sign" {
		fail(http.StatusNotFound, "unknown path")
		return
	}
	if r.Method != http.MethodPost {
		fail(http.StatusMethodNotAllowed, "use POST")
		return
	}
	name, err1 := url.PathUnescape(parts[1])
	genID, err2 := url.PathUnescape(parts[3])
	if err1 != nil || err2 != nil {
		fail(http.StatusBadRequest, "malformed path")
		return
	}
	id, ok := s.Identity(name)
	if name != module || !ok {
		fail(http.StatusNotFound, fmt.Sprintf("module %q not found on this socket", name))
		return
	}
	if genID != id.GenerationID {
		fail(http.StatusNotFound, fmt.Sprintf("module %q has no generation %q (the module was recreated: restart it)", name, genID))
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxSignData*2))
	if err != nil {
		fail(http.StatusBadRequest, "read body: "+err.Error())
		return
	}
	var req signRequest
	if err := json.Unmarshal(body, &req); err != nil {
		fail(http.StatusBadRequest, "body must be {\"keyId\": \"primary\", \"algo\": \"HMACSHA256\", \"data\": <base64>}")
		return
	}
	if req.KeyID != "primary" || req.Algo != "HMACSHA256" {
		fail(http.StatusBadRequest, "only keyId \"primary\" and algo \"HMACSHA256\" are supported")
		return
	}
	data, err := base64.StdEncoding.DecodeString(req.Data)
	if err != nil || len(data) > maxSignData {
		fail(http.StatusBadRequest, "data must be base64 of at most 4 KiB")
		return
	}
	writeJSON(w, map[string]string{"digest": base64.StdEncoding.EncodeToString(sign(id.Key, data))})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}
