package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strings"
	"time"

	"appliance/pki"
	"appliance/raftstore"
)

// ErrRefused marks a join that retrying cannot help: a malformed or wrong
// token, a server of another cluster, a request the cluster refuses.
var ErrRefused = errors.New("join refused")

// Client calls other nodes' cluster RPCs with this node's certificate.
type Client struct {
	http *http.Client
}

// NewClient builds a client that dials through the mux (mutual TLS, from
// the node's own address).
func NewClient(m *Mux) *Client {
	tr := &http.Transport{
		DialTLSContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			timeout := 5 * time.Second
			if dl, ok := ctx.Deadline(); ok && time.Until(dl) < timeout {
				timeout = time.Until(dl)
			}
			return m.dial(addr, timeout)
		},
		MaxIdleConnsPerHost: 8,
		// Before the peer's server closes it (Limits.IdleTimeout): a
		// request never goes out on a connection being closed under it.
		IdleConnTimeout:   m.Limits().IdleTimeout / 2,
		ForceAttemptHTTP2: false,
	}
	return &Client{http: &http.Client{Transport: tr}}
}

// Close drops idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// do sends one RPC. sent reports whether any of the request left this
// node: before that, a failure is certain to have changed nothing.
func (c *Client) do(ctx context.Context, method, addr, path string, body []byte) (resp *http.Response, sent bool, err error) {
	trace := &httptrace.ClientTrace{WroteHeaders: func() { sent = true }}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), method, "https://"+addr+path, bytes.NewReader(body))
	if err != nil {
		return nil, false, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err = c.http.Do(req)
	return resp, sent, err
}

// Apply forwards an encoded raft entry to the leader at addr. A failure
// before the request left is ErrNotLeader (retry elsewhere is safe); after
// it, ErrUnknownOutcome.
func (c *Client) Apply(ctx context.Context, addr string, entry []byte) (*raftstore.Result, error) {
	resp, sent, err := c.do(ctx, http.MethodPost, addr, "/cluster/v1/apply", entry)
	if err != nil {
		if !sent {
			return nil, fmt.Errorf("forward write to the leader at %s: %v: %w", addr, err, raftstore.ErrNotLeader)
		}
		return nil, fmt.Errorf("forward write to the leader at %s: %v: %w", addr, err, raftstore.ErrUnknownOutcome)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, decodeRPCError("forward write to "+addr, resp)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxRPCBody))
	if err != nil {
		return nil, fmt.Errorf("forward write to the leader at %s: read result: %v: %w", addr, err, raftstore.ErrUnknownOutcome)
	}
	res, err := raftstore.UnmarshalResult(body)
	if err != nil {
		return nil, fmt.Errorf("forward write to the leader at %s: %v: %w", addr, err, raftstore.ErrUnknownOutcome)
	}
	if res.Err != nil {
		return res, res.Err
	}
	return res, nil
}

// ReadIndex asks the leader at addr for the index a linearizable read must
// wait for.
func (c *Client) ReadIndex(ctx context.Context, addr string) (uint64, error) {
	resp, _, err := c.do(ctx, http.MethodPost, addr, "/cluster/v1/read-index", nil)
	if err != nil {
		return 0, fmt.Errorf("read index from the leader at %s: %v: %w", addr, err, raftstore.ErrNotLeader)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, decodeRPCError("read index from "+addr, resp)
	}
	var out readIndexResponse
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return 0, fmt.Errorf("read index from %s: %w", addr, err)
	}
	return out.Index, nil
}

// NodeInfo asks the node at addr what it runs and can apply. A node that
// answers 404 serves no info RPC (it runs raftstore.LegacyRelease): the
// error wraps raftstore.ErrNoNodeInfo. Any other failure means the node
// did not say.
func (c *Client) NodeInfo(ctx context.Context, addr string) (raftstore.NodeInfo, error) {
	resp, _, err := c.do(ctx, http.MethodGet, addr, InfoPath, nil)
	if err != nil {
		return raftstore.NodeInfo{}, fmt.Errorf("ask %s what it runs: %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return raftstore.NodeInfo{}, fmt.Errorf("ask %s what it runs: HTTP 404: %w", addr, raftstore.ErrNoNodeInfo)
	}
	if resp.StatusCode != http.StatusOK {
		return raftstore.NodeInfo{}, decodeRPCError("ask "+addr+" what it runs", resp)
	}
	var info raftstore.NodeInfo
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&info); err != nil {
		return raftstore.NodeInfo{}, fmt.Errorf("ask %s what it runs: %w", addr, err)
	}
	return info, nil
}

// GetJSON reads a node-only route of the peer at addr into out.
func (c *Client) GetJSON(ctx context.Context, addr, path string, out any) error {
	resp, _, err := c.do(ctx, http.MethodGet, addr, path, nil)
	if err != nil {
		return fmt.Errorf("GET %s from %s: %w", path, addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return decodeRPCError("GET "+path+" from "+addr, resp)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxRPCBody)).Decode(out); err != nil {
		return fmt.Errorf("GET %s from %s: %w", path, addr, err)
	}
	return nil
}

// PostJSON sends in as JSON to a node-only route of the peer at addr and
// reads the answer into out. The call may take as long as ctx allows (the
// cluster port bounds reading a request, not answering it).
func (c *Client) PostJSON(ctx context.Context, addr, path string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return fmt.Errorf("POST %s to %s: %w", path, addr, err)
	}
	resp, _, err := c.do(ctx, http.MethodPost, addr, path, body)
	if err != nil {
		return fmt.Errorf("POST %s to %s: %w", path, addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return decodeRPCError("POST "+path+" to "+addr, resp)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxRPCBody)).Decode(out); err != nil {
		return fmt.Errorf("POST %s to %s: %w", path, addr, err)
	}
	return nil
}

// Stream opens a node-only route of the peer at addr whose answer is a
// stream (it ends with ctx); the caller reads and closes it.
func (c *Client) Stream(ctx context.Context, addr, path string) (io.ReadCloser, error) {
	resp, _, err := c.do(ctx, http.MethodGet, addr, path, nil)
	if err != nil {
		return nil, fmt.Errorf("GET %s from %s: %w", path, addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		return nil, decodeRPCError("GET "+path+" from "+addr, resp)
	}
	return resp.Body, nil
}

// AddSelf asks the node at addr to make this node (named by its
// certificate) a voter reachable at advertise. A node that is not a member
// yet must give the cluster's current join token (its secret is sent). A
// follower answers with the leader's address, which is tried next.
func (c *Client) AddSelf(ctx context.Context, addr, advertise, joinToken string) error {
	_, secret, _ := pki.ParseJoinToken(joinToken)
	body, _ := json.Marshal(memberRequest{Address: advertise, Secret: secret})
	return c.onLeader(ctx, addr, "add this node as a voter", func(a string) (*http.Response, error) {
		resp, _, err := c.do(ctx, http.MethodPost, a, "/cluster/v1/members", body)
		return resp, err
	})
}

// RemoveMember asks the leader (found from addr) to remove a node.
func (c *Client) RemoveMember(ctx context.Context, addr, nodeID string) error {
	return c.onLeader(ctx, addr, "remove node "+nodeID, func(a string) (*http.Response, error) {
		resp, _, err := c.do(ctx, http.MethodDelete, a, "/cluster/v1/members/"+url.PathEscape(nodeID), nil)
		return resp, err
	})
}

// onLeader runs a membership call, following not-leader answers (at most
// a few hops: leadership may move while we follow it).
func (c *Client) onLeader(ctx context.Context, addr, op string, call func(addr string) (*http.Response, error)) error {
	for hop := 0; hop < 4; hop++ {
		resp, err := call(addr)
		if err != nil {
			return fmt.Errorf("%s via %s: %w", op, addr, err)
		}
		if resp.StatusCode/100 == 2 {
			resp.Body.Close()
			return nil
		}
		err = decodeRPCError(op+" via "+addr, resp)
		resp.Body.Close()
		var nl *notLeaderError
		if errors.As(err, &nl) && nl.leader != "" && nl.leader != addr {
			addr = nl.leader
			continue
		}
		return err
	}
	return fmt.Errorf("%s: leadership kept moving: %w", op, raftstore.ErrNotLeader)
}

// Join presents the join token's secret to the node at joinURL, after
// checking that node's CA against the token's fingerprint, and returns this
// node's credentials. Nothing is sent before the CA matches.
func Join(ctx context.Context, joinURL, token, nodeID string, hosts []string) (*JoinResponse, error) {
	fp, secret, err := pki.ParseJoinToken(token)
	if err != nil {
		return nil, fmt.Errorf("flag --join-token: %v: %w", err, ErrRefused)
	}
	addr, err := JoinAddress(joinURL)
	if err != nil {
		return nil, err
	}
	// Remember a failed CA check: it is final, unlike a node not up yet.
	tlsConf := pki.PinnedClientTLS(fp)
	var pinErr error
	if verify := tlsConf.VerifyConnection; verify != nil {
		tlsConf.VerifyConnection = func(cs tls.ConnectionState) error {
			err := verify(cs)
			if err != nil {
				pinErr = err
			}
			return err
		}
	}
	tr := &http.Transport{TLSClientConfig: tlsConf, TLSHandshakeTimeout: 10 * time.Second}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	body, _ := json.Marshal(JoinRequest{NodeID: nodeID, Hosts: hosts, Secret: secret})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+addr+"/cluster/v1/join", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		if pinErr != nil {
			return nil, fmt.Errorf("join the cluster at %s: %v: %w", joinURL, pinErr, ErrRefused)
		}
		return nil, fmt.Errorf("join the cluster at %s: %w", joinURL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		err := decodeRPCError("join the cluster at "+joinURL, resp)
		if resp.StatusCode == http.StatusBadRequest {
			// The cluster refused the request itself (a node id or host
			// no certificate can carry): asking again cannot help.
			return nil, fmt.Errorf("%w: %w", err, ErrRefused)
		}
		return nil, err
	}
	var out JoinResponse
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&out); err != nil {
		return nil, fmt.Errorf("join the cluster at %s: decode credentials: %w", joinURL, err)
	}
	return &out, nil
}

// JoinAddress is the host:port of a --join URL; it accepts
// https://host:port and host:port.
func JoinAddress(joinURL string) (string, error) {
	s := strings.TrimSpace(joinURL)
	if strings.Contains(s, "://") {
		u, err := url.Parse(s)
		if err != nil || u.Host == "" {
			return "", fmt.Errorf("flag --join: %q is not a URL like https://node1:7481: %w", joinURL, ErrRefused)
		}
		if u.Scheme != "https" {
			return "", fmt.Errorf("flag --join: %q: the cluster port speaks https only: %w", joinURL, ErrRefused)
		}
		s = u.Host
	}
	if _, port, err := net.SplitHostPort(s); err != nil || port == "" {
		return "", fmt.Errorf("flag --join: %q needs a host and the node's raft port, like https://node1:7481: %w", joinURL, ErrRefused)
	}
	return s, nil
}
