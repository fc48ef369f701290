package sim

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"appliance/fleet"
)

func TestFailing_ExactShareSpreadEvenly(t *testing.T) {
	tests := []struct {
		devices int
		share   float64
		want    int
	}{
		{50, 0.2, 10},
		{50, 0, 0},
		{50, 1, 50},
		{100, 0.29, 29},
		{10, 0.3, 3},
		{7, 0.5, 3},
		{5000, 0.1, 500},
		{3, 0.1, 0},
	}
	for _, tt := range tests {
		got := 0
		for i := 1; i <= tt.devices; i++ {
			if failing(i, tt.share) {
				got++
			}
		}
		if got != tt.want {
			t.Errorf("%d devices, share %v: %d fail; want %d", tt.devices, tt.share, got, tt.want)
		}
	}
	for _, i := range []int{5, 10, 50} {
		if !failing(i, 0.2) || failing(i-1, 0.2) {
			t.Errorf("share 0.2: device %d should fail and %d not", i, i-1)
		}
	}
}

const content = `{"$edgeAgent":{"properties.desired":{"schemaVersion":"1.1","runtime":{"type":"docker","settings":{}},
  "systemModules":{"edgeAgent":{"type":"docker","settings":{"image":"agent:1"}}},
  "modules":{"b":{"type":"docker","status":"running","settings":{"image":"b:1"}},
             "a":{"type":"docker","settings":{"image":"a:1"}},
             "off":{"type":"docker","status":"stopped","settings":{"image":"off:1"}}}}},
 "$edgeHub":{"properties.desired":{"schemaVersion":"1.1","routes":{}}}}`

func TestBuildReport(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		name      string
		doc       fleet.DesiredDocument
		fail      bool
		wantCode  int
		wantDep   string
		wantState map[string]string // module → runtimeStatus
		wantDesc  string
	}{
		{
			name: "explicit empty desired state", doc: fleet.DesiredDocument{Version: 4},
			wantCode: 200, wantState: map[string]string{},
		},
		{
			name: "modules run", doc: fleet.DesiredDocument{Version: 9, DeploymentID: "d", ModulesContent: json.RawMessage(content)},
			wantCode: 200, wantDep: "d", wantState: map[string]string{"a": "running", "b": "running", "off": "stopped"},
		},
		{
			name: "modules fail", doc: fleet.DesiredDocument{Version: 9, DeploymentID: "d", ModulesContent: json.RawMessage(content)}, fail: true,
			wantCode: 500, wantDep: "d", wantState: map[string]string{"a": "failed", "b": "failed", "off": "stopped"},
			wantDesc: "module a: exited with code 1; module b: exited with code 1",
		},
		{
			name: "a failing device with nothing to run is fine", doc: fleet.DesiredDocument{Version: 4}, fail: true,
			wantCode: 200, wantState: map[string]string{},
		},
		{
			name: "unreadable content is refused", doc: fleet.DesiredDocument{Version: 5, DeploymentID: "d", ModulesContent: json.RawMessage(`{"$edgeAgent":[]}`)},
			wantCode: 400, wantDep: "d", wantState: map[string]string{}, wantDesc: "modulesContent",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mods, err := parseModules(tt.doc.ModulesContent)
			r := buildReport(tt.doc, mods, err, func(string) bool { return tt.fail }, now)
			if r.LastDesiredVersion != tt.doc.Version || r.LastDesiredStatus.Code != tt.wantCode || r.DeploymentID != tt.wantDep ||
				!strings.Contains(r.LastDesiredStatus.Description, tt.wantDesc) || r.Version != AgentVersion || r.Runtime.Platform.OS == "" {
				t.Fatalf("report %+v", r)
			}
			if len(r.Modules) != len(tt.wantState) {
				t.Fatalf("modules %v; want %v", r.Modules, tt.wantState)
			}
			for name, want := range tt.wantState {
				m := r.Modules[name]
				if m.RuntimeStatus != want || m.Settings.Image != name+":1" || m.RestartCount != 0 {
					t.Errorf("module %s: %+v; want %s", name, m, want)
				}
				switch want {
				case fleet.RuntimeFailed:
					if m.ExitCode != FailExitCode || m.LastExitTimeUTC == nil {
						t.Errorf("module %s: %+v", name, m)
					}
				case fleet.RuntimeRunning:
					if m.ExitCode != 0 || m.LastStartTimeUTC == nil || !m.LastStartTimeUTC.Equal(now) {
						t.Errorf("module %s: %+v", name, m)
					}
				}
			}
			wantHealth := "healthy"
			if tt.wantCode == 500 {
				wantHealth = "unhealthy"
			}
			if r.DeviceHealth != wantHealth {
				t.Errorf("deviceHealth %q; want %q", r.DeviceHealth, wantHealth)
			}
			if _, err := json.Marshal(r); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestModuleCache_SharesParses(t *testing.T) {
	var c moduleCache
	a, _ := c.get(json.RawMessage(content))
	b, _ := c.get(json.RawMessage(content))
	if len(a) != 3 || &a[0] != &b[0] {
		t.Fatalf("the same content was parsed twice: %v %v", a, b)
	}
	for i := range moduleCacheSize + 1 {
		c.get(json.RawMessage(`{"$edgeAgent":{"properties.desired":{"modules":{"m` + string(rune('a'+i%26)) + strings.Repeat("x", i) + `":{}}}}}`))
	}
	if len(c.m) > moduleCacheSize {
		t.Fatalf("cache holds %d entries; at most %d", len(c.m), moduleCacheSize)
	}
}

func TestNew_Validates(t *testing.T) {
	ok := Config{Servers: []string{"mqtt://127.0.0.1:1883"}, Devices: 3, EnrollToken: "line.secret"}
	tests := []struct {
		name    string
		change  func(*Config)
		wantErr string
	}{
		{"valid", func(*Config) {}, ""},
		{"no server", func(c *Config) { c.Servers = nil }, "server"},
		{"http server", func(c *Config) { c.Servers = []string{"http://x:1"} }, "scheme"},
		{"no devices", func(c *Config) { c.Devices = 0 }, "at least 1"},
		{"too many devices", func(c *Config) { c.Devices = MaxDevices + 1 }, "at most"},
		{"no token", func(c *Config) { c.EnrollToken = "" }, "token"},
		{"not a token", func(c *Config) { c.EnrollToken = "nodot" }, "enrollment token"},
		{"share above 1", func(c *Config) { c.FailShare = 1.5 }, "fail share"},
		{"negative rate", func(c *Config) { c.ConnectRate = -1 }, "connect rate"},
		{"bad prefix", func(c *Config) { c.Prefix = "a/b" }, "prefix"},
		{"tiny keepalive", func(c *Config) { c.KeepAlive = time.Second }, "keepalive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := ok
			tt.change(&cfg)
			s, err := New(cfg)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if ids := s.DeviceIDs(); len(ids) != 3 || !strings.HasPrefix(ids[0], "sim-") || !strings.HasSuffix(ids[2], "-0003") {
					t.Fatalf("ids %v", ids)
				}
				if s.urls[0].Host != "127.0.0.1:1883" || s.cfg.ConnectRate != DefaultConnectRate {
					t.Fatalf("config %+v", s.cfg)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err %v; want one containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestNew_WideIndexes(t *testing.T) {
	s, err := New(Config{Servers: []string{"mqtt://h"}, Devices: 12345, EnrollToken: "a.b", Prefix: "p"})
	if err != nil {
		t.Fatal(err)
	}
	ids := s.DeviceIDs()
	if ids[0] != "p-00001" || ids[12344] != "p-12345" || s.urls[0].Host != "h:1883" {
		t.Fatalf("ids %s..%s, server %s", ids[0], ids[12344], s.urls[0].Host)
	}
}

// TestFailImage: with a FailImage, a failing device fails only modules
// whose image contains it; a device that does not fail fails nothing.
func TestFailImage(t *testing.T) {
	s := &Sim{cfg: Config{FailImage: ":v2"}}
	bad, good := &device{sim: s, fails: true}, &device{sim: s}
	for _, tc := range []struct {
		d     *device
		image string
		want  bool
	}{
		{bad, "registry/app:v2", true},
		{bad, "registry/app:v1", false},
		{good, "registry/app:v2", false},
	} {
		if got := tc.d.failing()(tc.image); got != tc.want {
			t.Errorf("fails=%v image %s: failing %v, want %v", tc.d.fails, tc.image, got, tc.want)
		}
	}
	s.cfg.FailImage = ""
	if !bad.failing()("registry/app:v1") {
		t.Error("without FailImage a failing device must fail every module")
	}
}
