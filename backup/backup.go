// Package backup is the format of a controller backup and its restore.
//
// A backup is a tar archive: a manifest (appliance-backup.json), the
// replicated state (state.db, a bbolt file at one raft index) and the
// cluster's credentials (the CA with its key, the join token, the admin
// token), so that a restored cluster keeps its identity: agents and
// operators that trust its CA and hold its token go on working. It is
// therefore a secret, written with mode 0600.
//
// Restore turns an archive into the data directory of a new single-node
// cluster holding exactly the backed-up state; other nodes then join it.
package backup

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"appliance/internal/fsutil"
	"appliance/pki"
	"appliance/raftstore"
)

// Format is the archive format version.
const Format = 1

// Names of the archive's entries.
const (
	manifestName   = "appliance-backup.json"
	stateName      = "state.db"
	caCertName     = "tls/ca.crt"
	caKeyName      = "tls/ca.key"
	joinTokenName  = "join-token"
	adminTokenName = "admin-token"
)

// Manifest describes an archive.
type Manifest struct {
	Format        int       `json:"format"`
	CreatedAt     time.Time `json:"createdAt"`
	NodeID        string    `json:"nodeId"`
	AppliedIndex  uint64    `json:"appliedIndex"`
	CAFingerprint string    `json:"caFingerprint"`
	StateSize     int64     `json:"stateSize"`
	StateSHA256   string    `json:"stateSha256"`
}

// Credentials are the cluster secrets an archive carries.
type Credentials struct {
	CACert, CAKey []byte
	JoinToken     string
	AdminToken    string
}

// Write writes an archive: m (its state checksum filled in here) and the
// state read from state, then the credentials.
func Write(w io.Writer, m Manifest, state *os.File, creds Credentials) error {
	st, err := state.Stat()
	if err != nil {
		return fmt.Errorf("backup: stat state: %w", err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(state, 0, st.Size())); err != nil {
		return fmt.Errorf("backup: checksum state: %w", err)
	}
	m.Format = Format
	m.StateSize = st.Size()
	m.StateSHA256 = hex.EncodeToString(h.Sum(nil))
	manifest, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	tw := tar.NewWriter(w)
	add := func(name string, mode int64, size int64, r io.Reader) error {
		hdr := &tar.Header{Name: name, Mode: mode, Size: size, ModTime: m.CreatedAt, Typeflag: tar.TypeReg}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("backup: write %s: %w", name, err)
		}
		if _, err := io.Copy(tw, r); err != nil {
			return fmt.Errorf("backup: write %s: %w", name, err)
		}
		return nil
	}
	bytesEntry := func(name string, data []byte) error {
		return add(name, 0o600, int64(len(data)), bytesReader(data))
	}
	if err := bytesEntry(manifestName, manifest); err != nil {
		return err
	}
	if err := add(stateName, 0o600, st.Size(), io.NewSectionReader(state, 0, st.Size())); err != nil {
		return err
	}
	for _, e := range []struct {
		name string
		data []byte
	}{
		{caCertName, creds.CACert}, {caKeyName, creds.CAKey},
		{joinTokenName, []byte(creds.JoinToken + "\n")}, {adminTokenName, []byte(creds.AdminToken + "\n")},
	} {
		if err := bytesEntry(e.name, e.data); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("backup: finish archive: %w", err)
	}
	return nil
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

// Archive is a checked archive: its manifest and credentials in memory,
// its state extracted to a temporary file.
type Archive struct {
	Manifest    Manifest
	Credentials Credentials
	statePath   string
}

// Close removes the extracted state.
func (a *Archive) Close() error { return os.RemoveAll(filepath.Dir(a.statePath)) }

// Open reads and checks an archive: every entry present, the state's
// size and checksum as the manifest says, the CA parseable and matching
// the join token. A truncated or altered archive is refused with what is
// wrong.
func Open(path string) (*Archive, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open backup: %w", err)
	}
	defer f.Close()
	tmp, err := os.MkdirTemp("", "appliance-restore-")
	if err != nil {
		return nil, err
	}
	a := &Archive{statePath: filepath.Join(tmp, stateName)}
	ok := false
	defer func() {
		if !ok {
			a.Close()
		}
	}()
	seen := map[string][]byte{}
	var stateSum string
	var stateSize int64
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s is not a complete appliance backup (tar: %v)", path, err)
		}
		switch hdr.Name {
		case stateName:
			out, err := os.OpenFile(a.statePath, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
			if err != nil {
				return nil, err
			}
			h := sha256.New()
			n, err := io.Copy(io.MultiWriter(out, h), tr)
			out.Close()
			if err != nil {
				return nil, fmt.Errorf("%s: state.db is cut short: %v", path, err)
			}
			stateSum, stateSize = hex.EncodeToString(h.Sum(nil)), n
			seen[stateName] = nil
		case manifestName, caCertName, caKeyName, joinTokenName, adminTokenName:
			data, err := io.ReadAll(io.LimitReader(tr, 1<<20))
			if err != nil {
				return nil, fmt.Errorf("%s: %s is cut short: %v", path, hdr.Name, err)
			}
			seen[hdr.Name] = data
		}
	}
	for _, name := range []string{manifestName, stateName, caCertName, caKeyName, joinTokenName, adminTokenName} {
		if _, ok := seen[name]; !ok {
			return nil, fmt.Errorf("%s is not a complete appliance backup: %s is missing", path, name)
		}
	}
	if err := json.Unmarshal(seen[manifestName], &a.Manifest); err != nil {
		return nil, fmt.Errorf("%s: %s: %v", path, manifestName, err)
	}
	m := a.Manifest
	if m.Format != Format {
		return nil, fmt.Errorf("%s: backup format %d, this version reads %d", path, m.Format, Format)
	}
	if stateSize != m.StateSize || stateSum != m.StateSHA256 {
		return nil, fmt.Errorf("%s: state.db does not match the manifest (size %d, want %d; checksum differs: %v): the archive is damaged",
			path, stateSize, m.StateSize, stateSum != m.StateSHA256)
	}
	a.Credentials = Credentials{
		CACert: seen[caCertName], CAKey: seen[caKeyName],
		JoinToken: trim(seen[joinTokenName]), AdminToken: trim(seen[adminTokenName]),
	}
	ca, err := pki.ParseCA(a.Credentials.CACert, a.Credentials.CAKey)
	if err != nil {
		return nil, fmt.Errorf("%s: cluster CA: %w", path, err)
	}
	fp, _, err := pki.ParseJoinToken(a.Credentials.JoinToken)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if fp != ca.Fingerprint() || fp != m.CAFingerprint {
		return nil, fmt.Errorf("%s: the join token and the CA are of different clusters: the archive is damaged", path)
	}
	if a.Credentials.AdminToken == "" {
		return nil, fmt.Errorf("%s: the admin token is empty", path)
	}
	ok = true
	return a, nil
}

func trim(b []byte) string {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return string(b)
}

// Layout names the files Restore writes; the node package owns the names.
type Layout struct {
	RaftDir, TLSDir, JoinTokenFile, AdminTokenFile string
}

// Restore writes the archive into an empty data directory as a new
// single-node cluster: nodeID, reachable by its peers at raftAdvertise.
// The node's certificate is issued by the node when it first starts.
func (a *Archive) Restore(dataDir string, l Layout, nodeID, raftAdvertise string) error {
	if entries, err := os.ReadDir(dataDir); err == nil && len(entries) > 0 {
		return fmt.Errorf("restore into %s: the directory is not empty; restore into a new data directory", dataDir)
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return fmt.Errorf("restore: create %s: %w", dataDir, err)
	}
	state, err := os.Open(a.statePath)
	if err != nil {
		return err
	}
	defer state.Close()
	if _, err := raftstore.RestoreDir(filepath.Join(dataDir, l.RaftDir), nodeID, raftAdvertise, state); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	tlsDir := filepath.Join(dataDir, l.TLSDir)
	if err := os.MkdirAll(tlsDir, 0o700); err != nil {
		return err
	}
	for _, f := range []struct {
		path string
		data []byte
	}{
		{filepath.Join(tlsDir, "ca.crt"), a.Credentials.CACert},
		{filepath.Join(tlsDir, "ca.key"), a.Credentials.CAKey},
		{filepath.Join(dataDir, l.JoinTokenFile), []byte(a.Credentials.JoinToken + "\n")},
		{filepath.Join(dataDir, l.AdminTokenFile), []byte(a.Credentials.AdminToken + "\n")},
	} {
		if err := fsutil.WriteFileAtomic(f.path, f.data, 0o600); err != nil {
			return fmt.Errorf("restore: write %s: %w", f.path, err)
		}
	}
	return nil
}
