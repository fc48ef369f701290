package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"

	"appliance/fleet"
)

// What the operator's console (the dashboard, package ui) needs beyond the
// resources themselves: a fleet overview whose numbers never double-count,
// condition checks for live validation, manifest templates expanded as
// the CLI expands them, and dry runs of updates and deletions.

// ConsoleBackend is the part of Backend behind these routes.
type ConsoleBackend interface {
	// Overview counts the fleet on the node that answers.
	Overview(ctx context.Context) (Overview, error)
	// CheckCondition compiles a target condition or a custom metric query
	// and, for a target condition, counts the devices it matches now.
	CheckCondition(ctx context.Context, req ConditionRequest) (ConditionCheck, error)
	// DryRunPatchDeployment reports what a PATCH would change, changing
	// nothing.
	DryRunPatchDeployment(ctx context.Context, id string, patch DeploymentPatch, q DryRunQuery) (DryRunResult, error)
	// DryRunDeleteDeployment reports where the deployment's devices would
	// go if it were deleted, changing nothing.
	DryRunDeleteDeployment(ctx context.Context, id string, q DryRunQuery) (DryRunResult, error)
}

// DryRunSample is how many device ids a dry run lists per group.
const DryRunSample = 100

// DryRunMove is a group of devices whose applied deployment a write would
// change: from one deployment ("" for none) to another.
type DryRunMove struct {
	From  string `json:"from"`
	To    string `json:"to"`
	Count int    `json:"count"`
	// Devices are the first DryRunSample of them, by id.
	Devices []string `json:"devices"`
}

// Device health, in a device view and the overview: the category of the
// device under the deployment applied to it (the categories of a
// deployment's status), or HealthNone when no deployment applies.
const HealthNone = fleet.HealthNone

// HealthStates lists the device health values in display order.
var HealthStates = fleet.HealthStates

// Deployment states in the overview. Each deployment is in exactly one.
const (
	StateHealthy    = fleet.StateHealthy
	StateConverging = fleet.StateConverging
	StateFailing    = fleet.StateFailing
	StateSuperseded = fleet.StateSuperseded
	StateIdle       = fleet.StateIdle
)

// DeploymentStates lists them in display order.
var DeploymentStates = fleet.DeploymentStates

// Overview is the fleet at a glance, as the node that answers sees it.
// Every device is counted once in each breakdown: by connection, and by
// health under the one deployment applied to it; every deployment once by
// state.
type Overview struct {
	Node        string              `json:"node"`
	SoakSeconds float64             `json:"soakSeconds"`
	Devices     OverviewDevices     `json:"devices"`
	Deployments OverviewDeployments `json:"deployments"`
	// Recent are the latest deployment events (created, updated,
	// deleted) of the whole fleet, newest first.
	Recent []RecentEvent `json:"recent"`
}

// OverviewDevices counts devices.
type OverviewDevices struct {
	Total        int `json:"total"`
	Connected    int `json:"connected"`
	Disconnected int `json:"disconnected"`
	// Offline counts the disconnected devices out of contact for longer
	// than the node's --offline-after (beside Health: what their last
	// reports said).
	Offline int `json:"offline"`
	// Health counts every device once, by HealthStates: the sum is Total.
	Health map[string]int `json:"health"`
}

// OverviewDeployments counts deployments.
type OverviewDeployments struct {
	Total int `json:"total"`
	// States counts every deployment once, by DeploymentStates.
	States map[string]int `json:"states"`
	// Items is each deployment's state and counts, by id (at most
	// MaxPageSize; Truncated says when there are more).
	Items     []DeploymentSummary `json:"items"`
	Truncated bool                `json:"truncated,omitempty"`
}

// DeploymentSummary is one deployment in the overview.
type DeploymentSummary struct {
	ID              string       `json:"id"`
	Priority        int64        `json:"priority"`
	TargetCondition string       `json:"targetCondition"`
	State           string       `json:"state"`
	Counts          StatusCounts `json:"counts"`
	Layered         bool         `json:"layered,omitempty"`
}

// RecentEvent is a deployment's history event with the deployment it is
// about.
type RecentEvent = fleet.RecentEvent

// Condition kinds of ConditionRequest.
const (
	ConditionTarget = "target" // a target condition: deviceId and tags
	ConditionMetric = "metric" // a custom metric query: also properties.reported
)

// ConditionRequest is the body of POST /conditions/check.
type ConditionRequest struct {
	Condition string `json:"condition"`
	// Kind is ConditionTarget (the default) or ConditionMetric.
	Kind string `json:"kind,omitempty"`
}

// ConditionCheck answers POST /conditions/check. An invalid condition is
// a normal answer (Valid false), not an HTTP error: checking is the point.
type ConditionCheck struct {
	Valid bool `json:"valid"`
	// Message says what is wrong (Valid false), or notes something about
	// a valid condition (an empty one targets nothing).
	Message string `json:"message,omitempty"`
	// Column is the 1-based column of the error in the condition as sent
	// (0 when the error has no position).
	Column int `json:"column,omitempty"`
	// Matches counts the devices a valid target condition matches now.
	Matches *int `json:"matches,omitempty"`
}

// ManifestRequest is the body of POST /manifests/expand: a deployment
// manifest as a file holds it, and the KEY=value lines of its .env file.
type ManifestRequest struct {
	Manifest string `json:"manifest"`
	Env      string `json:"env,omitempty"`
}

// ManifestResult is a manifest expanded as `appliance deployment create
// --content FILE --env-file ENV` expands it, ready for PUT /deployments.
type ManifestResult struct {
	Content json.RawMessage `json:"content"`
	// Placeholders are the variables the manifest used, in order.
	Placeholders []string `json:"placeholders"`
	// Configuration holds what a whole IoT Hub configuration object said
	// besides its content (its targetCondition, priority, labels, metrics),
	// for a form to start from; nil for a bare modulesContent file.
	Configuration *ManifestConfiguration `json:"configuration,omitempty"`
}

// ManifestConfiguration is the non-content part of an IoT Hub
// configuration object.
type ManifestConfiguration struct {
	// ID is the configuration's own id, when it has one.
	ID              string            `json:"id,omitempty"`
	TargetCondition *string           `json:"targetCondition,omitempty"`
	Priority        *int64            `json:"priority,omitempty"`
	Labels          map[string]string `json:"labels,omitempty"`
	Metrics         *fleet.Metrics    `json:"metrics,omitempty"`
}

// ExpandManifest expands a manifest's template placeholders from env only
// (never from the node's own environment, which is not the operator's),
// reads a bare modulesContent file, a {"content": ...} file or a whole
// configuration object, and stringifies object createOptions: what the
// CLI does on the operator's machine. Errors name "manifest" or "env" and
// the line.
func ExpandManifest(req ManifestRequest) (ManifestResult, error) {
	vars, err := fleet.ParseEnvFile([]byte(req.Env))
	if err != nil {
		return ManifestResult{}, inField("env", err)
	}
	data := []byte(req.Manifest)
	if len(bytes.TrimSpace(data)) == 0 {
		return ManifestResult{}, fleet.Invalid("manifest", `is empty: paste or upload a deployment manifest ({"modulesContent": {...}})`)
	}
	names, err := fleet.TemplatePlaceholders(data)
	if err != nil {
		return ManifestResult{}, inField("manifest", err)
	}
	expanded, err := fleet.ExpandTemplate(data, func(name string) (string, bool) {
		v, ok := vars[name]
		return v, ok
	})
	if err != nil {
		return ManifestResult{}, inField("manifest", err)
	}
	content, err := fleet.ParseContentFile(expanded)
	if err != nil {
		return ManifestResult{}, inField("manifest", err)
	}
	if content, err = fleet.NormalizeCreateOptions(content); err != nil {
		return ManifestResult{}, inField("manifest", err)
	}
	res := ManifestResult{Content: content, Placeholders: names}
	if names == nil {
		res.Placeholders = []string{}
	}
	res.Configuration = ConfigurationOf(expanded)
	return res, nil
}

// ConfigurationOf reads what a whole IoT Hub configuration object (as `az
// iot edge deployment show` prints it) says besides its content: its
// targetCondition, priority, labels and metrics; nil for a bare
// modulesContent file or one that has none of them. A configuration
// object whose other fields have unexpected types is still a good
// manifest: they are then left out.
func ConfigurationOf(file []byte) *ManifestConfiguration {
	var cfg struct {
		ID              string            `json:"id"`
		Content         json.RawMessage   `json:"content"`
		TargetCondition *string           `json:"targetCondition"`
		Priority        *int64            `json:"priority"`
		Labels          map[string]string `json:"labels"`
		Metrics         *fleet.Metrics    `json:"metrics"`
	}
	if json.Unmarshal(file, &cfg) != nil || cfg.Content == nil ||
		(cfg.TargetCondition == nil && cfg.Priority == nil && cfg.Labels == nil && cfg.Metrics == nil) {
		return nil
	}
	return &ManifestConfiguration{ID: cfg.ID, TargetCondition: cfg.TargetCondition, Priority: cfg.Priority, Labels: cfg.Labels, Metrics: cfg.Metrics}
}

// inField puts an error under a request field, keeping the field the
// error named inside it (content.modulesContent...) in its message.
func inField(field string, err error) error {
	var ve *fleet.ValidationError
	if errors.As(err, &ve) && ve.Field != "" {
		return &fleet.ValidationError{Field: field, Msg: ve.Error()}
	}
	return &fleet.ValidationError{Field: field, Msg: err.Error()}
}

func (s *Server) consoleRoutes() {
	s.mux.Handle("GET /api/v1/overview", s.auth(s.overview))
	s.mux.Handle("POST /api/v1/conditions/check", s.auth(s.checkCondition))
	s.mux.Handle("POST /api/v1/manifests/expand", s.auth(s.expandManifest))
}

// reply answers a read (or a dry run) with its result or its error.
func (s *Server) reply(w http.ResponseWriter, r *http.Request, v any, err error) {
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (s *Server) overview(w http.ResponseWriter, r *http.Request) {
	o, err := s.cfg.Backend.Overview(r.Context())
	s.reply(w, r, o, err)
}

func (s *Server) checkCondition(w http.ResponseWriter, r *http.Request) {
	var req ConditionRequest
	if !s.decode(w, r, &req) {
		return
	}
	switch req.Kind {
	case "":
		req.Kind = ConditionTarget
	case ConditionTarget, ConditionMetric:
	default:
		s.fail(w, r, fleet.Invalid("kind", "must be %q or %q; got %q", ConditionTarget, ConditionMetric, req.Kind))
		return
	}
	res, err := s.cfg.Backend.CheckCondition(r.Context(), req)
	s.reply(w, r, res, err)
}

func (s *Server) expandManifest(w http.ResponseWriter, r *http.Request) {
	var req ManifestRequest
	if !s.decode(w, r, &req) {
		return
	}
	res, err := ExpandManifest(req)
	s.reply(w, r, res, err)
}

// dryRun tells whether a write asks only for its dry run.
func dryRun(r *http.Request) bool {
	v := r.URL.Query().Get("dryRun")
	return v == "true" || v == "1"
}

// Overview reads the fleet overview.
func (c *Client) Overview(ctx context.Context) (Overview, error) {
	var o Overview
	_, err := c.do(ctx, http.MethodGet, "/api/v1/overview", nil, WriteOptions{}, nil, &o)
	return o, err
}

// CheckCondition checks a target condition (kind "" or ConditionTarget) or
// a custom metric query (ConditionMetric).
func (c *Client) CheckCondition(ctx context.Context, req ConditionRequest) (ConditionCheck, error) {
	var res ConditionCheck
	_, err := c.do(ctx, http.MethodPost, "/api/v1/conditions/check", nil, WriteOptions{}, req, &res)
	return res, err
}

// ExpandManifest has the node expand a manifest template.
func (c *Client) ExpandManifest(ctx context.Context, req ManifestRequest) (ManifestResult, error) {
	var res ManifestResult
	_, err := c.do(ctx, http.MethodPost, "/api/v1/manifests/expand", nil, WriteOptions{}, req, &res)
	return res, err
}

// DryRunPatchDeployment reports what PatchDeployment would change (one
// page of the devices, as q says).
func (c *Client) DryRunPatchDeployment(ctx context.Context, id string, p DeploymentPatch, q DryRunQuery) (DryRunResult, error) {
	var r DryRunResult
	_, err := c.do(ctx, http.MethodPatch, "/api/v1/deployments/"+esc(id), q.values(), WriteOptions{}, p, &r)
	return r, err
}

// DryRunDeleteDeployment reports where a deployment's devices would go if
// it were deleted.
func (c *Client) DryRunDeleteDeployment(ctx context.Context, id string, q DryRunQuery) (DryRunResult, error) {
	var r DryRunResult
	_, err := c.do(ctx, http.MethodDelete, "/api/v1/deployments/"+esc(id), q.values(), WriteOptions{}, nil, &r)
	return r, err
}
