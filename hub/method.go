package hub

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"appliance/fleet"
	"appliance/internal/mqttconn"
)

// methodAnswer is a module's answer to a direct method, or the hub's.
type methodAnswer struct {
	status  int
	payload json.RawMessage
	err     string
}

var ridCounter atomic.Uint64

// Method timeouts, as IoT Hub bounds responseTimeoutInSeconds and
// connectTimeoutInSeconds.
const (
	minMethodTimeout  = 5 * time.Second
	maxMethodTimeout  = 300 * time.Second
	maxConnectTimeout = 300 * time.Second
)

// InvokeMethod calls a module's direct method and returns its answer: the
// module's status and payload, or 404 when the module is not connected
// (and subscribed to methods) within the request's connect timeout, 504
// when it does not answer within the response timeout, 400 for a request
// that names no module or method or whose payload is not JSON.
func (h *Hub) InvokeMethod(ctx context.Context, req fleet.MethodRequest) fleet.MethodResponse {
	h.stats.methodCalls.Add(1)
	resp := fleet.MethodResponse{ID: req.ID}
	fail := func(status int, format string, args ...any) fleet.MethodResponse {
		resp.Status, resp.Error = status, fmt.Sprintf(format, args...)
		return resp
	}
	payload := req.Payload
	if len(payload) == 0 {
		payload = json.RawMessage("null")
	}
	switch {
	case req.Module == "" || req.Method == "":
		return fail(fleet.MethodStatusBadRequest, "a method request names a module and a method")
	case !json.Valid(payload):
		return fail(fleet.MethodStatusBadRequest, "the payload is not JSON")
	}
	timeout := time.Duration(req.ResponseTimeoutSeconds) * time.Second
	if timeout == 0 {
		timeout = DefaultMethodTimeout
	}
	timeout = min(max(timeout, minMethodTimeout), maxMethodTimeout)
	connectWait := min(max(time.Duration(req.ConnectTimeoutSeconds)*time.Second, 0), maxConnectTimeout)

	m, ok := h.lookupModule(req.Module)
	if !ok {
		return fail(fleet.MethodStatusNotConnected, "module %q is not in the running deployment", req.Module)
	}
	c, err := m.waitMethods(ctx, connectWait)
	if err != nil {
		return fail(fleet.MethodStatusNotConnected, "module %q is not connected, or not listening for methods", req.Module)
	}
	rid := strconv.FormatUint(ridCounter.Add(1), 16)
	ch := make(chan methodAnswer, 1)
	m.mu.Lock()
	if m.methods == nil {
		m.methods = map[string]chan methodAnswer{}
	}
	m.methods[rid] = ch
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.methods, rid)
		m.mu.Unlock()
	}()
	if err := c.publish(methodRequestTopic(req.Method, rid), payload, 1, nil); err != nil {
		return fail(fleet.MethodStatusNotConnected, "module %q could not be sent the request: %v", req.Module, err)
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case a := <-ch:
		resp.Status, resp.Payload, resp.Error = a.status, a.payload, a.err
		return resp
	case <-timer.C:
		h.stats.methodTimeouts.Add(1)
		return fail(fleet.MethodStatusTimeout, "module %q did not answer method %q within %s", req.Module, req.Method, timeout)
	case <-ctx.Done():
		return fail(fleet.MethodStatusTimeout, "the method call was abandoned: %v", ctx.Err())
	}
}

// waitMethods returns the module's connection once it is subscribed to
// methods, waiting at most wait.
func (m *module) waitMethods(ctx context.Context, wait time.Duration) (*conn, error) {
	deadline := time.Now().Add(wait)
	for {
		m.mu.Lock()
		c, subs := m.conn, m.subs
		var ready chan struct{}
		if c == nil || !subs.Methods {
			ready = make(chan struct{})
			m.methodWaiters = append(m.methodWaiters, ready)
		}
		m.mu.Unlock()
		if ready == nil {
			return c, nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return nil, packets.ErrServerUnavailable
		}
		select {
		case <-ready:
		case <-time.After(left):
			return nil, packets.ErrServerUnavailable
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// methodsReady wakes InvokeMethods waiting for the module (it connected
// or subscribed).
func (m *module) methodsReady() {
	m.mu.Lock()
	waiters := m.methodWaiters
	m.methodWaiters = nil
	m.mu.Unlock()
	for _, w := range waiters {
		close(w)
	}
}

// methodResponse takes $iothub/methods/res/{status}/?$rid={rid}. The
// payload is passed on as it is if it is JSON, else as a JSON string.
func (c *conn) methodResponse(pk packets.Packet) {
	status, rid, ok := parseMethodResponse(pk.TopicName)
	if !ok {
		c.h.log.Info("malformed method response ignored", "module", c.mod.name, "topic", mqttconn.Truncate(pk.TopicName, 200))
		return
	}
	payload := json.RawMessage(pk.Payload)
	switch {
	case len(payload) == 0:
		payload = nil
	case !json.Valid(payload):
		payload, _ = json.Marshal(string(pk.Payload))
	default:
		payload = append(json.RawMessage(nil), payload...)
	}
	m := c.mod
	m.mu.Lock()
	ch, ok := m.methods[rid]
	m.mu.Unlock()
	if !ok {
		c.h.log.Info("method response for no pending call (late, or unknown $rid)", "module", m.name, "rid", rid)
		return
	}
	select {
	case ch <- methodAnswer{status: status, payload: payload}:
	default:
	}
}
