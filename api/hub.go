package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"appliance/fleet"
)

// The device hub's side of the operator API: consumers of the devices'
// upstream messages, the live tail of those messages, module twins and
// direct methods.

// HubBackend is what these routes need from a node.
type HubBackend interface {
	// CreateConsumer creates a consumer with a new key, returned once.
	CreateConsumer(ctx context.Context, name string) (fleet.Consumer, error)
	Consumer(ctx context.Context, name string) (fleet.Consumer, error)
	Consumers(ctx context.Context) ([]fleet.Consumer, error)
	DeleteConsumer(ctx context.Context, name string, opts WriteOptions) error

	// Module is one module of a device: its runtime status, its twin's
	// desired properties (secrets redacted) and reported properties.
	Module(ctx context.Context, deviceID, moduleID string, consistent bool) (ModuleView, error)
	// InvokeMethod calls a direct method of a device's module and waits
	// for its answer. ErrNotConnected: the device (or module) is not
	// connected; ErrTimeout: no answer in time.
	InvokeMethod(ctx context.Context, deviceID, moduleID, method string, req MethodRequest) (MethodResult, error)
	// TailEvents calls fn with each upstream message the cluster's nodes
	// receive from now on that the filter selects, until ctx ends or fn
	// fails.
	TailEvents(ctx context.Context, f EventFilter, fn func(EventView) error) error
}

var (
	// ErrNotConnected maps to 404 with the code not_connected: a direct
	// method's device has no session with any node, or its module is not
	// connected to the device's hub (Azure's 404103 DeviceNotOnline).
	ErrNotConnected = errors.New("not connected")
	// ErrTimeout maps to 504 with the code timeout: the module did not
	// answer within the method's response timeout (Azure's 504101).
	ErrTimeout = errors.New("timed out")
)

// ConsumerPage is GET /consumers.
type ConsumerPage struct {
	Items []fleet.Consumer `json:"items"`
}

// ModuleView is a device's module as an operator reads it.
type ModuleView struct {
	DeviceID string `json:"deviceId"`
	ModuleID string `json:"moduleId"`
	// Deployment is the deployment applied to the device, whose content
	// gives the module's desired properties.
	Deployment string `json:"deployment,omitempty"`
	// Runtime is the module's status in the device's last report (absent
	// when the report does not list it).
	Runtime *fleet.ModuleStatus `json:"runtime,omitempty"`
	// ConnectionState is the module's connection to its device's hub as
	// last reported: Connected or Disconnected.
	ConnectionState         string     `json:"connectionState"`
	LastConnectedTimeUTC    *time.Time `json:"lastConnectedTimeUtc,omitempty"`
	LastDisconnectedTimeUTC *time.Time `json:"lastDisconnectedTimeUtc,omitempty"`
	// Properties is the module twin: desired (from the deployment, secrets
	// redacted) and reported (as the module last patched them, with their
	// "$version"; {} when it has reported nothing).
	Properties ModuleProperties `json:"properties"`
	// ReportedTimeUTC is when the report that carried them arrived.
	ReportedTimeUTC *time.Time `json:"reportedTimeUtc,omitempty"`
}

// ModuleProperties are a module twin's properties.
type ModuleProperties struct {
	Desired  json.RawMessage `json:"desired"`
	Reported json.RawMessage `json:"reported"`
}

// MethodRequest is the body of POST .../modules/{m}/methods/{name}, as
// Azure's invoke-method body less the method name (it is in the path).
type MethodRequest struct {
	// Payload is any JSON value, passed to the module as it is.
	Payload json.RawMessage `json:"payload,omitempty"`
	// ResponseTimeoutSeconds is how long the module has to answer (5 to
	// 300; 0: 30). ConnectTimeoutSeconds how long the hub waits for the
	// module to be connected (0 to 300; 0: not at all).
	ResponseTimeoutSeconds int `json:"responseTimeoutInSeconds,omitempty"`
	ConnectTimeoutSeconds  int `json:"connectTimeoutInSeconds,omitempty"`
}

// Limits of a direct method call, as Azure's.
const (
	DefaultMethodTimeout   = 30 * time.Second
	MinMethodTimeout       = 5 * time.Second
	MaxMethodTimeout       = 300 * time.Second
	MaxMethodPayload       = 128 << 10
	methodReplyGraceSecond = 5
)

// Validate checks the timeouts and the payload.
func (r MethodRequest) Validate() error {
	if t := r.ResponseTimeoutSeconds; t != 0 && (t < int(MinMethodTimeout/time.Second) || t > int(MaxMethodTimeout/time.Second)) {
		return fleet.Invalid("responseTimeoutInSeconds", "must be from %d to %d; got %d", int(MinMethodTimeout/time.Second), int(MaxMethodTimeout/time.Second), t)
	}
	if t := r.ConnectTimeoutSeconds; t < 0 || t > int(MaxMethodTimeout/time.Second) {
		return fleet.Invalid("connectTimeoutInSeconds", "must be from 0 to %d; got %d", int(MaxMethodTimeout/time.Second), t)
	}
	if len(r.Payload) > MaxMethodPayload {
		return fleet.Invalid("payload", "is %d bytes; at most %d are allowed", len(r.Payload), MaxMethodPayload)
	}
	if len(r.Payload) > 0 && !json.Valid(r.Payload) {
		return fleet.Invalid("payload", "must be a JSON value")
	}
	return nil
}

// Wait is how long the caller waits for the answer at most: both
// timeouts and a margin for the trip.
func (r MethodRequest) Wait() time.Duration {
	resp := time.Duration(r.ResponseTimeoutSeconds) * time.Second
	if resp == 0 {
		resp = DefaultMethodTimeout
	}
	return resp + time.Duration(r.ConnectTimeoutSeconds)*time.Second + methodReplyGraceSecond*time.Second
}

// MethodResult is the module's answer: its status and payload.
type MethodResult struct {
	Status  int             `json:"status"`
	Payload json.RawMessage `json:"payload,omitempty"`
}

// EventFilter selects upstream messages ("" : any).
type EventFilter struct {
	Device, Module string
}

// EventView is one upstream message, as GET /events streams it (one JSON
// object per line).
type EventView struct {
	// Node is the node that received it; Offset its place in that node's
	// retention log.
	Node            string    `json:"node"`
	Offset          uint64    `json:"offset"`
	ReceivedTimeUTC time.Time `json:"receivedTimeUtc"`
	DeviceID        string    `json:"deviceId"`
	ModuleID        string    `json:"moduleId"`
	OutputName      string    `json:"outputName,omitempty"`
	// SequenceNumber is the device hub's, unique per device.
	SequenceNumber  uint64            `json:"sequenceNumber"`
	EnqueuedTimeUTC time.Time         `json:"enqueuedTimeUtc"`
	Properties      map[string]string `json:"properties,omitempty"`
	// SystemProperties are messageId, correlationId, contentType, ...
	SystemProperties map[string]string `json:"systemProperties,omitempty"`
	// Body is the message body: as a string when it is UTF-8, else in
	// base64 with BodyEncoding "base64".
	Body         string `json:"body"`
	BodyEncoding string `json:"bodyEncoding,omitempty"`
}

// eventsKeepalive is how often an idle tail sends an empty line, so that
// proxies and the client know it is alive.
const eventsKeepalive = 15 * time.Second

func (s *Server) hubRoutes() {
	s.mux.Handle("PUT /api/v1/consumers/{name}", s.auth(s.putConsumer))
	s.mux.Handle("GET /api/v1/consumers/{name}", s.auth(s.getConsumer))
	s.mux.Handle("DELETE /api/v1/consumers/{name}", s.auth(s.deleteConsumer))
	s.mux.Handle("GET /api/v1/consumers", s.auth(s.listConsumers))
	s.mux.Handle("GET /api/v1/devices/{id}/modules/{module}", s.auth(s.getModule))
	s.mux.Handle("POST /api/v1/devices/{id}/modules/{module}/methods/{method}", s.auth(s.invokeMethod))
	s.mux.Handle("GET /api/v1/events", s.auth(s.tailEvents))
}

// ConsumerRequest is the body of PUT /consumers/{name}: nothing to set
// yet ({}), the key is made by the node.
type ConsumerRequest struct{}

func (s *Server) putConsumer(w http.ResponseWriter, r *http.Request) {
	var req ConsumerRequest
	if !s.decode(w, r, &req) {
		return
	}
	c, err := s.cfg.Backend.CreateConsumer(r.Context(), r.PathValue("name"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	setEtag(w, c.Etag)
	writeJSON(w, http.StatusCreated, c)
}

func (s *Server) getConsumer(w http.ResponseWriter, r *http.Request) {
	c, err := s.cfg.Backend.Consumer(r.Context(), r.PathValue("name"))
	s.reply(w, r, c, err)
}

func (s *Server) listConsumers(w http.ResponseWriter, r *http.Request) {
	items, err := s.cfg.Backend.Consumers(r.Context())
	s.reply(w, r, ConsumerPage{Items: items}, err)
}

func (s *Server) deleteConsumer(w http.ResponseWriter, r *http.Request) {
	if err := s.cfg.Backend.DeleteConsumer(r.Context(), r.PathValue("name"), writeOpts(r)); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) getModule(w http.ResponseWriter, r *http.Request) {
	m, err := s.cfg.Backend.Module(r.Context(), r.PathValue("id"), r.PathValue("module"), consistent(r))
	s.reply(w, r, m, err)
}

func (s *Server) invokeMethod(w http.ResponseWriter, r *http.Request) {
	var req MethodRequest
	if !s.decode(w, r, &req) {
		return
	}
	if err := req.Validate(); err != nil {
		s.fail(w, r, err)
		return
	}
	// The answer may take up to the method's timeouts, longer than the
	// server's read and write timeouts (a read deadline reached while the
	// handler runs would cancel its context).
	ctl := http.NewResponseController(w)
	_ = ctl.SetReadDeadline(time.Now().Add(req.Wait() + 10*time.Second))
	_ = ctl.SetWriteDeadline(time.Now().Add(req.Wait() + 10*time.Second))
	res, err := s.cfg.Backend.InvokeMethod(r.Context(), r.PathValue("id"), r.PathValue("module"), r.PathValue("method"), req)
	s.reply(w, r, res, err)
}

// tailEvents streams the upstream messages received from now on, one JSON
// object per line (an empty line every eventsKeepalive when there is
// none), until the client goes away. The server's timeouts for a whole
// request and response do not fit: each line must instead go out within
// backupChunkTimeout.
func (s *Server) tailEvents(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := EventFilter{Device: q.Get("device"), Module: q.Get("module")}
	if f.Device != "" {
		if err := fleet.ValidateDeviceID(f.Device); err != nil {
			s.fail(w, r, fleet.Invalid("device", "%v", err))
			return
		}
	}
	ctl := http.NewResponseController(w)
	// A tail outlives the server's read timeout, whose deadline would
	// cancel the request's context; the client going away still does.
	_ = ctl.SetReadDeadline(time.Time{})
	_ = ctl.SetWriteDeadline(time.Now().Add(backupChunkTimeout))
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	_ = ctl.Flush()
	lines := make(chan []byte, 256)
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		errc <- s.cfg.Backend.TailEvents(ctx, f, func(ev EventView) error {
			b, err := json.Marshal(ev)
			if err != nil {
				return err
			}
			select {
			case lines <- append(b, '\n'):
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	keepalive := time.NewTicker(eventsKeepalive)
	defer keepalive.Stop()
	for {
		var line []byte
		select {
		case line = <-lines:
		case <-keepalive.C:
			line = []byte("\n")
		case err := <-errc:
			if err != nil && ctx.Err() == nil {
				s.cfg.Logger.Warn("event tail ended", "err", err)
			}
			// What the backend produced before it ended still goes out.
			for {
				select {
				case line := <-lines:
					if _, err := w.Write(line); err != nil {
						return
					}
				default:
					_ = ctl.Flush()
					return
				}
			}
		case <-ctx.Done():
			return
		}
		_ = ctl.SetWriteDeadline(time.Now().Add(backupChunkTimeout))
		if _, err := w.Write(line); err != nil {
			return
		}
		if len(lines) == 0 {
			_ = ctl.Flush()
		}
	}
}

// CreateConsumer creates a consumer; the answer holds its key, once.
func (c *Client) CreateConsumer(ctx context.Context, name string) (fleet.Consumer, error) {
	var out fleet.Consumer
	_, err := c.do(ctx, http.MethodPut, "/api/v1/consumers/"+esc(name), nil, WriteOptions{IfNoneMatch: "*"}, ConsumerRequest{}, &out)
	return out, err
}

// Consumer reads one consumer (never its key).
func (c *Client) Consumer(ctx context.Context, name string) (fleet.Consumer, error) {
	var out fleet.Consumer
	_, err := c.do(ctx, http.MethodGet, "/api/v1/consumers/"+esc(name), nil, WriteOptions{}, nil, &out)
	return out, err
}

// Consumers lists the consumers.
func (c *Client) Consumers(ctx context.Context) ([]fleet.Consumer, error) {
	var out ConsumerPage
	_, err := c.do(ctx, http.MethodGet, "/api/v1/consumers", nil, WriteOptions{}, nil, &out)
	return out.Items, err
}

// DeleteConsumer deletes a consumer; its connections end on every node.
func (c *Client) DeleteConsumer(ctx context.Context, name string, opts WriteOptions) error {
	_, err := c.do(ctx, http.MethodDelete, "/api/v1/consumers/"+esc(name), nil, opts, nil, nil)
	return err
}

// Module reads one module of a device.
func (c *Client) Module(ctx context.Context, deviceID, moduleID string, consistent bool) (ModuleView, error) {
	var out ModuleView
	var q url.Values
	if consistent {
		q = url.Values{"consistent": {"true"}}
	}
	_, err := c.do(ctx, http.MethodGet, "/api/v1/devices/"+esc(deviceID)+"/modules/"+esc(moduleID), q, WriteOptions{}, nil, &out)
	return out, err
}

// InvokeMethod calls a module's direct method and returns its answer. The
// call waits as long as the method's timeouts allow (ctx may end it
// sooner).
func (c *Client) InvokeMethod(ctx context.Context, deviceID, moduleID, method string, req MethodRequest) (MethodResult, error) {
	var out MethodResult
	cc := *c
	hc := *c.http()
	hc.Timeout = req.Wait() + 15*time.Second
	cc.HTTP = &hc
	_, err := cc.do(ctx, http.MethodPost, "/api/v1/devices/"+esc(deviceID)+"/modules/"+esc(moduleID)+"/methods/"+esc(method), nil, WriteOptions{}, req, &out)
	return out, err
}

// TailEvents streams the upstream messages the cluster receives from now
// on into fn, until ctx ends (nil), the stream breaks or fn fails.
func (c *Client) TailEvents(ctx context.Context, f EventFilter, fn func(EventView) error) error {
	q := url.Values{}
	if f.Device != "" {
		q.Set("device", f.Device)
	}
	if f.Module != "" {
		q.Set("module", f.Module)
	}
	u := strings.TrimRight(c.BaseURL, "/") + "/api/v1/events"
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.Token)
	hc := *c.http()
	hc.Timeout = 0 // a tail runs until ctx ends
	resp, err := hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("GET /api/v1/events from %s: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return errorFrom(resp, data, http.MethodGet, "/api/v1/events")
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(strings.TrimSpace(string(line))) == 0 {
			continue // keepalive
		}
		var ev EventView
		if err := json.Unmarshal(line, &ev); err != nil {
			return fmt.Errorf("GET /api/v1/events: line %q: %w", truncateLine(line), err)
		}
		if err := fn(ev); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("GET /api/v1/events from %s: %w", c.BaseURL, err)
	}
	return errors.New("GET /api/v1/events: the node ended the stream (it is stopping)")
}

func truncateLine(b []byte) string {
	if len(b) > 100 {
		return string(b[:100]) + "..."
	}
	return string(b)
}
