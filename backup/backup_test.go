package backup_test

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"appliance/backup"
	"appliance/fleet"
	"appliance/internal/testutil"
	"appliance/pki"
	"appliance/raftstore"
)

var layout = backup.Layout{RaftDir: "raft", TLSDir: "tls", JoinTokenFile: "join-token", AdminTokenFile: "admin-token"}

// testLogger sends logs to t.Log while the test runs.
func testLogger(t testing.TB) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type testWriter struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func testContext(t testing.TB) context.Context { return testutil.Context(t) }

func openStore(t testing.TB, cfg raftstore.Config) *raftstore.Store {
	t.Helper()
	cfg.Logger = testLogger(t)
	s, err := raftstore.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	deadline := time.Now().Add(10 * time.Second)
	for !s.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatalf("%s did not elect itself", cfg.NodeID)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return s
}

// devices lists the devices of a replica as id -> tags.
func devices(t testing.TB, s *raftstore.Store) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := s.View(func(r *raftstore.Reader) error {
		return r.Devices("", func(d fleet.Device) bool {
			out[d.ID] = fmt.Sprint(d.Tags)
			return true
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// fixture is a backup of a real single-node store and what it holds.
type fixture struct {
	path    string // the archive
	index   uint64 // its applied index
	devices map[string]string
	ca      *pki.CA
	creds   backup.Credentials
}

// makeBackup runs a one-node cluster, writes some devices, and backs it up
// as a node does.
func makeBackup(t testing.TB) fixture {
	t.Helper()
	ctx := testContext(t)
	s := openStore(t, raftstore.Config{Dir: t.TempDir(), NodeID: "n1", BindAddr: "127.0.0.1:0", Bootstrap: true})
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	for i := range 20 {
		cmd := raftstore.PutDevice{Device: fleet.Device{ID: fmt.Sprintf("dev-%02d", i), Tags: map[string]any{"i": float64(i)}}, Time: at}
		if _, err := s.Apply(ctx, cmd); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Apply(ctx, raftstore.DeleteDevice{ID: "dev-07"}); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	state, err := os.Create(filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	defer state.Close()
	index, err := s.Backup(ctx, state)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := pki.NewCA("home", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := ca.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	secret, err := pki.NewSecret()
	if err != nil {
		t.Fatal(err)
	}
	creds := backup.Credentials{CACert: ca.CertPEM(), CAKey: keyPEM, JoinToken: pki.FormatJoinToken(ca.Fingerprint(), secret), AdminToken: "admin-secret"}
	path := filepath.Join(dir, "backup.tar")
	archive, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer archive.Close()
	m := backup.Manifest{CreatedAt: time.Now().UTC(), NodeID: "n1", AppliedIndex: index, CAFingerprint: ca.Fingerprint()}
	if err := backup.Write(archive, m, state, creds); err != nil {
		t.Fatal(err)
	}
	if err := archive.Close(); err != nil {
		t.Fatal(err)
	}
	return fixture{path: path, index: index, devices: devices(t, s), ca: ca, creds: creds}
}

// freeAddr is a loopback address free now, for a node to bind later.
func freeAddr(t testing.TB) string {
	t.Helper()
	return testutil.FreeAddr(t, "127.0.0.1")
}

// TestArchive_RoundTrip backs up a running store, checks the archive,
// restores it into a new data directory, and starts a node there: it
// elects itself and holds exactly the backed-up devices, and the secrets
// restored are readable by the owner only.
func TestArchive_RoundTrip(t *testing.T) {
	f := makeBackup(t)
	if len(f.devices) != 19 {
		t.Fatalf("fixture holds %d devices, want 19", len(f.devices))
	}

	a, err := backup.Open(f.path)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if a.Manifest.Format != backup.Format || a.Manifest.NodeID != "n1" || a.Manifest.AppliedIndex != f.index || a.Manifest.CAFingerprint != f.ca.Fingerprint() {
		t.Fatalf("manifest %+v", a.Manifest)
	}
	if !bytes.Equal(a.Credentials.CACert, f.creds.CACert) || !bytes.Equal(a.Credentials.CAKey, f.creds.CAKey) ||
		a.Credentials.JoinToken != f.creds.JoinToken || a.Credentials.AdminToken != f.creds.AdminToken {
		t.Fatal("credentials differ from those backed up")
	}

	dataDir := filepath.Join(t.TempDir(), "data")
	addr := freeAddr(t)
	if err := a.Restore(dataDir, layout, "r1", addr); err != nil {
		t.Fatal(err)
	}

	for name, want := range map[string][]byte{
		"tls/ca.crt":  f.creds.CACert,
		"tls/ca.key":  f.creds.CAKey,
		"join-token":  []byte(f.creds.JoinToken + "\n"),
		"admin-token": []byte(f.creds.AdminToken + "\n"),
	} {
		got, err := os.ReadFile(filepath.Join(dataDir, name))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s holds %q, want %q", name, got, want)
		}
	}
	if _, err := pki.ParseCA(f.creds.CACert, f.creds.CAKey); err != nil {
		t.Fatal(err)
	}
	// Every secret is the owner's alone: the files 0600, the directories
	// that hold them (and raft's snapshots) 0700.
	for _, name := range []string{"tls/ca.crt", "tls/ca.key", "join-token", "admin-token", "raft/state.db"} {
		st, err := os.Stat(filepath.Join(dataDir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", name, st.Mode().Perm())
		}
	}
	for _, name := range []string{".", "tls", "raft"} {
		st, err := os.Stat(filepath.Join(dataDir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o700 {
			t.Errorf("directory %s has mode %v, want 0700", name, st.Mode().Perm())
		}
	}

	s := openStore(t, raftstore.Config{Dir: filepath.Join(dataDir, "raft"), NodeID: "r1", BindAddr: addr})
	if got := devices(t, s); fmt.Sprint(got) != fmt.Sprint(f.devices) {
		t.Fatalf("restored devices:\n got %v\nwant %v", got, f.devices)
	}
	if s.AppliedIndex() != f.index {
		t.Fatalf("restored node applied index %d, backup %d", s.AppliedIndex(), f.index)
	}
	ms, err := s.Members(testContext(t))
	if err != nil || len(ms) != 1 || ms[0].ID != "r1" || ms[0].Address != addr || !ms[0].Voter {
		t.Fatalf("members %+v, %v; want r1 alone at %s", ms, err, addr)
	}
	res, err := s.Apply(testContext(t), raftstore.PutDevice{Device: fleet.Device{ID: "after-restore"}, Time: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	if res.Index <= f.index {
		t.Fatalf("a new write at index %d, not after the restored %d", res.Index, f.index)
	}
}

// TestArchive_RestoreIntoNonEmptyDir checks that Restore leaves an
// existing data directory alone.
func TestArchive_RestoreIntoNonEmptyDir(t *testing.T) {
	f := makeBackup(t)
	a, err := backup.Open(f.path)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	dataDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dataDir, "history.db"), []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	err = a.Restore(dataDir, layout, "r1", freeAddr(t))
	if err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Fatalf("Restore into a used directory: %v, want a refusal saying it is not empty", err)
	}
	entries, err := os.ReadDir(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "history.db" {
		t.Fatalf("the refused restore changed the directory: %v", entries)
	}
}

// entry is one file of an archive.
type entry struct {
	hdr  tar.Header
	data []byte
}

// readEntries reads an archive's entries in order.
func readEntries(t testing.TB, archive []byte) []entry {
	t.Helper()
	var out []entry
	tr := tar.NewReader(bytes.NewReader(archive))
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, entry{hdr: *hdr, data: data})
	}
}

// writeEntries writes entries as an archive.
func writeEntries(t testing.TB, es []entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range es {
		hdr := e.hdr
		hdr.Size = int64(len(e.data))
		if err := tw.WriteHeader(&hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(e.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// edit rewrites an archive, passing each entry through fn (nil drops it).
func edit(fn func(t testing.TB, e entry) *entry) func(t testing.TB, archive []byte) []byte {
	return func(t testing.TB, archive []byte) []byte {
		var out []entry
		for _, e := range readEntries(t, archive) {
			if r := fn(t, e); r != nil {
				out = append(out, *r)
			}
		}
		return writeEntries(t, out)
	}
}

// entryOffset is where the bytes of entry name start in an archive.
func entryOffset(t testing.TB, archive []byte, name string) (off, size int64) {
	t.Helper()
	cr := &countingReader{r: bytes.NewReader(archive)}
	tr := tar.NewReader(cr)
	for {
		hdr, err := tr.Next()
		if err != nil {
			t.Fatalf("no %s in the archive: %v", name, err)
		}
		if hdr.Name == name {
			return cr.n, hdr.Size
		}
	}
}

// countingReader hides Seek, so tar reads every byte through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// TestOpen_RefusesDamagedArchives damages a good archive in the ways a
// copy goes wrong, or a file is mistaken for another, and checks that Open
// refuses each with a message naming what is wrong.
func TestOpen_RefusesDamagedArchives(t *testing.T) {
	f := makeBackup(t)
	good, err := os.ReadFile(f.path)
	if err != nil {
		t.Fatal(err)
	}
	otherCA, err := pki.NewCA("other", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	otherKey, err := otherCA.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	secret := f.creds.JoinToken[strings.Index(f.creds.JoinToken, "::")+2:]

	for _, tc := range []struct {
		name   string
		damage func(t testing.TB, archive []byte) []byte
		want   string
	}{
		{
			name: "truncated inside state.db",
			damage: func(t testing.TB, b []byte) []byte {
				off, size := entryOffset(t, b, "state.db")
				return b[:off+size/2]
			},
			want: "state.db is cut short",
		},
		{
			name: "truncated after state.db",
			damage: func(t testing.TB, b []byte) []byte {
				off, size := entryOffset(t, b, "state.db")
				return b[:off+(size+511)/512*512]
			},
			want: "tls/ca.crt is missing",
		},
		{
			name: "truncated inside the manifest",
			damage: func(t testing.TB, b []byte) []byte {
				off, size := entryOffset(t, b, "appliance-backup.json")
				return b[:off+size/2]
			},
			want: "appliance-backup.json is cut short",
		},
		{
			name: "truncated inside the last entry",
			damage: func(t testing.TB, b []byte) []byte {
				off, _ := entryOffset(t, b, "admin-token")
				return b[:off+3]
			},
			want: "admin-token is cut short",
		},
		{
			name: "a byte of state.db flipped",
			damage: func(t testing.TB, b []byte) []byte {
				off, size := entryOffset(t, b, "state.db")
				b = bytes.Clone(b)
				b[off+size/2] ^= 0x40
				return b
			},
			want: "state.db does not match the manifest",
		},
		{
			name: "CA key missing",
			damage: edit(func(t testing.TB, e entry) *entry {
				if e.hdr.Name == "tls/ca.key" {
					return nil
				}
				return &e
			}),
			want: "tls/ca.key is missing",
		},
		{
			name: "admin token missing",
			damage: edit(func(t testing.TB, e entry) *entry {
				if e.hdr.Name == "admin-token" {
					return nil
				}
				return &e
			}),
			want: "admin-token is missing",
		},
		{
			name: "CA of another cluster than the join token",
			damage: edit(func(t testing.TB, e entry) *entry {
				switch e.hdr.Name {
				case "tls/ca.crt":
					e.data = otherCA.CertPEM()
				case "tls/ca.key":
					e.data = otherKey
				}
				return &e
			}),
			want: "the join token and the CA are of different clusters",
		},
		{
			name: "join token of another cluster",
			damage: edit(func(t testing.TB, e entry) *entry {
				if e.hdr.Name == "join-token" {
					e.data = []byte(pki.FormatJoinToken(otherCA.Fingerprint(), secret) + "\n")
				}
				return &e
			}),
			want: "the join token and the CA are of different clusters",
		},
		{
			name: "CA key not the CA's",
			damage: edit(func(t testing.TB, e entry) *entry {
				if e.hdr.Name == "tls/ca.key" {
					e.data = otherKey
				}
				return &e
			}),
			want: "cluster CA",
		},
		{
			name: "format of a newer version",
			damage: edit(func(t testing.TB, e entry) *entry {
				if e.hdr.Name == "appliance-backup.json" {
					var m map[string]any
					if err := json.Unmarshal(e.data, &m); err != nil {
						t.Fatal(err)
					}
					m["format"] = backup.Format + 1
					e.data, _ = json.Marshal(m)
				}
				return &e
			}),
			want: fmt.Sprintf("backup format %d, this version reads %d", backup.Format+1, backup.Format),
		},
		{
			name:   "not a tar file",
			damage: func(t testing.TB, b []byte) []byte { return []byte("this is not a backup\n") },
			want:   "not a complete appliance backup",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "damaged.tar")
			if err := os.WriteFile(path, tc.damage(t, good), 0o600); err != nil {
				t.Fatal(err)
			}
			a, err := backup.Open(path)
			if err == nil {
				a.Close()
				t.Fatalf("Open accepted the damaged archive")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Open: %q, want it to say %q", err, tc.want)
			}
			if !strings.Contains(err.Error(), path) {
				t.Errorf("Open: %q does not name the file", err)
			}
		})
	}
}

// TestWrite_EntriesAreOwnerOnly checks the archive's entries carry mode
// 0600, so extracting one by hand keeps the secret private.
func TestWrite_EntriesAreOwnerOnly(t *testing.T) {
	f := makeBackup(t)
	data, err := os.ReadFile(f.path)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range readEntries(t, data) {
		names = append(names, e.hdr.Name)
		if fs.FileMode(e.hdr.Mode).Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", e.hdr.Name, fs.FileMode(e.hdr.Mode).Perm())
		}
	}
	sort.Strings(names)
	want := []string{"admin-token", "appliance-backup.json", "join-token", "state.db", "tls/ca.crt", "tls/ca.key"}
	if fmt.Sprint(names) != fmt.Sprint(want) {
		t.Fatalf("entries %v, want %v", names, want)
	}
}
