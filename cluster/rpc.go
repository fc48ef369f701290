package cluster

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"appliance/fleet"
	"appliance/internal/ratelog"
	"appliance/internal/routes"
	"appliance/pki"
	"appliance/raftstore"
)

// Store is what the cluster RPCs need from the node's replica.
type Store interface {
	ApplyEncoded(ctx context.Context, entry []byte) (*raftstore.Result, error)
	ReadIndex(ctx context.Context) (uint64, error)
	AddVoter(ctx context.Context, nodeID, addr string) error
	RemoveServer(ctx context.Context, nodeID string) error
	Leader() (addr, id string)
	// Info is what this node runs and can apply (the info RPC).
	Info() raftstore.NodeInfo
	// IsMember tells whether nodeID is in the latest raft configuration.
	IsMember(ctx context.Context, nodeID string) (bool, error)
	// BindNode records the certificate the cluster knows for nodeID
	// (replace: even if it knows another one).
	BindNode(ctx context.Context, nodeID, fingerprint, serial string, replace bool) error
}

// Secrets are what a node hands a joiner that proved it knows the join
// secret: everything a server of this cluster holds.
type Secrets struct {
	Bundle     *pki.Bundle
	JoinToken  string
	AdminToken string
}

// maxRPCBody caps a cluster RPC request (a forwarded raft entry is at most
// an API request body, 4 MiB, plus its envelope).
const maxRPCBody = 8 << 20

// Error codes of the cluster RPCs' JSON error body.
const (
	codeNotLeader      = "not_leader"
	codeUnknownOutcome = "unknown_outcome"
	codeUnauthorized   = "unauthorized"
	codeBadRequest     = "bad_request"
	codeRejected       = "rejected"
	codeInternal       = "internal"
)

type rpcError struct {
	Code   string `json:"code"`
	Error  string `json:"error"`
	Leader string `json:"leader,omitempty"`
	// StoreCode is raftstore.ErrorCode of a store error, so the caller
	// rebuilds the exact class (not found, precondition failed, ...).
	StoreCode string `json:"storeCode,omitempty"`
}

// JoinRequest is what a joiner sends after it has checked the server's CA.
type JoinRequest struct {
	NodeID string   `json:"nodeId"`
	Hosts  []string `json:"hosts"`
	Secret string   `json:"secret"`
}

// JoinResponse carries a joiner's credentials.
type JoinResponse struct {
	CACert     string `json:"caCert"`
	CAKey      string `json:"caKey"`
	NodeCert   string `json:"nodeCert"`
	NodeKey    string `json:"nodeKey"`
	JoinToken  string `json:"joinToken"`
	AdminToken string `json:"adminToken"`
}

type memberRequest struct {
	Address string `json:"address"`
	// Secret is the join token's secret: a node that is not a member yet
	// must know the current one to become a voter (the certificate alone
	// proves only that the CA issued it, and every server holds the CA's
	// key, a removed one included).
	Secret string `json:"secret,omitempty"`
}

type readIndexResponse struct {
	Index uint64 `json:"index"`
}

// Server serves the cluster RPCs on the mux's HTTP side.
type Server struct {
	mux     *routes.Mux
	store   Store
	secrets func() Secrets
	logger  *slog.Logger
	srv     *http.Server
	now     func() time.Time
	// refusedLog rate-limits the line about joins with a wrong secret:
	// anyone who reaches the port can send them.
	refusedLog ratelog.Limiter
	// guard is the mux's (set by Serve): it judges callers' certificates.
	guard *guard
}

// NewServer builds the RPC server. secrets is called per join, so a node
// that rotates a secret need not restart the server.
func NewServer(store Store, secrets func() Secrets, logger *slog.Logger) *Server {
	if logger == nil {
		logger = slog.Default()
	}
	s := &Server{store: store, secrets: secrets, logger: logger.With("component", "cluster"), now: time.Now,
		refusedLog: ratelog.Limiter{Burst: strangerLogBurst}}
	mux := routes.New()
	s.mux = mux
	mux.HandleFunc("POST /cluster/v1/join", s.join)
	mux.HandleFunc("POST /cluster/v1/members", s.nodeOnlyFor(UseAddSelf, s.addMember))
	mux.HandleFunc("DELETE /cluster/v1/members/{id}", s.nodeOnly(s.removeMember))
	mux.HandleFunc("POST /cluster/v1/apply", s.nodeOnly(s.apply))
	mux.HandleFunc("POST /cluster/v1/read-index", s.nodeOnly(s.readIndex))
	mux.HandleFunc("GET "+InfoPath, s.nodeOnly(s.info))
	s.srv = &http.Server{
		Handler: mux, ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: slog.NewLogLogger(s.logger.Handler(), slog.LevelDebug),
		// net/http fills Request.TLS only for a bare *tls.Conn; the mux
		// hands over a wrapper (it has read the first byte), so the
		// peer's certificate travels in the context instead.
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if gc, ok := c.(*guardedConn); ok {
				c = gc.Conn
			}
			if pc, ok := c.(*peekedConn); ok {
				if tc, ok := pc.Conn.(*tls.Conn); ok {
					return context.WithValue(ctx, tlsStateKey{}, tc.ConnectionState())
				}
			}
			return ctx
		},
	}
	return s
}

type tlsStateKey struct{}

// HandleNode adds a route for nodes only (callers with a node
// certificate of this cluster), for the node's own peer queries. Call it
// before Serve.
func (s *Server) HandleNode(pattern string, h http.HandlerFunc) {
	s.mux.HandleFunc(pattern, s.nodeOnly(h))
}

// Routes lists the pattern of every RPC served, HandleNode's included:
// tests walk them all.
func (s *Server) Routes() []string { return s.mux.Patterns() }

// Route is the pattern a request would be served by ("" for none).
func (s *Server) Route(r *http.Request) string { return s.mux.Pattern(r) }

// Serve serves the mux's HTTP connections until Shutdown, within the
// mux's limits: a request's header must arrive within its handshake
// timeout, the whole request within its read timeout, and a kept-alive
// connection is closed after its idle timeout.
func (s *Server) Serve(m *Mux) error {
	lim := m.Limits()
	s.srv.ReadHeaderTimeout = lim.HandshakeTimeout
	s.srv.ReadTimeout = lim.ReadTimeout
	s.srv.IdleTimeout = lim.IdleTimeout
	s.guard = &m.guard
	err := s.srv.Serve(m.HTTPListener())
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Shutdown stops the server, letting calls under way finish until ctx ends.
func (s *Server) Shutdown(ctx context.Context) error { return s.srv.Shutdown(ctx) }

type peerKey struct{}

// nodeOnly admits only callers with a node certificate of this cluster
// that the Authorizer accepts for a node-only RPC (not revoked, the one
// bound to its node, a member's).
func (s *Server) nodeOnly(h http.HandlerFunc) http.HandlerFunc { return s.nodeOnlyFor(UseRPC, h) }

func (s *Server) nodeOnlyFor(use Use, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		cs, ok := r.Context().Value(tlsStateKey{}).(tls.ConnectionState)
		if !ok {
			writeRPCError(w, http.StatusUnauthorized, codeUnauthorized, "a node certificate of this cluster is required", "")
			return
		}
		peer, ok := pki.PeerCertID(cs)
		if !ok {
			writeRPCError(w, http.StatusUnauthorized, codeUnauthorized, "a node certificate of this cluster is required", "")
			return
		}
		if s.guard != nil {
			if err := s.guard.authorize(peer, use); err != nil {
				s.logger.Warn("refused a cluster RPC", "peer", peer.NodeID, "path", r.URL.Path, "remote", r.RemoteAddr, "err", err)
				writeRPCError(w, http.StatusUnauthorized, codeUnauthorized, err.Error(), "")
				return
			}
		}
		h(w, r.WithContext(context.WithValue(r.Context(), peerKey{}, peer)))
	}
}

func peerOf(r *http.Request) string { return peerCertOf(r).NodeID }

func peerCertOf(r *http.Request) pki.CertID {
	p, _ := r.Context().Value(peerKey{}).(pki.CertID)
	return p
}

func (s *Server) join(w http.ResponseWriter, r *http.Request) {
	var req JoinRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil {
		writeRPCError(w, http.StatusBadRequest, codeBadRequest, "join request: "+err.Error(), "")
		return
	}
	sec := s.secrets()
	_, want, err := pki.ParseJoinToken(sec.JoinToken)
	if err != nil || !pki.SecretEqual(req.Secret, want) {
		if n, ok := s.refusedLog.Allow(); ok {
			s.logger.Warn("refused a join with a wrong secret", "node_id", req.NodeID, "remote", r.RemoteAddr, "suppressed", n)
		}
		writeRPCError(w, http.StatusUnauthorized, codeUnauthorized, "wrong join token secret", "")
		return
	}
	certPEM, keyPEM, err := sec.Bundle.CA.IssueNode(req.NodeID, req.Hosts, s.now())
	if err != nil {
		writeRPCError(w, http.StatusBadRequest, codeBadRequest, err.Error(), "")
		return
	}
	caKey, err := sec.Bundle.CA.KeyPEM()
	if err != nil {
		writeRPCError(w, http.StatusInternalServerError, codeInternal, "this node cannot issue certificates: "+err.Error(), "")
		return
	}
	s.logger.Info("issued a node certificate to a joiner", "node_id", req.NodeID, "remote", r.RemoteAddr)
	writeJSON(w, http.StatusOK, JoinResponse{
		CACert: string(sec.Bundle.CA.CertPEM()), CAKey: string(caKey),
		NodeCert: string(certPEM), NodeKey: string(keyPEM),
		JoinToken: sec.JoinToken, AdminToken: sec.AdminToken,
	})
}

func (s *Server) addMember(w http.ResponseWriter, r *http.Request) {
	var req memberRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil || req.Address == "" {
		writeRPCError(w, http.StatusBadRequest, codeBadRequest, "member request: an address is required", "")
		return
	}
	peer := peerCertOf(r)
	id := peer.NodeID
	member, err := s.store.IsMember(r.Context(), id)
	if err != nil {
		s.writeStoreError(w, err)
		return
	}
	if !member {
		// A joiner: it proves it knows the current join secret, as it did
		// to get its certificate, and the cluster binds that certificate
		// to it before it becomes a voter.
		_, want, err := pki.ParseJoinToken(s.secrets().JoinToken)
		if err != nil || !pki.SecretEqual(req.Secret, want) {
			s.logger.Warn("refused to make a node a voter: wrong join token secret", "node_id", id, "remote", r.RemoteAddr)
			writeRPCError(w, http.StatusUnauthorized, codeUnauthorized, "wrong join token secret: a node that is not a member must know the cluster's current join token to become a voter", "")
			return
		}
	}
	// A member binds only a certificate the cluster knows none for (one
	// of a release before bindings); a joiner's replaces any.
	switch err := s.store.BindNode(r.Context(), id, peer.Fingerprint, peer.Serial, !member); {
	case errors.Is(err, raftstore.ErrClusterBehind):
		s.logger.Warn("node certificate not bound: a member runs a release without bindings; it is bound once every member is upgraded", "node_id", id, "err", err)
	case errors.Is(err, fleet.ErrExists):
		// Bound to another certificate: the Authorizer has judged it.
	case err != nil:
		s.writeStoreError(w, err)
		return
	}
	if err := s.store.AddVoter(r.Context(), id, req.Address); err != nil {
		s.writeStoreError(w, err)
		return
	}
	s.logger.Info("node is a voter", "node_id", id, "address", req.Address)
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) removeMember(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := s.store.RemoveServer(r.Context(), id); err != nil {
		s.writeStoreError(w, err)
		return
	}
	s.logger.Info("node removed from the cluster", "node_id", id, "by", peerOf(r))
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) apply(w http.ResponseWriter, r *http.Request) {
	entry, err := io.ReadAll(io.LimitReader(r.Body, maxRPCBody))
	if err != nil {
		writeRPCError(w, http.StatusBadRequest, codeBadRequest, "read forwarded entry: "+err.Error(), "")
		return
	}
	res, err := s.store.ApplyEncoded(r.Context(), entry)
	if res == nil && err != nil {
		s.writeStoreError(w, err)
		return
	}
	body, merr := raftstore.MarshalResult(res)
	if merr != nil {
		writeRPCError(w, http.StatusInternalServerError, codeUnknownOutcome, "encode result: "+merr.Error(), "")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	w.Write(body)
}

func (s *Server) readIndex(w http.ResponseWriter, r *http.Request) {
	idx, err := s.store.ReadIndex(r.Context())
	if err != nil {
		s.writeStoreError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, readIndexResponse{Index: idx})
}

// InfoPath is the info RPC: what the node runs and can apply
// (raftstore.NodeInfo). A node of raftstore.LegacyRelease, which predates
// it, answers 404.
const InfoPath = "/cluster/v1/info"

func (s *Server) info(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.store.Info())
}

func (s *Server) writeStoreError(w http.ResponseWriter, err error) {
	leader, _ := s.store.Leader()
	e := rpcError{Error: err.Error(), Leader: leader, StoreCode: raftstore.ErrorCode(err)}
	status := http.StatusServiceUnavailable
	switch {
	case errors.Is(err, raftstore.ErrNotLeader):
		status, e.Code = http.StatusMisdirectedRequest, codeNotLeader
	case errors.Is(err, raftstore.ErrClusterBehind):
		status, e.Code = http.StatusConflict, codeRejected
	case errors.Is(err, fleet.ErrNotFound), errors.Is(err, fleet.ErrInvalid), errors.Is(err, fleet.ErrExists),
		errors.Is(err, fleet.ErrPreconditionFailed), errors.Is(err, fleet.ErrImmutable):
		status, e.Code = http.StatusBadRequest, codeRejected
	default:
		e.Code = codeUnknownOutcome
	}
	writeJSON(w, status, e)
}

func writeRPCError(w http.ResponseWriter, status int, code, msg, leader string) {
	writeJSON(w, status, rpcError{Code: code, Error: msg, Leader: leader})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if err := json.NewEncoder(w).Encode(v); err != nil {
		return
	}
}

// decodeRPCError turns a non-2xx answer into an error of the right class.
func decodeRPCError(op string, resp *http.Response) error {
	var e rpcError
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err := json.Unmarshal(body, &e); err != nil || e.Code == "" {
		return fmt.Errorf("%s: HTTP %d: %s: %w", op, resp.StatusCode, string(body), raftstore.ErrUnknownOutcome)
	}
	switch {
	case e.Code == codeNotLeader:
		return &notLeaderError{op: op, leader: e.Leader}
	case e.StoreCode != "":
		return fmt.Errorf("%s: %w", op, raftstore.ErrorFromCode(e.StoreCode, e.Error))
	}
	switch e.Code {
	case codeUnauthorized:
		return fmt.Errorf("%s: %s: %w", op, e.Error, ErrRefused)
	case codeBadRequest, codeRejected:
		return fmt.Errorf("%s: %s: %w", op, e.Error, fleet.ErrInvalid)
	}
	return fmt.Errorf("%s: %s: %w", op, e.Error, raftstore.ErrUnknownOutcome)
}

// notLeaderError says the peer is not the leader, and which node it
// believes is.
type notLeaderError struct{ op, leader string }

func (e *notLeaderError) Error() string {
	if e.leader != "" {
		return fmt.Sprintf("%s: not the leader (the leader is at %s)", e.op, e.leader)
	}
	return fmt.Sprintf("%s: not the leader, and no leader is known", e.op)
}

func (e *notLeaderError) Unwrap() error { return raftstore.ErrNotLeader }
