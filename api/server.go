package api

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"appliance/fleet"
	"appliance/internal/routes"
)

// ErrUnavailable is returned by a Backend that cannot serve now (no raft
// leader, shutting down); it maps to 503.
var ErrUnavailable = errors.New("unavailable")

// ErrUpgradeRequired is returned by a Backend for a write that needs a
// command some member of the cluster cannot apply yet (it runs an older
// release); it maps to 503 with the code upgrade_required: the feature
// works once every member is upgraded.
var ErrUpgradeRequired = errors.New("upgrade required")

// Backend is what the API needs from a controller node.
type Backend interface {
	PutDevice(ctx context.Context, id string, req DeviceRequest, opts WriteOptions) (dev fleet.Device, created bool, err error)
	PatchDevice(ctx context.Context, id string, patch DevicePatch, opts WriteOptions) (fleet.Device, error)
	DeleteDevice(ctx context.Context, id string, opts WriteOptions) error
	Device(ctx context.Context, id string, consistent bool) (DeviceView, error)
	Devices(ctx context.Context, q DeviceQuery) (DevicePage, error)

	PutDeployment(ctx context.Context, id string, req DeploymentRequest, opts WriteOptions) (DeploymentView, bool, error)
	DryRunDeployment(ctx context.Context, id string, req DeploymentRequest, q DryRunQuery) (DryRunResult, error)
	PatchDeployment(ctx context.Context, id string, patch DeploymentPatch, opts WriteOptions) (DeploymentView, error)
	DeleteDeployment(ctx context.Context, id string, opts WriteOptions) error
	Deployment(ctx context.Context, id string, consistent bool) (DeploymentView, error)
	Deployments(ctx context.Context, q DeploymentQuery) (DeploymentPage, error)
	DeploymentStatus(ctx context.Context, id string, q StatusQuery) (DeploymentStatus, error)
	// History returns a deployment's (deployment true) or a device's
	// events, newest first.
	History(ctx context.Context, deployment bool, id string, limit int) (HistoryPage, error)

	RegenerateDeviceKey(ctx context.Context, id, which string) (fleet.Device, error)
	// ResetDevice has a device no deployment targets remove its modules
	// (sent an empty document); a device a deployment applies to is a
	// conflict.
	ResetDevice(ctx context.Context, id string, opts WriteOptions) (fleet.Device, error)

	PutEnrollment(ctx context.Context, name string, req EnrollmentRequest, opts WriteOptions) (fleet.Enrollment, bool, error)
	// DeleteEnrollment deletes an enrollment; with revokeDevices it also
	// clears the keys of the devices it registered, and returns them.
	DeleteEnrollment(ctx context.Context, name string, revokeDevices bool, opts WriteOptions) ([]string, error)
	// RotateEnrollment gives an enrollment a new token (the old one
	// enrolls nothing from then on).
	RotateEnrollment(ctx context.Context, name string, req RotateEnrollmentRequest, opts WriteOptions) (EnrollmentRotation, error)
	Enrollment(ctx context.Context, name string) (fleet.Enrollment, error)
	Enrollments(ctx context.Context) ([]fleet.Enrollment, error)

	// Cluster lists the raft members as this node sees them;
	// RemoveClusterMember takes a node out of the cluster (through the
	// leader).
	Cluster(ctx context.Context) (ClusterView, error)
	// It rotates the join and admin tokens and revokes the node's
	// certificate on every node.
	RemoveClusterMember(ctx context.Context, id string) (MemberRemoval, error)
	// RotateAdminToken replaces the admin token on every node and returns
	// the new one; the old one stops working.
	RotateAdminToken(ctx context.Context) (string, error)
	// RotateJoinToken replaces the join token on every node and returns
	// the new one; the old one stops admitting nodes.
	RotateJoinToken(ctx context.Context) (string, error)
	// Backup makes a consistent online backup of the replicated state and
	// the cluster's credentials (see package backup) and opens it for
	// reading; closing it removes it.
	Backup(ctx context.Context) (archive io.ReadCloser, size int64, err error)

	Health() Health
	Ready(ctx context.Context) error

	ConsoleBackend
	RolloutBackend
	HubBackend
	ImportBackend
}

// ServerConfig configures the HTTP handler.
type ServerConfig struct {
	Backend Backend
	// Token is the admin bearer token every /api/v1 request must carry.
	Token  string
	Logger *slog.Logger
	// MaxBodyBytes caps request bodies (default 4 MiB).
	MaxBodyBytes int64
	// ObserveRequest, when set, is told of every request once it is
	// answered: the route pattern it matched ("" for none), the status
	// code and how long it took. For metrics; it must be quick.
	ObserveRequest func(pattern string, status int, took time.Duration)
}

// Server serves the operator API.
type Server struct {
	cfg   ServerConfig
	mux   *routes.Mux
	token atomic.Pointer[string] // the admin token; SetToken replaces it
}

// NewServer builds the handler. It refuses an empty token: the API is never
// open by accident.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Backend == nil {
		return nil, fmt.Errorf("api: Backend is required")
	}
	if cfg.Token == "" {
		return nil, fmt.Errorf("api: an admin token is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = 4 << 20
	}
	s := &Server{cfg: cfg, mux: routes.New()}
	s.SetToken(cfg.Token)
	s.routes()
	return s, nil
}

// Handle adds another open route.
func (s *Server) Handle(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

// HandleWithToken adds another route behind the admin token (the node adds
// /metrics this way: deployment names are the operator's business).
func (s *Server) HandleWithToken(pattern string, h http.Handler) {
	s.mux.Handle(pattern, s.auth(h.ServeHTTP))
}

// Routes lists the pattern of every route served, the ones added with
// Handle and HandleWithToken included: tests walk them all.
func (s *Server) Routes() []string { return s.mux.Patterns() }

// Route is the pattern a request would be served by ("" for none).
func (s *Server) Route(r *http.Request) string { return s.mux.Pattern(r) }

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.cfg.ObserveRequest == nil {
		s.mux.ServeHTTP(w, r)
		return
	}
	start := time.Now()
	sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
	s.mux.ServeHTTP(sw, r)
	// The mux sets r.Pattern to the route it chose.
	s.cfg.ObserveRequest(r.Pattern, sw.status, time.Since(start))
}

// statusWriter remembers the status code a handler wrote.
type statusWriter struct {
	http.ResponseWriter
	status int
	wrote  bool
}

func (w *statusWriter) WriteHeader(code int) {
	if !w.wrote {
		w.status, w.wrote = code, true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	w.wrote = true
	return w.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the connection's writer
// (flushing a streamed backup, deadlines).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (s *Server) routes() {
	s.mux.HandleFunc("GET /healthz", s.healthz)
	s.mux.HandleFunc("GET /readyz", s.readyz)

	s.mux.Handle("PUT /api/v1/devices/{id}", s.auth(s.putDevice))
	s.mux.Handle("PATCH /api/v1/devices/{id}", s.auth(s.patchDevice))
	s.mux.Handle("DELETE /api/v1/devices/{id}", s.auth(s.deleteDevice))
	s.mux.Handle("GET /api/v1/devices/{id}", s.auth(s.getDevice))
	s.mux.Handle("GET /api/v1/devices", s.auth(s.listDevices))
	s.mux.Handle("POST /api/v1/devices/{id}/keys/regenerate", s.auth(s.regenerateKey))
	s.mux.Handle("POST /api/v1/devices/{id}/reset", s.auth(s.resetDevice))

	s.mux.Handle("PUT /api/v1/enrollments/{name}", s.auth(s.putEnrollment))
	s.mux.Handle("GET /api/v1/enrollments/{name}", s.auth(s.getEnrollment))
	s.mux.Handle("DELETE /api/v1/enrollments/{name}", s.auth(s.deleteEnrollment))
	s.mux.Handle("POST /api/v1/enrollments/{name}/rotate", s.auth(s.rotateEnrollment))
	s.mux.Handle("GET /api/v1/enrollments", s.auth(s.listEnrollments))

	s.mux.Handle("PUT /api/v1/deployments/{id}", s.auth(s.putDeployment))
	s.mux.Handle("PATCH /api/v1/deployments/{id}", s.auth(s.patchDeployment))
	s.mux.Handle("DELETE /api/v1/deployments/{id}", s.auth(s.deleteDeployment))
	s.mux.Handle("GET /api/v1/deployments/{id}", s.auth(s.getDeployment))
	s.mux.Handle("GET /api/v1/deployments", s.auth(s.listDeployments))
	s.mux.Handle("GET /api/v1/deployments/{id}/status", s.auth(s.deploymentStatus))
	s.mux.Handle("GET /api/v1/deployments/{id}/history", s.auth(s.history(true)))
	s.mux.Handle("GET /api/v1/devices/{id}/history", s.auth(s.history(false)))

	s.mux.Handle("GET /api/v1/cluster", s.auth(s.getCluster))
	s.mux.Handle("DELETE /api/v1/cluster/members/{id}", s.auth(s.removeClusterMember))
	s.mux.Handle("POST /api/v1/cluster/admin-token", s.auth(s.rotateAdminToken))
	s.mux.Handle("POST /api/v1/cluster/join-token", s.auth(s.rotateJoinToken))
	s.mux.Handle("GET /api/v1/backup", s.auth(s.backup))
	s.consoleRoutes()
	s.rolloutRoutes()
	s.hubRoutes()
	s.importRoutes()

	// Anything else under /api/ is still behind the token: an unknown
	// route must not tell an anonymous caller which routes exist.
	s.mux.Handle("/api/", s.auth(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "not_found", fmt.Sprintf("no route %s %s", r.Method, r.URL.Path), "")
	}))
}

// SetToken replaces the admin token requests must carry (a rotation
// applied on this node).
func (s *Server) SetToken(token string) { s.token.Store(&token) }

func (s *Server) auth(next http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := []byte(r.Header.Get("Authorization"))
		want := []byte("Bearer " + *s.token.Load())
		if subtle.ConstantTimeCompare(got, want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="appliance"`)
			writeError(w, http.StatusUnauthorized, "unauthorized", "missing or wrong bearer token (see <data-dir>/admin-token)", "")
			return
		}
		next(w, r)
	})
}

func (s *Server) getCluster(w http.ResponseWriter, r *http.Request) {
	v, err := s.cfg.Backend.Cluster(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// AdminTokenReply carries a new admin token, the one time it is shown.
type AdminTokenReply struct {
	AdminToken string `json:"adminToken"`
}

func (s *Server) rotateAdminToken(w http.ResponseWriter, r *http.Request) {
	s.rotate(w, r, s.cfg.Backend.RotateAdminToken, func(t string) any { return AdminTokenReply{AdminToken: t} })
}

// JoinTokenReply carries a new join token, the one time it is returned
// (a node's <data-dir>/join-token holds it too).
type JoinTokenReply struct {
	JoinToken string `json:"joinToken"`
}

func (s *Server) rotateJoinToken(w http.ResponseWriter, r *http.Request) {
	s.rotate(w, r, s.cfg.Backend.RotateJoinToken, func(t string) any { return JoinTokenReply{JoinToken: t} })
}

// rotate answers a token rotation with the new token.
func (s *Server) rotate(w http.ResponseWriter, r *http.Request, rotate func(context.Context) (string, error), reply func(string) any) {
	t, err := rotate(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, reply(t))
}

func (s *Server) removeClusterMember(w http.ResponseWriter, r *http.Request) {
	out, err := s.cfg.Backend.RemoveClusterMember(r.Context(), r.PathValue("id"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// backup sends the archive, made in full before the first byte goes out
// so that a failure is a proper error response.
//
// An archive can be large and the link slow, so the server's timeouts for
// a whole request and a whole response do not fit it: they are lifted for
// this request (the caller holds the admin token) and each chunk written
// must instead go out within backupChunkTimeout.
func (s *Server) backup(w http.ResponseWriter, r *http.Request) {
	ctl := http.NewResponseController(w)
	_ = ctl.SetReadDeadline(time.Time{})
	_ = ctl.SetWriteDeadline(time.Time{})
	rc, size, err := s.cfg.Backend.Backup(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	defer rc.Close()
	w.Header().Set("Content-Type", "application/x-tar")
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	w.Header().Set("Content-Disposition", `attachment; filename="appliance-backup.tar"`)
	w.WriteHeader(http.StatusOK)
	if _, err := io.Copy(chunkDeadlineWriter{w, ctl}, rc); err != nil {
		s.cfg.Logger.Warn("backup transfer cut short", "err", err)
	}
}

// backupChunkTimeout bounds writing one chunk of a backup download: a
// client that stops reading is dropped after it.
const backupChunkTimeout = 30 * time.Second

// chunkDeadlineWriter renews the connection's write deadline before each
// write.
type chunkDeadlineWriter struct {
	w   http.ResponseWriter
	ctl *http.ResponseController
}

func (c chunkDeadlineWriter) Write(p []byte) (int, error) {
	_ = c.ctl.SetWriteDeadline(time.Now().Add(backupChunkTimeout))
	return c.w.Write(p)
}

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.cfg.Backend.Health())
}

func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	h := s.cfg.Backend.Health()
	if err := s.cfg.Backend.Ready(r.Context()); err != nil {
		h.Status = err.Error()
		writeJSON(w, http.StatusServiceUnavailable, h)
		return
	}
	writeJSON(w, http.StatusOK, h)
}

func writeOpts(r *http.Request) WriteOptions {
	return WriteOptions{
		IfMatch:     unquoteEtag(r.Header.Get("If-Match")),
		IfNoneMatch: unquoteEtag(r.Header.Get("If-None-Match")),
	}
}

func unquoteEtag(s string) string {
	s = strings.TrimSpace(s)
	s = strings.TrimPrefix(s, "W/")
	return strings.Trim(s, `"`)
}

func setEtag(w http.ResponseWriter, etag string) {
	if etag != "" {
		w.Header().Set("ETag", `"`+etag+`"`)
	}
}

func consistent(r *http.Request) bool {
	v := r.URL.Query().Get("consistent")
	return v == "true" || v == "1"
}

// decode reads a request body, at most MaxBodyBytes, into v (see
// DecodeBody); a bad body is answered 400 (413 when too large) naming the
// offending key, and decode reports false.
func (s *Server) decode(w http.ResponseWriter, r *http.Request, v any) bool {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			writeError(w, http.StatusRequestEntityTooLarge, "bad_request", fmt.Sprintf("request body: larger than the limit of %d bytes", tooLarge.Limit), "")
			return false
		}
		writeError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("request body: %v", err), "")
		return false
	}
	if err := DecodeBody(data, v); err != nil {
		s.fail(w, r, err)
		return false
	}
	return true
}

// jsonError describes an error of encoding/json's decoder, naming the
// field when it knows it.
func jsonError(data []byte, err error) *fleet.ValidationError {
	var syn *json.SyntaxError
	if errors.As(err, &syn) {
		line, col := lineCol(data, syn.Offset)
		return &fleet.ValidationError{Msg: fmt.Sprintf("request body: invalid JSON at line %d, column %d: %v", line, col, syn)}
	}
	var typ *json.UnmarshalTypeError
	if errors.As(err, &typ) {
		if typ.Field == "" {
			return &fleet.ValidationError{Msg: fmt.Sprintf("request body must be a JSON %s, got JSON %s", typ.Type, typ.Value)}
		}
		return &fleet.ValidationError{Field: typ.Field, Msg: fmt.Sprintf("must be %s, got JSON %s", typ.Type, typ.Value)}
	}
	if msg := err.Error(); strings.HasPrefix(msg, "json: unknown field ") {
		return &fleet.ValidationError{Field: strings.Trim(strings.TrimPrefix(msg, "json: unknown field "), `"`), Msg: "unknown field in the request body"}
	}
	return &fleet.ValidationError{Msg: "request body: " + err.Error()}
}

func lineCol(data []byte, offset int64) (int, int) {
	line, col := 1, 1
	for i := int64(0); i < offset && i < int64(len(data)); i++ {
		if data[i] == '\n' {
			line++
			col = 1
		} else {
			col++
		}
	}
	return line, col
}

func (s *Server) putDevice(w http.ResponseWriter, r *http.Request) {
	var req DeviceRequest
	if !s.decode(w, r, &req) {
		return
	}
	opts, err := roundTrip(r, "deviceId", req.ID, req.Etag)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	dev, created, err := s.cfg.Backend.PutDevice(r.Context(), r.PathValue("id"), req, opts)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	setEtag(w, dev.Etag)
	code := http.StatusOK
	if created {
		code = http.StatusCreated
	}
	writeJSON(w, code, dev)
}

func (s *Server) patchDevice(w http.ResponseWriter, r *http.Request) {
	var p DevicePatch
	if !s.decode(w, r, &p) {
		return
	}
	dev, err := s.cfg.Backend.PatchDevice(r.Context(), r.PathValue("id"), p, writeOpts(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	setEtag(w, dev.Etag)
	writeJSON(w, http.StatusOK, dev)
}

func (s *Server) deleteDevice(w http.ResponseWriter, r *http.Request) {
	if err := s.cfg.Backend.DeleteDevice(r.Context(), r.PathValue("id"), writeOpts(r)); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) getDevice(w http.ResponseWriter, r *http.Request) {
	dev, err := s.cfg.Backend.Device(r.Context(), r.PathValue("id"), consistent(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	setEtag(w, dev.Etag)
	writeJSON(w, http.StatusOK, dev)
}

func pageParams(r *http.Request) (after string, limit int, err error) {
	q := r.URL.Query()
	after = q.Get("after")
	limit = DefaultPageSize
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > MaxPageSize {
			return "", 0, fleet.Invalid("limit", "must be an integer from 1 to %d; got %q", MaxPageSize, v)
		}
		limit = n
	}
	return after, limit, nil
}

func (s *Server) listDevices(w http.ResponseWriter, r *http.Request) {
	after, limit, err := pageParams(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	page, err := s.cfg.Backend.Devices(r.Context(), DeviceQuery{
		Condition: r.URL.Query().Get("condition"), Prefix: r.URL.Query().Get("prefix"),
		After: after, Limit: limit, Consistent: consistent(r),
	})
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, page)
}

func (s *Server) putDeployment(w http.ResponseWriter, r *http.Request) {
	var req DeploymentRequest
	if !s.decode(w, r, &req) {
		return
	}
	id := r.PathValue("id")
	opts, err := roundTrip(r, "id", req.ID, req.Etag)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if dryRun(r) {
		q, err := dryRunQuery(r)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		res, err := s.cfg.Backend.DryRunDeployment(r.Context(), id, req, q)
		s.reply(w, r, res, err)
		return
	}
	dep, created, err := s.cfg.Backend.PutDeployment(r.Context(), id, req, opts)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	setEtag(w, dep.Etag)
	code := http.StatusOK
	if created {
		code = http.StatusCreated
	}
	writeJSON(w, code, dep)
}

func (s *Server) patchDeployment(w http.ResponseWriter, r *http.Request) {
	var p DeploymentPatch
	if !s.decode(w, r, &p) {
		return
	}
	if dryRun(r) {
		q, err := dryRunQuery(r)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		res, err := s.cfg.Backend.DryRunPatchDeployment(r.Context(), r.PathValue("id"), p, q)
		s.reply(w, r, res, err)
		return
	}
	dep, err := s.cfg.Backend.PatchDeployment(r.Context(), r.PathValue("id"), p, writeOpts(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	setEtag(w, dep.Etag)
	writeJSON(w, http.StatusOK, dep)
}

func (s *Server) deleteDeployment(w http.ResponseWriter, r *http.Request) {
	if dryRun(r) {
		q, err := dryRunQuery(r)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		res, err := s.cfg.Backend.DryRunDeleteDeployment(r.Context(), r.PathValue("id"), q)
		s.reply(w, r, res, err)
		return
	}
	if err := s.cfg.Backend.DeleteDeployment(r.Context(), r.PathValue("id"), writeOpts(r)); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) getDeployment(w http.ResponseWriter, r *http.Request) {
	dep, err := s.cfg.Backend.Deployment(r.Context(), r.PathValue("id"), consistent(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	setEtag(w, dep.Etag)
	writeJSON(w, http.StatusOK, dep)
}

func (s *Server) listDeployments(w http.ResponseWriter, r *http.Request) {
	after, limit, err := pageParams(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	labels := map[string]string{}
	for _, l := range r.URL.Query()["label"] {
		k, v, ok := strings.Cut(l, "=")
		if !ok || k == "" {
			s.fail(w, r, fleet.Invalid("label", "must be key=value; got %q", l))
			return
		}
		labels[k] = v
	}
	page, err := s.cfg.Backend.Deployments(r.Context(), DeploymentQuery{Labels: labels, After: after, Limit: limit, Consistent: consistent(r)})
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, page)
}

func (s *Server) regenerateKey(w http.ResponseWriter, r *http.Request) {
	var req RegenerateKeyRequest
	if !s.decode(w, r, &req) {
		return
	}
	d, err := s.cfg.Backend.RegenerateDeviceKey(r.Context(), r.PathValue("id"), req.Key)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	setEtag(w, d.Etag)
	writeJSON(w, http.StatusOK, d)
}

func (s *Server) putEnrollment(w http.ResponseWriter, r *http.Request) {
	var req EnrollmentRequest
	if !s.decode(w, r, &req) {
		return
	}
	e, created, err := s.cfg.Backend.PutEnrollment(r.Context(), r.PathValue("name"), req, writeOpts(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	setEtag(w, e.Etag)
	code := http.StatusOK
	if created {
		code = http.StatusCreated
	}
	writeJSON(w, code, e)
}

func (s *Server) getEnrollment(w http.ResponseWriter, r *http.Request) {
	e, err := s.cfg.Backend.Enrollment(r.Context(), r.PathValue("name"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	setEtag(w, e.Etag)
	writeJSON(w, http.StatusOK, e)
}

func (s *Server) deleteEnrollment(w http.ResponseWriter, r *http.Request) {
	revoke, err := boolParam(r, "revokeDevices")
	if err != nil {
		s.fail(w, r, err)
		return
	}
	revoked, err := s.cfg.Backend.DeleteEnrollment(r.Context(), r.PathValue("name"), revoke, writeOpts(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if !revoke {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	writeJSON(w, http.StatusOK, EnrollmentDeletion{Name: r.PathValue("name"), RevokedDevices: revoked})
}

func (s *Server) rotateEnrollment(w http.ResponseWriter, r *http.Request) {
	var req RotateEnrollmentRequest
	if !s.decode(w, r, &req) {
		return
	}
	rot, err := s.cfg.Backend.RotateEnrollment(r.Context(), r.PathValue("name"), req, writeOpts(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	setEtag(w, rot.Etag)
	writeJSON(w, http.StatusOK, rot)
}

// boolParam reads an optional true/false query parameter.
func boolParam(r *http.Request, name string) (bool, error) {
	switch v := r.URL.Query().Get(name); v {
	case "", "false", "0":
		return false, nil
	case "true", "1":
		return true, nil
	default:
		return false, fleet.Invalid(name, "must be true or false; got %q", v)
	}
}

func (s *Server) listEnrollments(w http.ResponseWriter, r *http.Request) {
	items, err := s.cfg.Backend.Enrollments(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, EnrollmentPage{Items: items})
}

func (s *Server) deploymentStatus(w http.ResponseWriter, r *http.Request) {
	after, limit, err := pageParams(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	q := StatusQuery{After: after, Limit: limit, Consistent: consistent(r), Category: r.URL.Query().Get("category")}
	if q.Category != "" && !slices.Contains(Categories, q.Category) {
		s.fail(w, r, fleet.Invalid("category", "must be one of %s; got %q", strings.Join(Categories, ", "), q.Category))
		return
	}
	if v := r.URL.Query().Get("soak"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			s.fail(w, r, fleet.Invalid("soak", "must be a duration such as 30s or 5m; got %q", v))
			return
		}
		q.Soak = d
	}
	st, err := s.cfg.Backend.DeploymentStatus(r.Context(), r.PathValue("id"), q)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) history(deployment bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		_, limit, err := pageParams(r)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		page, err := s.cfg.Backend.History(r.Context(), deployment, r.PathValue("id"), limit)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, page)
	}
}

// codeStateConflict is the error code of a request that does not fit the
// resource's current state (fleet.ErrConflict), as opposed to "conflict",
// a create of something that exists.
const codeStateConflict = "state_conflict"

// fail maps an error to its status code and writes the JSON error body.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	code, word, field, msg := s.classify(r, err)
	writeError(w, code, word, msg, field)
}

// classify maps an error to its status code, its code word, the field it
// names and its message (logging what is the server's own failure).
func (s *Server) classify(r *http.Request, err error) (code int, word, field, msg string) {
	var ve *fleet.ValidationError
	if errors.As(err, &ve) {
		field = ve.Field
	}
	code, word = http.StatusInternalServerError, "internal"
	switch {
	case errors.Is(err, fleet.ErrInvalid), errors.Is(err, fleet.ErrImmutable):
		code, word = http.StatusBadRequest, "bad_request"
	case errors.Is(err, fleet.ErrNotFound):
		code, word = http.StatusNotFound, "not_found"
	case errors.Is(err, fleet.ErrExists):
		code, word = http.StatusConflict, "conflict"
	case errors.Is(err, fleet.ErrConflict):
		code, word = http.StatusConflict, codeStateConflict
	case errors.Is(err, fleet.ErrPreconditionFailed):
		code, word = http.StatusPreconditionFailed, "precondition_failed"
	case errors.Is(err, ErrUpgradeRequired):
		code, word = http.StatusServiceUnavailable, "upgrade_required"
	case errors.Is(err, ErrUnavailable):
		code, word = http.StatusServiceUnavailable, "unavailable"
	case errors.Is(err, ErrNotConnected):
		code, word = http.StatusNotFound, "not_connected"
	case errors.Is(err, ErrTimeout):
		code, word = http.StatusGatewayTimeout, "timeout"
	}
	msg = err.Error()
	if ve != nil && !errors.As(err, new(*ImportRefusedError)) {
		msg = ve.Error()
	}
	if code == http.StatusInternalServerError {
		s.cfg.Logger.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	return code, word, field, msg
}

func writeError(w http.ResponseWriter, code int, word, msg, field string) {
	writeJSON(w, code, ErrorBody{Error: ErrorDetail{Code: word, Message: msg, Field: field}})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
