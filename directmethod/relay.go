package directmethod

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"appliance/api"
	"appliance/broker"
	"appliance/fleet"
	"appliance/history"
	"appliance/raftstore"
)

// Paths of the cluster port's RPCs (node certificates only).
const (
	// CallPath takes a call for a device whose session is on this node.
	CallPath = "/cluster/v1/methods"
	// EventPath takes a device's history event a peer recorded.
	EventPath = "/cluster/v1/history"
)

// Broker is this node's broker as the calls see it.
type Broker interface {
	// Connected says whether the device holds a session here.
	Connected(deviceID string) bool
	// PublishMethod writes a request on the device's session
	// (broker.ErrNotConnected, broker.ErrMethodsNotSubscribed).
	PublishMethod(deviceID string, payload []byte) error
}

// Cluster is the other members as the calls see them.
type Cluster interface {
	// SessionNode names the member holding the device's session, when
	// another one does.
	SessionNode(ctx context.Context, deviceID string) (node string, ok bool)
	// Members lists the cluster's members and their cluster-port
	// addresses.
	Members(ctx context.Context) ([]raftstore.Member, error)
	// PostJSON posts in to a member's cluster port and decodes its answer
	// into out.
	PostJSON(ctx context.Context, addr, path string, in, out any) error
}

// Config is what a Relay works with.
type Config struct {
	// NodeID is this node's id (errors name it; events are not passed to
	// it).
	NodeID  string
	Broker  Broker
	Cluster Cluster
	// Lookup says whether the device exists (fleet.ErrNotFound when it
	// does not), before a call is sent.
	Lookup func(ctx context.Context, deviceID string) error
	// History records a device's events; AppliedIndex is the raft index
	// this node applied, which places an event among the device's others.
	History      interface{ Add(items ...history.Item) }
	AppliedIndex func() uint64
	// Actor is who an event recorded for the operator's call names.
	Actor string
	// Stopping ends when the node stops: events still being passed to the
	// other members give up.
	Stopping context.Context
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Relay sends direct method calls and waits for their answers.
type Relay struct {
	cfg     Config
	mu      sync.Mutex
	pending map[callKey]chan fleet.MethodResponse // the calls this node sent and waits on
}

type callKey struct{ device, id string }

var _ broker.MethodSink = (*Relay)(nil)

// New returns a Relay.
func New(cfg Config) *Relay {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Stopping == nil {
		cfg.Stopping = context.Background()
	}
	return &Relay{cfg: cfg, pending: map[callKey]chan fleet.MethodResponse{}}
}

// MethodResponse takes a device's answer from the broker.
func (m *Relay) MethodResponse(deviceID string, payload []byte) {
	var resp fleet.MethodResponse
	if err := json.Unmarshal(payload, &resp); err != nil || resp.ID == "" {
		m.cfg.Logger.Warn("a device's method response does not decode; dropped", "device", deviceID, "bytes", len(payload))
		return
	}
	m.mu.Lock()
	ch := m.pending[callKey{deviceID, resp.ID}]
	m.mu.Unlock()
	if ch == nil {
		m.cfg.Logger.Debug("method response for no call in flight (answered too late?)", "device", deviceID, "id", resp.ID)
		return
	}
	select {
	case ch <- resp:
	default: // answered twice
	}
}

// Invoke calls a module's direct method on whichever node holds the
// device's session (api.HubBackend's InvokeMethod).
func (m *Relay) Invoke(ctx context.Context, deviceID, moduleID, method string, req api.MethodRequest) (api.MethodResult, error) {
	if method == "" || moduleID == "" {
		return api.MethodResult{}, fleet.Invalid("method", "a module and a method name are required")
	}
	if err := req.Validate(); err != nil {
		return api.MethodResult{}, err
	}
	if err := m.cfg.Lookup(ctx, deviceID); err != nil {
		return api.MethodResult{}, err
	}
	res, err := m.invokeAnywhere(ctx, deviceID, moduleID, method, req)
	if err == nil && res.Status == http.StatusOK && moduleID == fleet.EdgeAgentModule && strings.EqualFold(method, fleet.MethodRestartModule) {
		m.recordModuleRestart(deviceID, req.Payload)
	}
	return res, err
}

// invokeAnywhere calls the method here if the device's session is here,
// else on the node that holds it.
func (m *Relay) invokeAnywhere(ctx context.Context, deviceID, moduleID, method string, req api.MethodRequest) (api.MethodResult, error) {
	if m.cfg.Broker.Connected(deviceID) {
		return m.invokeLocal(ctx, deviceID, moduleID, method, req)
	}
	node, ok := m.cfg.Cluster.SessionNode(ctx, deviceID)
	if !ok {
		return api.MethodResult{}, fmt.Errorf("%w: device %s is not connected to any node of the cluster", api.ErrNotConnected, deviceID)
	}
	addr, err := m.memberAddress(ctx, node)
	if err != nil {
		return api.MethodResult{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, req.Wait()+5*time.Second)
	defer cancel()
	var reply callReply
	if err := m.cfg.Cluster.PostJSON(ctx, addr, CallPath, call{Device: deviceID, Module: moduleID, Method: method, Request: req}, &reply); err != nil {
		return api.MethodResult{}, fmt.Errorf("%w: the call could not be passed to node %s, which holds device %s's session: %v", api.ErrUnavailable, node, deviceID, err)
	}
	return reply.result()
}

// memberAddress is a member's cluster-port address.
func (m *Relay) memberAddress(ctx context.Context, id string) (string, error) {
	members, err := m.cfg.Cluster.Members(ctx)
	if err != nil {
		return "", fmt.Errorf("%w: %v", api.ErrUnavailable, err)
	}
	for _, mb := range members {
		if mb.ID == id {
			return mb.Address, nil
		}
	}
	return "", fmt.Errorf("%w: node %s is not a member of the cluster", api.ErrUnavailable, id)
}

// call is a call passed to the node holding the device's session.
type call struct {
	Device  string            `json:"device"`
	Module  string            `json:"module"`
	Method  string            `json:"method"`
	Request api.MethodRequest `json:"request"`
}

// callReply is its answer: the module's, or why there is none.
type callReply struct {
	Result *api.MethodResult `json:"result,omitempty"`
	Code   string            `json:"code,omitempty"` // not_connected, timeout, bad_request, unavailable
	Error  string            `json:"error,omitempty"`
}

func (r callReply) result() (api.MethodResult, error) {
	if r.Result != nil {
		return *r.Result, nil
	}
	switch r.Code {
	case "not_connected":
		return api.MethodResult{}, fmt.Errorf("%w: %s", api.ErrNotConnected, r.Error)
	case "timeout":
		return api.MethodResult{}, fmt.Errorf("%w: %s", api.ErrTimeout, r.Error)
	case "bad_request":
		return api.MethodResult{}, fleet.Invalid("payload", "%s", r.Error)
	}
	return api.MethodResult{}, fmt.Errorf("%w: %s", api.ErrUnavailable, r.Error)
}

func replyOf(res api.MethodResult, err error) callReply {
	switch {
	case err == nil:
		return callReply{Result: &res}
	case errors.Is(err, api.ErrNotConnected):
		return callReply{Code: "not_connected", Error: err.Error()}
	case errors.Is(err, api.ErrTimeout):
		return callReply{Code: "timeout", Error: err.Error()}
	case errors.Is(err, fleet.ErrInvalid):
		return callReply{Code: "bad_request", Error: err.Error()}
	}
	return callReply{Code: "unavailable", Error: err.Error()}
}

// ServeCall runs a call a peer passed on (CallPath), for a device
// connected here.
func (m *Relay) ServeCall(w http.ResponseWriter, r *http.Request) {
	var c call
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&c); err != nil {
		http.Error(w, `{"code":"bad_request","error":"malformed method call"}`, http.StatusBadRequest)
		return
	}
	ctl := http.NewResponseController(w)
	_ = ctl.SetReadDeadline(time.Now().Add(c.Request.Wait() + 10*time.Second))
	var res api.MethodResult
	err := c.Request.Validate()
	if err == nil {
		res, err = m.invokeLocal(r.Context(), c.Device, c.Module, c.Method, c.Request)
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(replyOf(res, err))
}

// invokeLocal sends the request on the device's session here and waits
// for the answer.
func (m *Relay) invokeLocal(ctx context.Context, deviceID, moduleID, method string, req api.MethodRequest) (api.MethodResult, error) {
	id := newCallID()
	payload, err := json.Marshal(fleet.MethodRequest{ID: id, Module: moduleID, Method: method, Payload: req.Payload,
		ResponseTimeoutSeconds: req.ResponseTimeoutSeconds, ConnectTimeoutSeconds: req.ConnectTimeoutSeconds})
	if err != nil {
		return api.MethodResult{}, err
	}
	ch := make(chan fleet.MethodResponse, 1)
	key := callKey{deviceID, id}
	m.mu.Lock()
	m.pending[key] = ch
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.pending, key)
		m.mu.Unlock()
	}()
	switch err := m.cfg.Broker.PublishMethod(deviceID, payload); {
	case errors.Is(err, broker.ErrNotConnected):
		return api.MethodResult{}, fmt.Errorf("%w: device %s is not connected to any node of the cluster (it left node %s just now)", api.ErrNotConnected, deviceID, m.cfg.NodeID)
	case errors.Is(err, broker.ErrMethodsNotSubscribed):
		return api.MethodResult{}, fmt.Errorf("%w: device %s is connected but takes no direct methods (its agent is of a release without them, or has not subscribed yet)", api.ErrNotConnected, deviceID)
	case err != nil:
		return api.MethodResult{}, fmt.Errorf("%w: direct method for device %s not sent: %v", api.ErrUnavailable, deviceID, err)
	}
	wait := time.NewTimer(req.Wait())
	defer wait.Stop()
	select {
	case resp := <-ch:
		return methodResult(deviceID, moduleID, method, req, resp)
	case <-wait.C:
		return api.MethodResult{}, fmt.Errorf("%w: device %s did not answer the call of %s on module %s within %s", api.ErrTimeout, deviceID, method, moduleID, req.Wait())
	case <-ctx.Done():
		return api.MethodResult{}, fmt.Errorf("%w: the caller gave up: %v", api.ErrTimeout, ctx.Err())
	}
}

// methodResult turns the hub's answer into the call's outcome: the
// module's status and payload, or, when the hub answered for the module
// (Error set), the error Azure gives for it.
func methodResult(deviceID, moduleID, method string, req api.MethodRequest, resp fleet.MethodResponse) (api.MethodResult, error) {
	if resp.Error == "" {
		return api.MethodResult{Status: resp.Status, Payload: resp.Payload}, nil
	}
	switch resp.Status {
	case fleet.MethodStatusNotConnected:
		return api.MethodResult{}, fmt.Errorf("%w: module %s of device %s is not connected to its device hub, or has not subscribed to methods: %s", api.ErrNotConnected, moduleID, deviceID, resp.Error)
	case fleet.MethodStatusTimeout:
		timeout := time.Duration(req.ResponseTimeoutSeconds) * time.Second
		if timeout == 0 {
			timeout = api.DefaultMethodTimeout
		}
		return api.MethodResult{}, fmt.Errorf("%w: module %s of device %s did not answer %s within %s: %s", api.ErrTimeout, moduleID, deviceID, method, timeout, resp.Error)
	case fleet.MethodStatusBadRequest:
		return api.MethodResult{}, fleet.Invalid("payload", "the device hub refused the call: %s", resp.Error)
	}
	return api.MethodResult{}, fmt.Errorf("%w: device %s: %d %s", api.ErrUnavailable, deviceID, resp.Status, resp.Error)
}

func newCallID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
