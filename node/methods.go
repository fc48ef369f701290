package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
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

// Direct methods: the operator API on any node -> the node holding the
// device's session (asked over the cluster port, methodsPath) -> the
// device's session (broker.PublishMethod) -> the device hub -> the module;
// the answer comes back the same way (broker.MethodSink). Nothing goes
// through raft.

const methodsPath = "/cluster/v1/methods"

// methodCalls are the calls this node sent to its devices and waits on,
// by device and request id.
type methodCalls struct {
	mu      sync.Mutex
	pending map[methodKey]chan fleet.MethodResponse
}

type methodKey struct{ device, id string }

var _ broker.MethodSink = (*methodSink)(nil)

// methodSink takes the devices' method responses from the broker.
type methodSink Node

func (s *methodSink) MethodResponse(deviceID string, payload []byte) {
	n := (*Node)(s)
	var resp fleet.MethodResponse
	if err := json.Unmarshal(payload, &resp); err != nil || resp.ID == "" {
		n.logger.Warn("a device's method response does not decode; dropped", "device", deviceID, "bytes", len(payload))
		return
	}
	mc := &n.methods
	mc.mu.Lock()
	ch := mc.pending[methodKey{deviceID, resp.ID}]
	mc.mu.Unlock()
	if ch == nil {
		n.logger.Debug("method response for no call in flight (answered too late?)", "device", deviceID, "id", resp.ID)
		return
	}
	select {
	case ch <- resp:
	default: // answered twice
	}
}

// InvokeMethod calls a module's direct method on whichever node holds the
// device's session.
func (b *backend) InvokeMethod(ctx context.Context, deviceID, moduleID, method string, req api.MethodRequest) (api.MethodResult, error) {
	n := b.node()
	if method == "" || moduleID == "" {
		return api.MethodResult{}, fleet.Invalid("method", "a module and a method name are required")
	}
	if err := req.Validate(); err != nil {
		return api.MethodResult{}, err
	}
	if err := b.viewBeforeWrite(ctx, func(r *raftstore.Reader) error {
		_, err := r.Device(deviceID)
		return err
	}); err != nil {
		return api.MethodResult{}, err
	}
	res, err := b.invokeAnywhere(ctx, deviceID, moduleID, method, req)
	if err == nil && res.Status == http.StatusOK && moduleID == fleet.EdgeAgentModule && strings.EqualFold(method, fleet.MethodRestartModule) {
		n.recordModuleRestart(deviceID, req.Payload)
	}
	return res, err
}

// invokeAnywhere calls the method here if the device's session is here,
// else on the node that holds it.
func (b *backend) invokeAnywhere(ctx context.Context, deviceID, moduleID, method string, req api.MethodRequest) (api.MethodResult, error) {
	n := b.node()
	if _, ok := n.broker.Connection(deviceID); ok {
		return n.invokeLocal(ctx, deviceID, moduleID, method, req)
	}
	s, ok := n.peerSessions(ctx)[deviceID]
	if !ok {
		return api.MethodResult{}, fmt.Errorf("%w: device %s is not connected to any node of the cluster", api.ErrNotConnected, deviceID)
	}
	addr, err := n.memberAddress(ctx, s.Node)
	if err != nil {
		return api.MethodResult{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, req.Wait()+5*time.Second)
	defer cancel()
	var reply methodReply
	if err := n.peers.PostJSON(ctx, addr, methodsPath, methodCall{Device: deviceID, Module: moduleID, Method: method, Request: req}, &reply); err != nil {
		return api.MethodResult{}, fmt.Errorf("%w: the call could not be passed to node %s, which holds device %s's session: %v", api.ErrUnavailable, s.Node, deviceID, err)
	}
	return reply.result()
}

// memberAddress is a member's cluster-port address.
func (n *Node) memberAddress(ctx context.Context, id string) (string, error) {
	members, err := n.store.Members(ctx)
	if err != nil {
		return "", fmt.Errorf("%w: %v", api.ErrUnavailable, err)
	}
	for _, m := range members {
		if m.ID == id {
			return m.Address, nil
		}
	}
	return "", fmt.Errorf("%w: node %s is not a member of the cluster", api.ErrUnavailable, id)
}

// methodCall is a call passed to the node holding the device's session.
type methodCall struct {
	Device  string            `json:"device"`
	Module  string            `json:"module"`
	Method  string            `json:"method"`
	Request api.MethodRequest `json:"request"`
}

// methodReply is its answer: the module's, or why there is none.
type methodReply struct {
	Result *api.MethodResult `json:"result,omitempty"`
	Code   string            `json:"code,omitempty"` // not_connected, timeout, bad_request, unavailable
	Error  string            `json:"error,omitempty"`
}

func (r methodReply) result() (api.MethodResult, error) {
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

func replyOf(res api.MethodResult, err error) methodReply {
	switch {
	case err == nil:
		return methodReply{Result: &res}
	case errors.Is(err, api.ErrNotConnected):
		return methodReply{Code: "not_connected", Error: err.Error()}
	case errors.Is(err, api.ErrTimeout):
		return methodReply{Code: "timeout", Error: err.Error()}
	case errors.Is(err, fleet.ErrInvalid):
		return methodReply{Code: "bad_request", Error: err.Error()}
	}
	return methodReply{Code: "unavailable", Error: err.Error()}
}

// serveMethodCall runs a call a peer passed on, for a device connected
// here.
func (n *Node) serveMethodCall(w http.ResponseWriter, r *http.Request) {
	var call methodCall
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&call); err != nil {
		http.Error(w, `{"code":"bad_request","error":"malformed method call"}`, http.StatusBadRequest)
		return
	}
	ctl := http.NewResponseController(w)
	_ = ctl.SetReadDeadline(time.Now().Add(call.Request.Wait() + 10*time.Second))
	var res api.MethodResult
	err := call.Request.Validate()
	if err == nil {
		res, err = n.invokeLocal(r.Context(), call.Device, call.Module, call.Method, call.Request)
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(replyOf(res, err))
}

// invokeLocal sends the request on the device's session here and waits
// for the answer.
func (n *Node) invokeLocal(ctx context.Context, deviceID, moduleID, method string, req api.MethodRequest) (api.MethodResult, error) {
	id := newCallID()
	payload, err := json.Marshal(fleet.MethodRequest{ID: id, Module: moduleID, Method: method, Payload: req.Payload,
		ResponseTimeoutSeconds: req.ResponseTimeoutSeconds, ConnectTimeoutSeconds: req.ConnectTimeoutSeconds})
	if err != nil {
		return api.MethodResult{}, err
	}
	ch := make(chan fleet.MethodResponse, 1)
	key := methodKey{deviceID, id}
	mc := &n.methods
	mc.mu.Lock()
	if mc.pending == nil {
		mc.pending = map[methodKey]chan fleet.MethodResponse{}
	}
	mc.pending[key] = ch
	mc.mu.Unlock()
	defer func() {
		mc.mu.Lock()
		delete(mc.pending, key)
		mc.mu.Unlock()
	}()
	switch err := n.broker.PublishMethod(deviceID, payload); {
	case errors.Is(err, broker.ErrNotConnected):
		return api.MethodResult{}, fmt.Errorf("%w: device %s is not connected to any node of the cluster (it left node %s just now)", api.ErrNotConnected, deviceID, n.cfg.NodeID)
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

// Restarts in the device's history. A module restarted through its agent
// (RestartModule answered 200) is an event for the device's history, but
// not one of the raft log's, from which every other event is derived: the
// node that relayed the call records it (at the index it has applied, so
// it sits among the device's other events in order) and passes it to the
// other members (historyPath), so that every node's history shows it. A
// member down at that moment does not get it; nothing goes through raft.

const historyPath = "/cluster/v1/history"

// deviceEvent is a device's event passed to a peer.
type deviceEvent struct {
	Device string             `json:"device"`
	Event  fleet.HistoryEvent `json:"event"`
}

// recordModuleRestart records a successful RestartModule in the device's
// history here and on the other members.
func (n *Node) recordModuleRestart(deviceID string, payload json.RawMessage) {
	var req fleet.RestartModuleRequest
	_ = json.Unmarshal(payload, &req)
	ev := fleet.HistoryEvent{Time: time.Now().UTC(), Index: n.store.AppliedIndex(), Actor: operatorActor,
		Kind: fleet.HistoryModuleRestarted, What: "module " + req.ID + " restarted by the operator (RestartModule)"}
	n.history.Add(history.Item{Device: deviceID, Event: ev})
	go n.shareDeviceEvent(deviceEvent{Device: deviceID, Event: ev})
}

// shareDeviceEvent hands a device's event to every other member, each
// tried once.
func (n *Node) shareDeviceEvent(e deviceEvent) {
	ctx, cancel := context.WithTimeout(n.stopCtx, 10*time.Second)
	defer cancel()
	members, err := n.store.Members(ctx)
	if err != nil {
		n.logger.Warn("a device's history event was not passed to the other nodes", "device", e.Device, "err", err)
		return
	}
	for _, m := range members {
		if m.ID == n.cfg.NodeID {
			continue
		}
		if err := n.peers.PostJSON(ctx, m.Address, historyPath, e, &struct{}{}); err != nil {
			n.logger.Warn("a device's history event was not passed to a node; its history lacks it", "device", e.Device, "node", m.ID, "err", err)
		}
	}
}

// serveDeviceEvent takes a device's event from a peer.
func (n *Node) serveDeviceEvent(w http.ResponseWriter, r *http.Request) {
	var e deviceEvent
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&e); err != nil || fleet.ValidateDeviceID(e.Device) != nil || e.Event.Kind == "" {
		http.Error(w, `{"code":"bad_request","error":"malformed device event"}`, http.StatusBadRequest)
		return
	}
	n.history.Add(history.Item{Device: e.Device, Event: e.Event})
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte("{}"))
}
