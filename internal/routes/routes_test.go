package routes

import (
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
)

func TestMux_RecordsAndRoutes(t *testing.T) {
	m := New()
	ok := func(http.ResponseWriter, *http.Request) {}
	patterns := []string{
		"GET /healthz", "PUT /api/v1/devices/{id}", "POST /api/v1/devices/{id}/keys/regenerate",
		"GET /files/{path...}", "/api/", "/ui/", "GET /exact/{$}",
	}
	for _, p := range patterns {
		m.HandleFunc(p, ok)
	}
	if got := m.Patterns(); !slices.Equal(got, patterns) {
		t.Fatalf("Patterns() = %q, want %q", got, patterns)
	}
	for _, p := range patterns {
		method, path := Example(p)
		r := httptest.NewRequest(method, path, nil)
		if got := m.Pattern(r); got != p {
			t.Errorf("Example(%q) = %s %s, routed to %q", p, method, path, got)
		}
	}
	if got := m.Pattern(httptest.NewRequest(http.MethodGet, "/nowhere", nil)); got != "" {
		t.Errorf("an unrouted path matched %q", got)
	}
}
