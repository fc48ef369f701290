package api

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strconv"

	"appliance/fleet"
)

// What the API adds for the deployment semantics an Azure user relies on:
// device resets, paged dry runs, and PUT taking back what GET returned.

// DryRunQuery pages the devices of a dry run (?dryRun=true&category=...
// &after=...&limit=...).
type DryRunQuery struct {
	// Category keeps the devices of one of fleet.PreviewCategories ("":
	// all of them).
	Category string
	After    string
	Limit    int
}

func (q DryRunQuery) values() url.Values {
	v := url.Values{"dryRun": {"true"}}
	if q.Category != "" {
		v.Set("category", q.Category)
	}
	if q.After != "" {
		v.Set("after", q.After)
	}
	if q.Limit > 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	return v
}

// dryRunQuery reads a dry run's paging parameters.
func dryRunQuery(r *http.Request) (DryRunQuery, error) {
	after, limit, err := pageParams(r)
	if err != nil {
		return DryRunQuery{}, err
	}
	q := DryRunQuery{Category: r.URL.Query().Get("category"), After: after, Limit: limit}
	if q.Category != "" && !isPreviewCategory(q.Category) {
		return DryRunQuery{}, fleet.Invalid("category", "must be one of %v; got %q", fleet.PreviewCategories, q.Category)
	}
	return q, nil
}

func isPreviewCategory(c string) bool {
	for _, p := range fleet.PreviewCategories {
		if p == c {
			return true
		}
	}
	return false
}

// DryRunDevice is one device a write would concern: its applied
// deployment now (From) and after (To), "" for none, and what happens
// (Category: fleet.PreviewStart, Switch, Leave, Keep, NoBase).
type DryRunDevice = fleet.PreviewDevice

// roundTrip checks what a GET returned and a PUT sends back: the id in the
// body (named field) must be the path's, and an etag in the body acts as
// If-Match (a header If-Match wins; the two must agree). It returns the
// write options.
func roundTrip(r *http.Request, field, id, etag string) (WriteOptions, error) {
	opts := writeOpts(r)
	if id != "" && id != r.PathValue("id") {
		return opts, fleet.Invalid(field, "is %q but the path names %q: a PUT writes the object the path names", id, r.PathValue("id"))
	}
	if etag = unquoteEtag(etag); etag != "" {
		if opts.IfMatch != "" && opts.IfMatch != etag {
			return opts, fleet.Invalid("etag", "is %q but the If-Match header is %q: give one, or the same", etag, opts.IfMatch)
		}
		if opts.IfNoneMatch == "" {
			opts.IfMatch = etag
		}
	}
	return opts, nil
}

// ReadOnly holds the fields of what a GET returns that a PUT accepts back
// and ignores: the object's times, its derived views, and anything about
// keys. Their values are not checked beyond being JSON.
type ReadOnly = json.RawMessage

func (s *Server) resetDevice(w http.ResponseWriter, r *http.Request) {
	d, err := s.cfg.Backend.ResetDevice(r.Context(), r.PathValue("id"), writeOpts(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	setEtag(w, d.Etag)
	writeJSON(w, http.StatusOK, d)
}

// ResetDevice has a device no deployment targets remove its modules.
func (c *Client) ResetDevice(ctx context.Context, id string, opts WriteOptions) (fleet.Device, error) {
	var d fleet.Device
	_, err := c.do(ctx, http.MethodPost, "/api/v1/devices/"+esc(id)+"/reset", nil, opts, nil, &d)
	return d, err
}
