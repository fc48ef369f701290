package ui

import (
	"fmt"
	"io"
	"io/fs"
	"math"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

func serve(t *testing.T, method, path string) *http.Response {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle(Prefix, Handler())
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest(method, path, nil))
	return rec.Result()
}

func TestHandler_ServesFiles(t *testing.T) {
	tests := []struct {
		path, contentType, contains string
	}{
		{"/ui/", "text/html", `name="application-name" content="appliance-dashboard"`},
		{"/ui/app.js", "javascript", "import"},
		{"/ui/lib.js", "javascript", "Authorization"},
		{"/ui/app.css", "text/css", "--healthy"},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			resp := serve(t, http.MethodGet, tt.path)
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d: %s", resp.StatusCode, body)
			}
			if ct := resp.Header.Get("Content-Type"); !strings.Contains(ct, tt.contentType) {
				t.Errorf("Content-Type %q, want %q", ct, tt.contentType)
			}
			if !strings.Contains(string(body), tt.contains) {
				t.Errorf("body lacks %q", tt.contains)
			}
			csp := resp.Header.Get("Content-Security-Policy")
			if !strings.Contains(csp, "default-src 'none'") || !strings.Contains(csp, "connect-src 'self'") {
				t.Errorf("Content-Security-Policy %q", csp)
			}
		})
	}
}

func TestHandler_Refuses(t *testing.T) {
	tests := []struct {
		method, path string
		want         int
	}{
		{http.MethodGet, "/ui/missing.js", http.StatusNotFound},
		{http.MethodPost, "/ui/", http.StatusMethodNotAllowed},
		{http.MethodDelete, "/ui/app.js", http.StatusMethodNotAllowed},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			if got := serve(t, tt.method, tt.path).StatusCode; got != tt.want {
				t.Fatalf("status %d, want %d", got, tt.want)
			}
		})
	}
}

// TestStatic_NothingFromElsewhere keeps the page air-gapped: no file may
// load a script, style, font or image from another origin, and the script
// must not use innerHTML (tags and ids are operator input).
func TestStatic_NothingFromElsewhere(t *testing.T) {
	external := regexp.MustCompile(`(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}|@import|url\(`)
	err := fs.WalkDir(static, "static", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := static.ReadFile(path)
		if err != nil {
			return err
		}
		if m := external.Find(b); m != nil {
			t.Errorf("%s refers to %q", path, m)
		}
		if strings.Contains(string(b), "innerHTML") {
			t.Errorf("%s uses innerHTML", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestStatic_Contrast keeps the text colours the stylesheet pairs with
// backgrounds at WCAG AA (4.5:1 for normal text). A pair names custom
// properties of app.css or literal colours.
func TestStatic_Contrast(t *testing.T) {
	css, err := static.ReadFile("static/app.css")
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{}
	for _, m := range regexp.MustCompile(`(--[a-z-]+):\s*(#[0-9a-fA-F]{6})`).FindAllStringSubmatch(string(css), -1) {
		vars[m[1]] = m[2]
	}
	pairs := [][2]string{
		{"--fg", "--bg"}, {"--fg", "--card"}, {"--muted", "--card"}, {"--muted", "--bg"}, {"--muted", "#fafbfc"},
		{"--accent", "--card"}, {"--accent", "--bg"}, {"#ffffff", "--accent"}, {"#ffffff", "--danger"},
		{"--top-fg", "--top"}, {"#a3adc0", "--top"}, {"--top-fg", "#2c3852"},
		{"--chip-healthy-fg", "--chip-healthy-bg"}, {"--chip-soaking-fg", "--chip-soaking-bg"},
		{"--chip-unhealthy-fg", "--chip-unhealthy-bg"}, {"--chip-unknown-fg", "--chip-unknown-bg"},
		{"--chip-superseded-fg", "--chip-superseded-bg"}, {"--chip-healthy-fg", "--card"}, {"--chip-unhealthy-fg", "--card"},
		{"--muted", "#eef1f7"}, {"--accent", "#eef1f7"}, {"--fg", "#eef1f7"}, {"--fg", "#f7f8fa"},
		{"--chip-unhealthy-fg", "#f7f8fa"}, // stderr lines in a module's output
	}
	for _, p := range pairs {
		fg, bg := colour(t, vars, p[0]), colour(t, vars, p[1])
		if r := contrast(fg, bg); r < 4.5 {
			t.Errorf("%s on %s: contrast %.2f:1, want at least 4.5:1", p[0], p[1], r)
		}
	}
}

func colour(t *testing.T, vars map[string]string, name string) [3]float64 {
	t.Helper()
	hex := name
	if strings.HasPrefix(name, "--") {
		hex = vars[name]
	}
	if len(hex) != 7 {
		t.Fatalf("%s: no colour (%q)", name, hex)
	}
	var rgb [3]float64
	for i := range rgb {
		v, err := strconv.ParseUint(hex[1+2*i:3+2*i], 16, 8)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		rgb[i] = float64(v) / 255
	}
	return rgb
}

// contrast is WCAG 2's contrast ratio of two sRGB colours.
func contrast(a, b [3]float64) float64 {
	lum := func(c [3]float64) float64 {
		var l [3]float64
		for i, v := range c {
			if v <= 0.03928 {
				l[i] = v / 12.92
			} else {
				l[i] = math.Pow((v+0.055)/1.055, 2.4)
			}
		}
		return 0.2126*l[0] + 0.7152*l[1] + 0.0722*l[2]
	}
	la, lb := lum(a), lum(b)
	if la < lb {
		la, lb = lb, la
	}
	return (la + 0.05) / (lb + 0.05)
}

func TestContrast_Known(t *testing.T) {
	for _, tt := range []struct {
		a, b [3]float64
		want float64
	}{{[3]float64{0, 0, 0}, [3]float64{1, 1, 1}, 21}, {[3]float64{1, 1, 1}, [3]float64{1, 1, 1}, 1}} {
		if got := contrast(tt.a, tt.b); fmt.Sprintf("%.2f", got) != fmt.Sprintf("%.2f", tt.want) {
			t.Errorf("contrast %v %v = %.2f, want %.2f", tt.a, tt.b, got, tt.want)
		}
	}
}
