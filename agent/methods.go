package agent

import (
	"archive/zip"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"appliance/fleet"
	"appliance/linelog"
)

// Direct methods. A request arrives on the device's session for a module:
// those addressed to $edgeAgent the agent answers itself (remote
// troubleshooting: GetModuleLogs, RestartModule, ping, GetSupportBundle;
// formats in fleet/agentmethods.go), the others go to the device hub and
// the module. Every request decoded is answered once, on the session.

// handleMethod serves one direct method request from the controller and
// publishes the answer.
func (a *Agent) handleMethod(ctx context.Context, s *session, payload []byte) {
	var req fleet.MethodRequest
	if err := json.Unmarshal(payload, &req); err != nil || req.ID == "" {
		a.log.Warn("direct method request dropped: not a method request with an id", "err", err)
		return
	}
	var resp fleet.MethodResponse
	switch {
	case req.Module == fleet.EdgeAgentModule:
		resp = a.agentMethod(ctx, req)
	case a.edge != nil:
		resp = a.edge.h.InvokeMethod(ctx, req)
	default:
		resp = fleet.MethodResponse{ID: req.ID, Status: fleet.MethodStatusNotConnected,
			Error: fmt.Sprintf("module %q is not connected: this agent runs no device hub (--no-hub)", req.Module)}
	}
	b, err := json.Marshal(resp)
	if err != nil {
		return
	}
	if err := s.publishTo(ctx, fleet.MethodResponseTopic(a.cfg.DeviceID), b); err != nil {
		a.log.Warn("direct method response not sent", "id", req.ID, "module", req.Module, "err", err)
	}
}

// methodError is an answer of the agent's other than 200: its status and
// the message edgeAgent puts in {"message": ...}.
type methodError struct {
	status int
	msg    string
}

func (e *methodError) Error() string { return e.msg }

func badRequest(format string, args ...any) error {
	return &methodError{400, fmt.Sprintf(format, args...)}
}

// agentMethod answers a method addressed to the agent. Names match
// without regard to case, as edgeAgent's.
func (a *Agent) agentMethod(ctx context.Context, req fleet.MethodRequest) fleet.MethodResponse {
	timeout := time.Duration(req.ResponseTimeoutSeconds) * time.Second
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var out any
	var err error
	switch strings.ToLower(req.Method) {
	case strings.ToLower(fleet.MethodPing):
		out = nil
	case strings.ToLower(fleet.MethodGetModuleLogs):
		out, err = a.getModuleLogs(ctx, req.Payload)
	case strings.ToLower(fleet.MethodRestartModule):
		err = a.restartModule(ctx, req.Payload)
	case strings.ToLower(fleet.MethodGetSupportBundle):
		out, err = a.supportBundle(ctx, req.Payload)
	default:
		err = badRequest("Command '%s' not found. The supported commands are - %s, %s, %s, %s", req.Method,
			fleet.MethodPing, fleet.MethodGetModuleLogs, fleet.MethodRestartModule, fleet.MethodGetSupportBundle)
	}
	resp := fleet.MethodResponse{ID: req.ID, Status: 200}
	if err != nil {
		var me *methodError
		if !errors.As(err, &me) {
			me = &methodError{500, err.Error()}
		}
		a.log.Info("direct method refused", "method", req.Method, "status", me.status, "err", me.msg)
		resp.Status = me.status
		out = fleet.MethodErrorPayload{Message: me.msg}
	}
	if out != nil {
		b, merr := json.Marshal(out)
		if merr != nil {
			resp.Status, b = 500, mustMarshal(fleet.MethodErrorPayload{Message: merr.Error()})
		}
		resp.Payload = b
	}
	return resp
}

func mustMarshal(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

// decodePayload reads a method's JSON payload; a request without one gets
// the zero value.
func decodePayload(payload json.RawMessage, v any) error {
	if len(payload) == 0 || string(payload) == "null" {
		return nil
	}
	if err := json.Unmarshal(payload, v); err != nil {
		return badRequest("Error parsing command payload because of error - %v", err)
	}
	return nil
}

// checkSchema accepts schemaVersion 1.x (or none).
func checkSchema(v string) error {
	if v == "" || v == "1" || strings.HasPrefix(v, "1.") {
		return nil
	}
	return badRequest("schemaVersion %q is not supported: this agent understands 1.0", v)
}

// troubleView is what the direct methods read of the Run goroutine's
// state: published by it after each report.
type troubleView struct {
	// modules of the running plan, by name: their instances and types.
	modules map[string]troubleModule
	report  *fleet.ReportedDocument
	// desired is the stored desired document (secrets in it).
	desired []byte
}

type troubleModule struct {
	handle, typ string
}

// publishTroubleView is called by the Run goroutine after each report.
func (a *Agent) publishTroubleView() {
	v := &troubleView{modules: map[string]troubleModule{}, report: a.report.Load(), desired: a.desiredRaw}
	for name, m := range a.rec.modules {
		if m.spec == nil {
			continue
		}
		v.modules[name] = troubleModule{handle: m.handle, typ: m.spec.Type}
	}
	a.troubled.Store(v)
}

func (a *Agent) view() *troubleView {
	if v := a.troubled.Load(); v != nil {
		return v
	}
	return &troubleView{modules: map[string]troubleModule{}}
}

// secrets are what is redacted in what the methods return: the running
// deployment's secrets (fleet.SecretValues) and the agent's own.
func (a *Agent) secrets() []string {
	if s := a.secretsSet.Load(); s != nil {
		return *s
	}
	return nil
}

// setSecrets is called with each plan that becomes the running one.
func (a *Agent) setSecrets(p *plan) {
	s := append([]string(nil), p.secrets...)
	for _, own := range []string{a.cfg.DeviceKey, a.cfg.EnrollToken} {
		if own != "" {
			s = append(s, own)
		}
	}
	slices.SortFunc(s, func(x, y string) int { return len(y) - len(x) })
	a.secretsSet.Store(&s)
}

// ---- RestartModule ----------------------------------------------------------

// restartRequest asks the Run goroutine to restart a module.
type restartRequest struct {
	module string
	done   chan error
}

func (a *Agent) restartModule(ctx context.Context, payload json.RawMessage) error {
	var req fleet.RestartModuleRequest
	if err := decodePayload(payload, &req); err != nil {
		return err
	}
	if err := checkSchema(req.SchemaVersion); err != nil {
		return err
	}
	if req.ID == "" {
		return badRequest("the payload names no module: {\"schemaVersion\": \"1.0\", \"id\": \"<module>\"}")
	}
	rq := restartRequest{module: req.ID, done: make(chan error, 1)}
	select {
	case a.restarts <- rq:
	case <-ctx.Done():
		return fmt.Errorf("module %s was not restarted: the agent was busy applying its deployment for the whole response timeout", req.ID)
	}
	var err error
	select {
	case err = <-rq.done:
	case <-ctx.Done():
		return fmt.Errorf("module %s: the restart did not finish within the response timeout (it goes on)", req.ID)
	}
	switch {
	case errors.Is(err, errModuleUnknown):
		return &methodError{404, fmt.Sprintf("Module %s not found in the current environment", req.ID)}
	case errors.Is(err, errModuleStopped), errors.Is(err, errModuleNotReady):
		return badRequest("module %s %v", req.ID, err)
	case err != nil:
		return fmt.Errorf("module %s was not restarted: %w", req.ID, err)
	}
	return nil
}

// ---- GetModuleLogs ----------------------------------------------------------

// logSource is one module matched by a GetModuleLogs item.
type logSource struct {
	name   string
	filter fleet.ModuleLogFilter
	lf     linelog.Filter
	regex  *regexp.Regexp
}

func (a *Agent) getModuleLogs(ctx context.Context, payload json.RawMessage) ([]fleet.ModuleLogsResponseItem, error) {
	var req fleet.ModuleLogsRequest
	if err := decodePayload(payload, &req); err != nil {
		return nil, err
	}
	if err := checkSchema(req.SchemaVersion); err != nil {
		return nil, err
	}
	if req.Encoding == "" {
		req.Encoding = fleet.LogsEncodingNone
	}
	if req.ContentType == "" {
		req.ContentType = fleet.LogsContentText
	}
	if req.Encoding != fleet.LogsEncodingNone && req.Encoding != fleet.LogsEncodingGzip {
		return nil, badRequest("encoding %q: must be none or gzip", req.Encoding)
	}
	if req.ContentType != fleet.LogsContentText && req.ContentType != fleet.LogsContentJSON {
		return nil, badRequest("contentType %q: must be text or json", req.ContentType)
	}
	if len(req.Items) == 0 {
		return nil, badRequest("items is empty: give [{\"id\": \"<module name regex>\", \"filter\": {...}}]")
	}
	sources, err := a.logSources(req.Items)
	if err != nil {
		return nil, err
	}
	v := a.view()
	secrets := a.secrets()
	entries := make([][]linelog.Entry, len(sources))
	truncated := make([]bool, len(sources))
	for i, src := range sources {
		src.lf.MaxBytes = fleet.MaxMethodResponsePayload
		res, err := a.readLogs(ctx, v, src.name, src.lf)
		if err != nil {
			return nil, fmt.Errorf("logs of %s: %w", src.name, err)
		}
		kept := res.Entries[:0:0]
		for _, e := range res.Entries {
			if src.filter.LogLevel != nil && fleet.LogLevelOf(e.Text) > *src.filter.LogLevel {
				continue
			}
			if src.regex != nil && !src.regex.MatchString(e.Text) {
				continue
			}
			e.Text = fleet.RedactText(strings.ToValidUTF8(e.Text, "\uFFFD"), secrets)
			kept = append(kept, e)
		}
		entries[i], truncated[i] = kept, res.Truncated
	}
	// Fit the answer: drop lines (the oldest, or when reading on from
	// since, the newest) from the largest module until it fits.
	for {
		items := make([]fleet.ModuleLogsResponseItem, len(sources))
		for i, src := range sources {
			items[i] = a.logsItem(src.name, entries[i], req, truncated[i])
		}
		size := len(mustMarshal(items))
		if size <= fleet.MaxMethodResponsePayload {
			return items, nil
		}
		big := 0
		for i := range entries {
			if len(entries[i]) > len(entries[big]) {
				big = i
			}
		}
		n := len(entries[big])
		if n == 0 {
			return nil, errors.New("the answer does not fit a direct method's payload")
		}
		drop := max(1, n*(size-fleet.MaxMethodResponsePayload)/size+n/20)
		drop = min(drop, n)
		if sources[big].lf.Tail == 0 && !sources[big].lf.Since.IsZero() {
			entries[big] = entries[big][:n-drop]
		} else {
			entries[big] = entries[big][drop:]
		}
		truncated[big] = true
	}
}

// logSources matches the items' ids against the module names: the agent's
// own log (edgeAgent) and the running plan's modules, each once, by the
// first item that matches it.
func (a *Agent) logSources(items []fleet.LogRequestItem) ([]logSource, error) {
	now := time.Now()
	names := []string{fleet.AgentLogModule}
	var mods []string
	for name := range a.view().modules {
		if name != fleet.AgentLogModule {
			mods = append(mods, name)
		}
	}
	slices.Sort(mods)
	names = append(names, mods...)
	var out []logSource
	taken := map[string]bool{}
	for i, it := range items {
		re, err := regexp.Compile(it.ID)
		if err != nil {
			return nil, badRequest("items[%d].id %q is not a regular expression: %v", i, it.ID, err)
		}
		f := it.Filter
		lf := linelog.Filter{}
		if f.Tail != nil {
			if *f.Tail < 0 {
				return nil, badRequest("items[%d].filter.tail must not be negative", i)
			}
			lf.Tail = *f.Tail
		}
		if lf.Since, err = fleet.ParseLogTime(f.Since, now); err != nil {
			return nil, badRequest("items[%d].filter.since: %v", i, err)
		}
		if lf.Until, err = fleet.ParseLogTime(f.Until, now); err != nil {
			return nil, badRequest("items[%d].filter.until: %v", i, err)
		}
		var lineRe *regexp.Regexp
		if f.Regex != "" {
			if lineRe, err = regexp.Compile(f.Regex); err != nil {
				return nil, badRequest("items[%d].filter.regex: %v", i, err)
			}
		}
		for _, n := range names {
			if !taken[n] && re.MatchString(n) {
				taken[n] = true
				out = append(out, logSource{name: n, filter: f, lf: lf, regex: lineRe})
			}
		}
	}
	if len(out) == 0 {
		return nil, &methodError{404, fmt.Sprintf("no module matches %s: the running deployment has %s, and the agent's own log is %s",
			describeIDs(items), strings.Join(orNone(mods), ", "), fleet.AgentLogModule)}
	}
	return out, nil
}

func describeIDs(items []fleet.LogRequestItem) string {
	var ids []string
	for _, it := range items {
		ids = append(ids, fmt.Sprintf("%q", it.ID))
	}
	return strings.Join(ids, ", ")
}

func orNone(s []string) []string {
	if len(s) == 0 {
		return []string{"no modules"}
	}
	return s
}

// readLogs reads one module's output, or the agent's own log.
func (a *Agent) readLogs(ctx context.Context, v *troubleView, name string, f linelog.Filter) (linelog.Result, error) {
	if name == fleet.AgentLogModule {
		return linelog.Read(a.cfg.agentLogPath(), f)
	}
	m := v.modules[name]
	r, ok := a.drv.(moduleLogReader)
	if !ok {
		return linelog.Result{}, nil
	}
	return r.moduleLogs(ctx, name, m.handle, f)
}

// logsItem renders one module's lines as the request asks.
func (a *Agent) logsItem(name string, entries []linelog.Entry, req fleet.ModuleLogsRequest, truncated bool) fleet.ModuleLogsResponseItem {
	var body []byte
	if req.ContentType == fleet.LogsContentJSON {
		msgs := make([]fleet.ModuleLogMessage, len(entries))
		for i, e := range entries {
			msgs[i] = fleet.ModuleLogMessage{IoTHub: a.cfg.Hub.Hostname, Device: a.cfg.DeviceID, ID: name,
				Stream: e.Stream, LogLevel: fleet.LogLevelOf(e.Text), Text: e.Text, Timestamp: e.Time}
		}
		body = mustMarshal(msgs)
	} else {
		var b bytes.Buffer
		for _, e := range entries {
			b.WriteString(e.Text)
			b.WriteByte('\n')
		}
		body = b.Bytes()
	}
	item := fleet.ModuleLogsResponseItem{ID: name, Truncated: truncated}
	if req.Encoding == fleet.LogsEncodingGzip {
		var z bytes.Buffer
		zw := gzip.NewWriter(&z)
		_, _ = zw.Write(body)
		_ = zw.Close()
		item.PayloadBytes = z.Bytes()
	} else {
		item.Payload = string(body)
	}
	return item
}

// ---- GetSupportBundle -------------------------------------------------------

// Support bundles are made in memory and kept for a while so that the
// caller can fetch them chunk by chunk.
const (
	bundleTTL      = 10 * time.Minute
	maxBundles     = 2
	bundleLogBytes = 32 << 20 // the newest of each log that a bundle holds
	bundleIDBytes  = 12
)

type bundleCache struct {
	mu      sync.Mutex
	bundles map[string]*bundle
}

type bundle struct {
	data     []byte
	sha256   string
	lastUsed time.Time
}

func (c *bundleCache) get(id string, now time.Time) *bundle {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.expire(now)
	b := c.bundles[id]
	if b != nil {
		b.lastUsed = now
	}
	return b
}

func (c *bundleCache) put(id string, b *bundle, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.expire(now)
	if c.bundles == nil {
		c.bundles = map[string]*bundle{}
	}
	for len(c.bundles) >= maxBundles {
		oldest := ""
		for k, v := range c.bundles {
			if oldest == "" || v.lastUsed.Before(c.bundles[oldest].lastUsed) {
				oldest = k
			}
		}
		delete(c.bundles, oldest)
	}
	c.bundles[id] = b
}

func (c *bundleCache) expire(now time.Time) {
	for k, v := range c.bundles {
		if now.Sub(v.lastUsed) > bundleTTL {
			delete(c.bundles, k)
		}
	}
}

func (a *Agent) supportBundle(ctx context.Context, payload json.RawMessage) (*fleet.SupportBundleChunkResponse, error) {
	var req fleet.SupportBundleRequest
	if err := decodePayload(payload, &req); err != nil {
		return nil, err
	}
	if err := checkSchema(req.SchemaVersion); err != nil {
		return nil, err
	}
	now := time.Now()
	id := req.ID
	var b *bundle
	if id == "" {
		since, err := fleet.ParseLogTime(req.Since, now)
		if err != nil {
			return nil, badRequest("since: %v", err)
		}
		until, err := fleet.ParseLogTime(req.Until, now)
		if err != nil {
			return nil, badRequest("until: %v", err)
		}
		data, err := a.makeBundle(ctx, since, until, now)
		if err != nil {
			return nil, fmt.Errorf("support bundle: %w", err)
		}
		var raw [bundleIDBytes]byte
		_, _ = rand.Read(raw[:])
		id = hex.EncodeToString(raw[:])
		sum := sha256.Sum256(data)
		b = &bundle{data: data, sha256: hex.EncodeToString(sum[:]), lastUsed: now}
		a.bundles.put(id, b, now)
		a.log.Info("support bundle made", "id", id, "bytes", len(data))
	} else if b = a.bundles.get(id, now); b == nil {
		return nil, &methodError{404, fmt.Sprintf("support bundle %s is not kept any more (bundles are kept %s after their last read, %d at most): ask for a new one", id, bundleTTL, maxBundles)}
	}
	if req.Offset < 0 || req.Offset > int64(len(b.data)) {
		return nil, badRequest("offset %d is outside the bundle (%d bytes)", req.Offset, len(b.data))
	}
	end := min(req.Offset+fleet.SupportBundleChunk, int64(len(b.data)))
	return &fleet.SupportBundleChunkResponse{ID: id, Size: int64(len(b.data)), SHA256: b.sha256,
		Offset: req.Offset, Data: b.data[req.Offset:end]}, nil
}

// bundleInfo is device.json in a support bundle.
type bundleInfo struct {
	DeviceID       string    `json:"deviceId"`
	AgentVersion   string    `json:"agentVersion"`
	Runtime        string    `json:"runtime"`
	OS             string    `json:"os"`
	Architecture   string    `json:"architecture"`
	CreatedTimeUTC time.Time `json:"createdTimeUtc"`
	Since          string    `json:"since,omitempty"`
	Until          string    `json:"until,omitempty"`
	Hub            string    `json:"hub"`
	Modules        []string  `json:"modules"`
	Files          []string  `json:"files"`
	Redaction      string    `json:"redaction"`
}

// makeBundle writes the zip: device.json, reported.json (the agent's last
// report), desired.json (the running desired document, as reads show a
// deployment), logs/edgeAgent.log and logs/<module>.log. Every file is
// redacted: the deployment's secrets and whatever looks secret
// (fleet.RedactText), module twins' reported properties as desired ones
// are (fleet.RedactModuleTwinDesired).
func (a *Agent) makeBundle(ctx context.Context, since, until, now time.Time) ([]byte, error) {
	v := a.view()
	secrets := a.secrets()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	info := bundleInfo{DeviceID: a.cfg.DeviceID, AgentVersion: a.cfg.Version, Runtime: a.drv.Name(), OS: runtime.GOOS,
		Architecture: runtime.GOARCH, CreatedTimeUTC: now.UTC(), Hub: "disabled",
		Redaction: "the running deployment's secrets and anything that looks secret are replaced by " + fleet.Redacted}
	if !since.IsZero() {
		info.Since = since.UTC().Format(time.RFC3339Nano)
	}
	if !until.IsZero() {
		info.Until = until.UTC().Format(time.RFC3339Nano)
	}
	if a.edge != nil {
		info.Hub = a.cfg.Hub.Addr
	}
	write := func(name string, data []byte) error {
		w, err := zw.CreateHeader(&zip.FileHeader{Name: name, Method: zip.Deflate, Modified: now})
		if err != nil {
			return err
		}
		_, err = w.Write([]byte(fleet.RedactText(string(data), secrets)))
		info.Files = append(info.Files, name)
		return err
	}
	if v.report != nil {
		rep := *v.report
		if len(rep.ModuleTwins) > 0 {
			twins := make(map[string]json.RawMessage, len(rep.ModuleTwins))
			for k, t := range rep.ModuleTwins {
				twins[k] = fleet.RedactModuleTwinDesired(t)
			}
			rep.ModuleTwins = twins
		}
		b, err := json.MarshalIndent(rep, "", "  ")
		if err != nil {
			return nil, err
		}
		if err := write("reported.json", b); err != nil {
			return nil, err
		}
	}
	if len(v.desired) > 0 {
		if err := write("desired.json", redactedDesired(v.desired)); err != nil {
			return nil, err
		}
	}
	lf := linelog.Filter{Since: since, Until: until, MaxBytes: bundleLogBytes}
	names := []string{fleet.AgentLogModule}
	for name := range v.modules {
		info.Modules = append(info.Modules, name)
		if name != fleet.AgentLogModule {
			names = append(names, name)
		}
	}
	slices.Sort(info.Modules)
	slices.Sort(names[1:])
	for _, name := range names {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		res, err := a.readLogs(ctx, v, name, lf)
		var text bytes.Buffer
		if err != nil {
			fmt.Fprintf(&text, "(the logs could not be read: %v)\n", err)
		}
		if res.Truncated {
			fmt.Fprintf(&text, "(older lines left out: a bundle holds the newest %d MiB of each log)\n", bundleLogBytes>>20)
		}
		for _, e := range res.Entries {
			text.WriteString(e.Time.UTC().Format(time.RFC3339Nano))
			text.WriteByte(' ')
			text.WriteString(e.Stream)
			text.WriteByte(' ')
			text.WriteString(e.Text)
			text.WriteByte('\n')
		}
		if err := write("logs/"+name+".log", text.Bytes()); err != nil {
			return nil, err
		}
	}
	b, err := json.MarshalIndent(info, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := write("device.json", b); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// redactedDesired is a desired document as a read of its deployment shows
// it: modulesContent through fleet.RedactContent.
func redactedDesired(payload []byte) []byte {
	var doc fleet.DesiredDocument
	if err := json.Unmarshal(payload, &doc); err != nil {
		return []byte(`"` + fleet.Redacted + `"`)
	}
	if len(doc.ModulesContent) > 0 {
		wrapped := fleet.RedactContent(json.RawMessage(`{"modulesContent":` + string(doc.ModulesContent) + `}`))
		var c struct {
			ModulesContent json.RawMessage `json:"modulesContent"`
		}
		if json.Unmarshal(wrapped, &c) != nil || len(c.ModulesContent) == 0 {
			c.ModulesContent = json.RawMessage(`"` + fleet.Redacted + `"`)
		}
		doc.ModulesContent = c.ModulesContent
	}
	b, _ := json.MarshalIndent(doc, "", "  ")
	return b
}
