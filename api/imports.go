package api

import (
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
	"appliance/identityfile"
)

// Bulk import and export of device identities, in the format of `az iot
// hub device-identity export` (package identityfile).

// MaxImportLineBytes caps one line of an import: a device with its keys
// and tags is well under 8 KiB (Azure caps a twin's tags at 8 KiB).
const MaxImportLineBytes = 64 << 10

// MaxImportErrors is how many failed lines an answer lists; the rest are
// counted.
const MaxImportErrors = 1000

// importIdleTimeout drops an import whose client sends nothing for this
// long (the whole request may take minutes: a million devices).
const importIdleTimeout = 60 * time.Second

// ImportBackend is what the import and export routes need.
type ImportBackend interface {
	// ImportDevices reads an export file from body, line by line, and
	// creates, upserts or deletes its devices (opts.Mode), in large raft
	// entries. A bad line is a failure of that line and the rest goes on;
	// with opts.Atomic one refuses the whole import (an *ImportRefusedError)
	// and nothing is stored. opts.DryRun changes nothing and says what
	// would happen.
	ImportDevices(ctx context.Context, body io.Reader, opts ImportOptions) (ImportSummary, error)
	// ExportDevices calls fn with every device, in id order, from one
	// consistent read of the replica.
	ExportDevices(ctx context.Context, fn func(fleet.Device) error) error
}

// ImportOptions are POST /api/v1/device-import's query parameters.
type ImportOptions struct {
	// Mode is create (the default: a device that exists fails its line),
	// upsert (create, or replace status, tags and keys; a device already
	// so is left alone, its etag kept) or delete.
	Mode   string `json:"mode"`
	DryRun bool   `json:"dryRun,omitempty"`
	// Atomic: any failed line refuses the whole import; nothing is stored.
	Atomic bool `json:"atomic,omitempty"`
}

// ImportSummary is what an import did (or, dry, would do).
type ImportSummary struct {
	Mode   string `json:"mode"`
	DryRun bool   `json:"dryRun,omitempty"`
	Atomic bool   `json:"atomic,omitempty"`
	// Lines counts the lines read that were not blank.
	Lines     int `json:"lines"`
	Created   int `json:"created"`
	Updated   int `json:"updated"`
	Unchanged int `json:"unchanged"`
	Deleted   int `json:"deleted"`
	Failed    int `json:"failed"`
	// WithoutKeys counts devices created without keys (the line had
	// none): they cannot connect until `device keys regenerate`.
	WithoutKeys int `json:"withoutKeys"`
	// Errors are the failed lines in order, at most MaxImportErrors;
	// ErrorsOmitted counts the others.
	Errors        []ImportError `json:"errors"`
	ErrorsOmitted int           `json:"errorsOmitted,omitempty"`
}

// ImportError is one failed line.
type ImportError struct {
	Line     int    `json:"line"`
	DeviceID string `json:"deviceId,omitempty"`
	Field    string `json:"field,omitempty"`
	Message  string `json:"message"`
}

// ImportRefusedError is an import refused whole (atomic: a line failed;
// nothing was stored). It wraps fleet.ErrInvalid for bad lines, or
// fleet.ErrConflict for devices the state does not allow (create of one
// that exists).
type ImportRefusedError struct {
	Summary ImportSummary
	Err     error
}

func (e *ImportRefusedError) Error() string { return e.Err.Error() }
func (e *ImportRefusedError) Unwrap() error { return e.Err }

// ImportStoppedError is an import that stopped part way (the cluster lost
// its leader, the client went away): the lines before Line may have been
// imported. Running it again with mode upsert resumes it.
type ImportStoppedError struct {
	Summary ImportSummary
	Line    int
	Err     error
}

func (e *ImportStoppedError) Error() string {
	return fmt.Sprintf("import stopped at line %d: %v; the lines before it may have been imported: run it again with --mode upsert to resume (devices already imported are left as they are)", e.Line, e.Err)
}
func (e *ImportStoppedError) Unwrap() error { return e.Err }

// importErrorBody is the error answer of an import: the error and what
// the import did (or found) up to it.
type importErrorBody struct {
	Error  ErrorDetail    `json:"error"`
	Import *ImportSummary `json:"import,omitempty"`
}

func (s *Server) importRoutes() {
	s.mux.Handle("POST /api/v1/device-import", s.auth(s.importDevices))
	s.mux.Handle("GET /api/v1/device-export", s.auth(s.exportDevices))
}

func (s *Server) importDevices(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	opts := ImportOptions{Mode: q.Get("mode")}
	if opts.Mode == "" {
		opts.Mode = "create"
	}
	if opts.Mode != "create" && opts.Mode != "upsert" && opts.Mode != "delete" {
		s.fail(w, r, fleet.Invalid("mode", "must be create, upsert or delete; got %q", opts.Mode))
		return
	}
	var err error
	if opts.DryRun, err = boolParam(r, "dryRun"); err != nil {
		s.fail(w, r, err)
		return
	}
	if opts.Atomic, err = boolParam(r, "atomic"); err != nil {
		s.fail(w, r, err)
		return
	}
	// A million lines take longer than the server's bound on a whole
	// request: that bound is lifted for this route (the caller holds the
	// admin token), and a client that sends nothing for a minute is
	// dropped instead.
	ctl := http.NewResponseController(w)
	_ = ctl.SetWriteDeadline(time.Time{})
	body := &idleDeadlineReader{r: r.Body, ctl: ctl}
	sum, err := s.cfg.Backend.ImportDevices(r.Context(), body, opts)
	_ = ctl.SetWriteDeadline(time.Now().Add(backupChunkTimeout))
	if err == nil {
		writeJSON(w, http.StatusOK, sum)
		return
	}
	var refused *ImportRefusedError
	var stopped *ImportStoppedError
	switch {
	case errors.As(err, &refused):
		s.failImport(w, r, err, &refused.Summary)
	case errors.As(err, &stopped):
		s.failImport(w, r, err, &stopped.Summary)
	default:
		s.fail(w, r, err)
	}
}

// failImport answers an import's error with what it did up to it.
func (s *Server) failImport(w http.ResponseWriter, r *http.Request, err error, sum *ImportSummary) {
	code, word, field, msg := s.classify(r, err)
	writeJSON(w, code, importErrorBody{Error: ErrorDetail{Code: word, Message: msg, Field: field}, Import: sum})
}

// idleDeadlineReader renews the connection's read deadline before each
// read, so a streamed body may take as long as it needs while it moves.
type idleDeadlineReader struct {
	r   io.Reader
	ctl *http.ResponseController
}

func (d *idleDeadlineReader) Read(p []byte) (int, error) {
	_ = d.ctl.SetReadDeadline(time.Now().Add(importIdleTimeout))
	return d.r.Read(p)
}

func (s *Server) exportDevices(w http.ResponseWriter, r *http.Request) {
	ctl := http.NewResponseController(w)
	_ = ctl.SetReadDeadline(time.Time{})
	out := chunkDeadlineWriter{w, ctl}
	started := false
	err := s.cfg.Backend.ExportDevices(r.Context(), func(d fleet.Device) error {
		line, err := identityfile.Line(d)
		if err != nil {
			return err
		}
		if !started {
			w.Header().Set("Content-Type", "application/x-ndjson")
			w.WriteHeader(http.StatusOK)
			started = true
		}
		_, err = out.Write(line)
		return err
	})
	switch {
	case err != nil && !started:
		s.fail(w, r, err)
	case err != nil:
		// The status is sent: cut the stream so that the client sees a
		// broken transfer, never a short file that looks whole.
		s.cfg.Logger.Warn("device export cut short", "err", err)
		panic(http.ErrAbortHandler)
	case !started:
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
	}
}

// ImportDevices streams an export file to the node and returns what the
// import did. A refused or stopped import returns the summary so far
// with an *ImportRefusedError or *ImportStoppedError (rebuilt from the
// answer) wrapping the *Error.
func (c *Client) ImportDevices(ctx context.Context, body io.Reader, opts ImportOptions) (ImportSummary, error) {
	q := url.Values{"mode": {opts.Mode}}
	if opts.DryRun {
		q.Set("dryRun", "true")
	}
	if opts.Atomic {
		q.Set("atomic", "true")
	}
	u := strings.TrimRight(c.BaseURL, "/") + "/api/v1/device-import?" + q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, body)
	if err != nil {
		return ImportSummary{}, err
	}
	req.Header.Set("Content-Type", "application/x-ndjson")
	req.Header.Set("Authorization", "Bearer "+c.Token)
	hc := *c.http()
	hc.Timeout = 0 // a large file takes longer than one API call; ctx bounds it
	resp, err := hc.Do(req)
	if err != nil {
		return ImportSummary{}, fmt.Errorf("import to %s: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return ImportSummary{}, fmt.Errorf("read the answer of the import: %w", err)
	}
	if resp.StatusCode >= 400 {
		apiErr := errorFrom(resp, data, http.MethodPost, "/api/v1/device-import")
		var eb importErrorBody
		if json.Unmarshal(data, &eb) == nil && eb.Import != nil {
			return *eb.Import, &ImportRefusedError{Summary: *eb.Import, Err: apiErr}
		}
		return ImportSummary{}, apiErr
	}
	var sum ImportSummary
	if err := json.Unmarshal(data, &sum); err != nil {
		return ImportSummary{}, fmt.Errorf("decode the answer of the import: %w", err)
	}
	return sum, nil
}

// ExportDevices streams every device's export line into w and returns
// how many lines it wrote. A transfer cut short is an error.
func (c *Client) ExportDevices(ctx context.Context, w io.Writer) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(c.BaseURL, "/")+"/api/v1/device-export", nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+c.Token)
	hc := *c.http()
	hc.Timeout = 0
	resp, err := hc.Do(req)
	if err != nil {
		return 0, fmt.Errorf("export from %s: %w", c.BaseURL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return 0, errorFrom(resp, data, http.MethodGet, "/api/v1/device-export")
	}
	cw := &lineCounter{w: w}
	if _, err := io.Copy(cw, resp.Body); err != nil {
		return cw.lines, fmt.Errorf("export from %s cut short after %d devices: %w", c.BaseURL, cw.lines, err)
	}
	return cw.lines, nil
}

type lineCounter struct {
	w     io.Writer
	lines int
}

func (l *lineCounter) Write(p []byte) (int, error) {
	l.lines += strings.Count(string(p), "\n")
	return l.w.Write(p)
}
