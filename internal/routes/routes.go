// Package routes is an http.ServeMux that remembers the patterns it was
// given, so that a test can walk every route a server serves (its auth,
// its error bodies) and a route added tomorrow is walked the day it is
// added, without anyone updating a list.
package routes

import (
	"net/http"
	"slices"
	"strings"
	"sync"
)

// Mux is an http.ServeMux whose registrations are recorded. Register
// through it only (Handle, HandleFunc): the embedded mux's methods are
// shadowed, so a route cannot be added behind the record's back.
type Mux struct {
	*http.ServeMux

	mu       sync.Mutex
	patterns []string
}

// New returns an empty Mux.
func New() *Mux { return &Mux{ServeMux: http.NewServeMux()} }

// Handle registers h for pattern (http.ServeMux's syntax) and records it.
func (m *Mux) Handle(pattern string, h http.Handler) {
	m.ServeMux.Handle(pattern, h)
	m.mu.Lock()
	m.patterns = append(m.patterns, pattern)
	m.mu.Unlock()
}

// HandleFunc registers f for pattern and records it.
func (m *Mux) HandleFunc(pattern string, f func(http.ResponseWriter, *http.Request)) {
	m.Handle(pattern, http.HandlerFunc(f))
}

// Patterns lists every registered pattern, in registration order.
func (m *Mux) Patterns() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.patterns)
}

// Pattern is the pattern r would be routed to ("" for none).
func (m *Mux) Pattern(r *http.Request) string {
	_, p := m.ServeMux.Handler(r)
	return p
}

// Example builds a request path and method that pattern matches: GET when
// the pattern names no method, each {wildcard} replaced by "x" (a
// {name...} by "x/y"), and a trailing "/" of a subtree pattern followed
// by "x".
func Example(pattern string) (method, path string) {
	method, path = http.MethodGet, pattern
	if m, p, ok := strings.Cut(pattern, " "); ok {
		method, path = m, strings.TrimSpace(p)
	}
	if i := strings.IndexByte(path, '/'); i > 0 { // a host-specific pattern
		path = path[i:]
	}
	segs := strings.Split(path, "/")
	for i, s := range segs {
		switch {
		case s == "{$}":
			segs[i] = ""
		case strings.HasPrefix(s, "{") && strings.HasSuffix(s, "...}"):
			segs[i] = "x/y"
		case strings.HasPrefix(s, "{") && strings.HasSuffix(s, "}"):
			segs[i] = "x"
		}
	}
	path = strings.Join(segs, "/")
	if strings.HasSuffix(path, "/") && !strings.HasSuffix(pattern, "{$}") {
		path += "x"
	}
	return method, path
}
