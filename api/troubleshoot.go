package api

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"time"

	"appliance/fleet"
)

// Remote troubleshooting: the agent's own direct methods (module
// $edgeAgent, formats in fleet/agentmethods.go), called through
// InvokeMethod like any module's, so that they take the same path: the
// node holding the device's session, then the session. These helpers are
// what the CLI's `device logs|restart-module|ping|support-bundle` run.

// AgentError is the agent's answer other than 200: its status and
// message (edgeAgent's {"message": ...}).
type AgentError struct {
	Device, Method string
	Status         int
	Message        string
}

func (e *AgentError) Error() string {
	return fmt.Sprintf("device %s: %s: %s (status %d)", e.Device, e.Method, e.Message, e.Status)
}

// callAgent calls one of the agent's methods and returns its payload.
func (c *Client) callAgent(ctx context.Context, deviceID, method string, payload any, timeout time.Duration) (json.RawMessage, error) {
	req := MethodRequest{ResponseTimeoutSeconds: int(timeout / time.Second)}
	if payload != nil {
		b, err := json.Marshal(payload)
		if err != nil {
			return nil, err
		}
		req.Payload = b
	}
	res, err := c.InvokeMethod(ctx, deviceID, fleet.EdgeAgentModule, method, req)
	if err != nil {
		return nil, err
	}
	if res.Status != 200 {
		return nil, &AgentError{Device: deviceID, Method: method, Status: res.Status, Message: fleet.MethodErrorMessage(res.Payload)}
	}
	return res.Payload, nil
}

// PingDevice asks the device's agent to answer (edgeAgent's ping) and
// returns how long the round trip took. A device that is not connected is
// ErrNotConnected's 404 at once.
func (c *Client) PingDevice(ctx context.Context, deviceID string) (time.Duration, error) {
	start := time.Now()
	if _, err := c.callAgent(ctx, deviceID, fleet.MethodPing, nil, MinMethodTimeout); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// RestartModule has the device's agent stop one of its modules and start
// it again (a new process or container start).
func (c *Client) RestartModule(ctx context.Context, deviceID, module string) error {
	_, err := c.callAgent(ctx, deviceID, fleet.MethodRestartModule,
		fleet.RestartModuleRequest{SchemaVersion: fleet.LogsSchemaVersion, ID: module}, DefaultMethodTimeout)
	return err
}

// ModuleLogs reads a module's lines (fleet.AgentLogModule: the agent's
// own log) as the filter selects them, with their times and streams,
// redacted by the agent. truncated: more lines matched than one answer
// holds (fleet.ModuleLogsResponseItem.Truncated says which were kept).
func (c *Client) ModuleLogs(ctx context.Context, deviceID, module string, f fleet.ModuleLogFilter) (lines []fleet.ModuleLogMessage, truncated bool, err error) {
	req := fleet.ModuleLogsRequest{SchemaVersion: fleet.LogsSchemaVersion, ContentType: fleet.LogsContentJSON, Encoding: fleet.LogsEncodingGzip,
		Items: []fleet.LogRequestItem{{ID: "^" + regexp.QuoteMeta(module) + "$", Filter: f}}}
	payload, err := c.callAgent(ctx, deviceID, fleet.MethodGetModuleLogs, req, DefaultMethodTimeout)
	if err != nil {
		return nil, false, err
	}
	var items []fleet.ModuleLogsResponseItem
	if err := json.Unmarshal(payload, &items); err != nil {
		return nil, false, fmt.Errorf("device %s: GetModuleLogs answer: %w", deviceID, err)
	}
	for _, it := range items {
		if it.ID != module {
			continue
		}
		body := []byte(it.Payload)
		if len(it.PayloadBytes) > 0 {
			if body, err = gunzip(it.PayloadBytes); err != nil {
				return nil, false, fmt.Errorf("device %s: GetModuleLogs answer: %w", deviceID, err)
			}
		}
		if len(body) > 0 {
			if err := json.Unmarshal(body, &lines); err != nil {
				return nil, false, fmt.Errorf("device %s: GetModuleLogs answer: %w", deviceID, err)
			}
		}
		return lines, it.Truncated, nil
	}
	return nil, false, &AgentError{Device: deviceID, Method: fleet.MethodGetModuleLogs, Status: 404, Message: "the answer has no logs of module " + module}
}

// SupportBundle has the device's agent make a support bundle (a zip of
// its log, its modules' logs since since, its report and desired document,
// secrets redacted) and writes it to w chunk by chunk, calling progress
// after each; the digest the agent gave is checked. It returns the
// bundle's size and SHA-256 (hex).
func (c *Client) SupportBundle(ctx context.Context, deviceID, since string, w io.Writer, progress func(done, total int64)) (int64, string, error) {
	req := fleet.SupportBundleRequest{SchemaVersion: fleet.LogsSchemaVersion, Since: since}
	h := sha256.New()
	var done int64
	for {
		payload, err := c.callAgent(ctx, deviceID, fleet.MethodGetSupportBundle, req, 2*DefaultMethodTimeout)
		if err != nil {
			return done, "", err
		}
		var chunk fleet.SupportBundleChunkResponse
		if err := json.Unmarshal(payload, &chunk); err != nil {
			return done, "", fmt.Errorf("device %s: GetSupportBundle answer: %w", deviceID, err)
		}
		if chunk.Offset != done || (len(chunk.Data) == 0 && done < chunk.Size) || done+int64(len(chunk.Data)) > chunk.Size {
			return done, "", fmt.Errorf("device %s: GetSupportBundle answered bytes %d+%d of %d when %d were asked for", deviceID, chunk.Offset, len(chunk.Data), chunk.Size, done)
		}
		if _, err := w.Write(chunk.Data); err != nil {
			return done, "", err
		}
		h.Write(chunk.Data)
		done += int64(len(chunk.Data))
		if progress != nil {
			progress(done, chunk.Size)
		}
		if done == chunk.Size {
			sum := hex.EncodeToString(h.Sum(nil))
			if sum != chunk.SHA256 {
				return done, "", fmt.Errorf("device %s: the support bundle received does not match its digest (got %s, the agent made %s): ask again", deviceID, sum, chunk.SHA256)
			}
			return done, sum, nil
		}
		req = fleet.SupportBundleRequest{SchemaVersion: fleet.LogsSchemaVersion, ID: chunk.ID, Offset: done}
	}
}

func gunzip(b []byte) ([]byte, error) {
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	defer zr.Close()
	return io.ReadAll(io.LimitReader(zr, 64<<20))
}
