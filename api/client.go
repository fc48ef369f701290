package api

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"appliance/fleet"
)

// Client calls a node's operator API.
type Client struct {
	// BaseURL is the node, e.g. http://127.0.0.1:7480.
	BaseURL string
	// Token is the admin bearer token.
	Token string
	// HTTP defaults to a client with a 30 s timeout.
	HTTP *http.Client
}

// Error is an error response from the API.
type Error struct {
	StatusCode int
	ErrorDetail
}

func (e *Error) Error() string {
	if e.Field != "" && !strings.Contains(e.Message, e.Field) {
		return fmt.Sprintf("%s (field %s)", e.Message, e.Field)
	}
	return e.Message
}

// Is lets callers test an API error against the fleet sentinels.
func (e *Error) Is(target error) bool {
	switch e.StatusCode {
	case http.StatusNotFound:
		return target == fleet.ErrNotFound
	case http.StatusConflict:
		if e.Code == codeStateConflict {
			return target == fleet.ErrConflict
		}
		return target == fleet.ErrExists
	case http.StatusPreconditionFailed:
		return target == fleet.ErrPreconditionFailed
	case http.StatusBadRequest:
		return target == fleet.ErrInvalid
	case http.StatusServiceUnavailable:
		return target == ErrUnavailable
	}
	return false
}

func (c *Client) http() *http.Client {
	if c.HTTP != nil {
		return c.HTTP
	}
	return &http.Client{Timeout: 30 * time.Second}
}

// do sends a request and decodes a JSON response into out (when non-nil).
// It returns the response's ETag.
func (c *Client) do(ctx context.Context, method, path string, query url.Values, opts WriteOptions, body, out any) (string, error) {
	u := strings.TrimRight(c.BaseURL, "/") + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	var rd io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return "", fmt.Errorf("encode request: %w", err)
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return "", fmt.Errorf("build request %s %s: %w", method, path, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	if opts.IfMatch != "" {
		req.Header.Set("If-Match", `"`+opts.IfMatch+`"`)
	}
	if opts.IfNoneMatch != "" {
		if opts.IfNoneMatch == "*" {
			req.Header.Set("If-None-Match", "*")
		} else {
			req.Header.Set("If-None-Match", `"`+opts.IfNoneMatch+`"`)
		}
	}
	resp, err := c.http().Do(req)
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", method, c.BaseURL, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return "", fmt.Errorf("read response of %s %s: %w", method, path, err)
	}
	if resp.StatusCode >= 400 {
		return "", errorFrom(resp, data, method, path)
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return "", fmt.Errorf("decode response of %s %s: %w", method, path, err)
		}
	}
	return unquoteEtag(resp.Header.Get("ETag")), nil
}

// errorFrom decodes an error response's JSON body.
func errorFrom(resp *http.Response, data []byte, method, path string) error {
	var eb ErrorBody
	if json.Unmarshal(data, &eb) != nil || eb.Error.Message == "" {
		eb.Error = ErrorDetail{Code: "http_" + strconv.Itoa(resp.StatusCode), Message: fmt.Sprintf("%s %s: %s", method, path, resp.Status)}
	}
	return &Error{StatusCode: resp.StatusCode, ErrorDetail: eb.Error}
}

func esc(id string) string { return url.PathEscape(id) }

// PutDevice creates or replaces a device. The creation response carries the
// device's keys, once.
func (c *Client) PutDevice(ctx context.Context, id string, req DeviceRequest, opts WriteOptions) (fleet.Device, error) {
	var d fleet.Device
	_, err := c.do(ctx, http.MethodPut, "/api/v1/devices/"+esc(id), nil, opts, req, &d)
	return d, err
}

// PatchDevice merges tags and sets status.
func (c *Client) PatchDevice(ctx context.Context, id string, p DevicePatch, opts WriteOptions) (fleet.Device, error) {
	var d fleet.Device
	_, err := c.do(ctx, http.MethodPatch, "/api/v1/devices/"+esc(id), nil, opts, p, &d)
	return d, err
}

// DeleteDevice removes a device.
func (c *Client) DeleteDevice(ctx context.Context, id string, opts WriteOptions) error {
	_, err := c.do(ctx, http.MethodDelete, "/api/v1/devices/"+esc(id), nil, opts, nil, nil)
	return err
}

// Device reads one device.
func (c *Client) Device(ctx context.Context, id string, consistent bool) (DeviceView, error) {
	var d DeviceView
	_, err := c.do(ctx, http.MethodGet, "/api/v1/devices/"+esc(id), consistentQuery(consistent), WriteOptions{}, nil, &d)
	return d, err
}

// Devices reads one page of devices.
func (c *Client) Devices(ctx context.Context, q DeviceQuery) (DevicePage, error) {
	v := consistentQuery(q.Consistent)
	if q.Condition != "" {
		v.Set("condition", q.Condition)
	}
	if q.Prefix != "" {
		v.Set("prefix", q.Prefix)
	}
	pageQuery(v, q.After, q.Limit)
	var p DevicePage
	_, err := c.do(ctx, http.MethodGet, "/api/v1/devices", v, WriteOptions{}, nil, &p)
	return p, err
}

// PutDeployment creates a deployment (or re-puts an identical one).
func (c *Client) PutDeployment(ctx context.Context, id string, req DeploymentRequest, opts WriteOptions) (DeploymentView, error) {
	var d DeploymentView
	_, err := c.do(ctx, http.MethodPut, "/api/v1/deployments/"+esc(id), nil, opts, req, &d)
	return d, err
}

// DryRunDeployment reports what creating (or replacing) the deployment
// would do (one page of the devices, as q says).
func (c *Client) DryRunDeployment(ctx context.Context, id string, req DeploymentRequest, q DryRunQuery) (DryRunResult, error) {
	var r DryRunResult
	_, err := c.do(ctx, http.MethodPut, "/api/v1/deployments/"+esc(id), q.values(), WriteOptions{}, req, &r)
	return r, err
}

// PatchDeployment changes condition, priority, labels or metrics.
func (c *Client) PatchDeployment(ctx context.Context, id string, p DeploymentPatch, opts WriteOptions) (DeploymentView, error) {
	var d DeploymentView
	_, err := c.do(ctx, http.MethodPatch, "/api/v1/deployments/"+esc(id), nil, opts, p, &d)
	return d, err
}

// DeleteDeployment removes a deployment.
func (c *Client) DeleteDeployment(ctx context.Context, id string, opts WriteOptions) error {
	_, err := c.do(ctx, http.MethodDelete, "/api/v1/deployments/"+esc(id), nil, opts, nil, nil)
	return err
}

// Deployment reads one deployment.
func (c *Client) Deployment(ctx context.Context, id string, consistent bool) (DeploymentView, error) {
	var d DeploymentView
	_, err := c.do(ctx, http.MethodGet, "/api/v1/deployments/"+esc(id), consistentQuery(consistent), WriteOptions{}, nil, &d)
	return d, err
}

// Deployments reads one page of deployments.
func (c *Client) Deployments(ctx context.Context, q DeploymentQuery) (DeploymentPage, error) {
	v := consistentQuery(q.Consistent)
	for k, val := range q.Labels {
		v.Add("label", k+"="+val)
	}
	pageQuery(v, q.After, q.Limit)
	var p DeploymentPage
	_, err := c.do(ctx, http.MethodGet, "/api/v1/deployments", v, WriteOptions{}, nil, &p)
	return p, err
}

// Health reads /healthz.
func (c *Client) Health(ctx context.Context) (Health, error) {
	var h Health
	_, err := c.do(ctx, http.MethodGet, "/healthz", nil, WriteOptions{}, nil, &h)
	return h, err
}

func consistentQuery(consistent bool) url.Values {
	v := url.Values{}
	if consistent {
		v.Set("consistent", "true")
	}
	return v
}

func pageQuery(v url.Values, after string, limit int) {
	if after != "" {
		v.Set("after", after)
	}
	if limit > 0 {
		v.Set("limit", strconv.Itoa(limit))
	}
}

// RegenerateDeviceKey replaces one of a device's keys; the response carries
// the new key, once.
func (c *Client) RegenerateDeviceKey(ctx context.Context, id, which string) (fleet.Device, error) {
	var d fleet.Device
	_, err := c.do(ctx, http.MethodPost, "/api/v1/devices/"+esc(id)+"/keys/regenerate", nil, WriteOptions{}, RegenerateKeyRequest{Key: which}, &d)
	return d, err
}

// PutEnrollment creates an enrollment (the response carries its token,
// once) or replaces its tags.
func (c *Client) PutEnrollment(ctx context.Context, name string, req EnrollmentRequest, opts WriteOptions) (fleet.Enrollment, error) {
	var e fleet.Enrollment
	_, err := c.do(ctx, http.MethodPut, "/api/v1/enrollments/"+esc(name), nil, opts, req, &e)
	return e, err
}

// Enrollment reads one enrollment (without its token).
func (c *Client) Enrollment(ctx context.Context, name string) (fleet.Enrollment, error) {
	var e fleet.Enrollment
	_, err := c.do(ctx, http.MethodGet, "/api/v1/enrollments/"+esc(name), nil, WriteOptions{}, nil, &e)
	return e, err
}

// Enrollments lists every enrollment.
func (c *Client) Enrollments(ctx context.Context) ([]fleet.Enrollment, error) {
	var p EnrollmentPage
	_, err := c.do(ctx, http.MethodGet, "/api/v1/enrollments", nil, WriteOptions{}, nil, &p)
	return p.Items, err
}

// DeleteEnrollment removes an enrollment; its token enrolls nothing from
// then on. Devices it registered stay, unless revokeDevices: their keys
// are then cleared too, and the answer lists them.
func (c *Client) DeleteEnrollment(ctx context.Context, name string, revokeDevices bool, opts WriteOptions) (EnrollmentDeletion, error) {
	var q url.Values
	if revokeDevices {
		q = url.Values{"revokeDevices": {"true"}}
	}
	out := EnrollmentDeletion{Name: name}
	_, err := c.do(ctx, http.MethodDelete, "/api/v1/enrollments/"+esc(name), q, opts, nil, &out)
	return out, err
}

// RotateEnrollment gives an enrollment a new token, returned this once;
// the old token enrolls nothing from then on.
func (c *Client) RotateEnrollment(ctx context.Context, name string, req RotateEnrollmentRequest, opts WriteOptions) (EnrollmentRotation, error) {
	var out EnrollmentRotation
	_, err := c.do(ctx, http.MethodPost, "/api/v1/enrollments/"+esc(name)+"/rotate", nil, opts, req, &out)
	return out, err
}

// DeploymentStatus reads where a deployment stands.
func (c *Client) DeploymentStatus(ctx context.Context, id string, q StatusQuery) (DeploymentStatus, error) {
	v := consistentQuery(q.Consistent)
	if q.Soak > 0 {
		v.Set("soak", q.Soak.String())
	}
	if q.Category != "" {
		v.Set("category", q.Category)
	}
	pageQuery(v, q.After, q.Limit)
	var st DeploymentStatus
	_, err := c.do(ctx, http.MethodGet, "/api/v1/deployments/"+esc(id)+"/status", v, WriteOptions{}, nil, &st)
	return st, err
}

// DeploymentHistory reads a deployment's events, newest first.
func (c *Client) DeploymentHistory(ctx context.Context, id string, limit int) (HistoryPage, error) {
	return c.history(ctx, "/api/v1/deployments/"+esc(id)+"/history", limit)
}

// DeviceHistory reads a device's assignment changes, newest first.
func (c *Client) DeviceHistory(ctx context.Context, id string, limit int) (HistoryPage, error) {
	return c.history(ctx, "/api/v1/devices/"+esc(id)+"/history", limit)
}

func (c *Client) history(ctx context.Context, path string, limit int) (HistoryPage, error) {
	v := url.Values{}
	pageQuery(v, "", limit)
	var p HistoryPage
	_, err := c.do(ctx, http.MethodGet, path, v, WriteOptions{}, nil, &p)
	return p, err
}

// Cluster lists the cluster's members as the node sees them.
func (c *Client) Cluster(ctx context.Context) (ClusterView, error) {
	var v ClusterView
	_, err := c.do(ctx, http.MethodGet, "/api/v1/cluster", nil, WriteOptions{}, nil, &v)
	return v, err
}

// RemoveClusterMember takes a node out of the cluster for good: the
// answer holds the new admin and join tokens (the removed node's copies no
// longer work) and whether its certificate was revoked.
func (c *Client) RemoveClusterMember(ctx context.Context, id string) (MemberRemoval, error) {
	var out MemberRemoval
	_, err := c.do(ctx, http.MethodDelete, "/api/v1/cluster/members/"+esc(id), nil, WriteOptions{}, nil, &out)
	return out, err
}

// RotateAdminToken replaces the admin token on every node and returns the
// new one. The client's own Token is the old one afterwards.
func (c *Client) RotateAdminToken(ctx context.Context) (string, error) {
	var reply AdminTokenReply
	_, err := c.do(ctx, http.MethodPost, "/api/v1/cluster/admin-token", nil, WriteOptions{}, nil, &reply)
	return reply.AdminToken, err
}

// RotateJoinToken replaces the join token on every node and returns the
// new one.
func (c *Client) RotateJoinToken(ctx context.Context) (string, error) {
	var reply JoinTokenReply
	_, err := c.do(ctx, http.MethodPost, "/api/v1/cluster/join-token", nil, WriteOptions{}, nil, &reply)
	return reply.JoinToken, err
}

// Backup streams a backup archive into w and returns the bytes written.
// The archive's integrity is checked by package backup, not here.
func (c *Client) Backup(ctx context.Context, w io.Writer) (int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(c.BaseURL, "/")+"/api/v1/backup", nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+c.Token)
	hc := *c.http()
	hc.Timeout = 0 // a large state takes longer than one API call; ctx bounds it
	resp, err := hc.Do(req)
	if err != nil {
		return 0, fmt.Errorf("backup from %s: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return 0, errorFrom(resp, data, http.MethodGet, "/api/v1/backup")
	}
	n, err := io.Copy(w, resp.Body)
	if err != nil {
		return n, fmt.Errorf("backup from %s: %w", c.BaseURL, err)
	}
	return n, nil
}
