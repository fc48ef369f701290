package northbound

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"appliance/internal/fsutil"
)

// The consumers' sessions and their streams' places survive a restart of
// the node, in sessions.json: the whole state, rewritten atomically (a
// temporary file, fsync, rename) whenever a session's subscriptions change
// (before its SUBACK) and, for the streams' places, at most once a second
// (and at Close). After a crash a stream resumes up to a second behind:
// its consumer gets those messages again (at-least-once). The state is
// small (at most Limits.MaxSessions sessions), so one file, written whole,
// is simpler and sturdier than a database.
//
// The file is JSON followed by a line holding the CRC-32C of the JSON. One
// that does not check out is refused at open, naming it and the way out,
// never read as sessions with other subscriptions or other places.

// ErrDamagedState: sessions.json is damaged.
var ErrDamagedState = errors.New("damaged consumer sessions")

const stateVersion = 1

type stateFile struct {
	Version  int               `json:"version"`
	Sessions []sessionRecord   `json:"sessions"`
	Cursors  map[string]uint64 `json:"cursors"`
}

type stateStore struct {
	path string

	mu       sync.Mutex
	sessions map[string]sessionRecord // by sessionKey.bytes
	cursors  map[string]uint64
}

// openState reads sessions.json (none: no sessions yet).
func openState(path string) (*stateStore, error) {
	st := &stateStore{path: path, sessions: map[string]sessionRecord{}, cursors: map[string]uint64{}}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open the consumers' sessions %s: %w", path, err)
	}
	f, err := decodeState(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %v; this node will not start on it. To recover: move it aside (mv %s %s.damaged): consumers' persistent sessions then start anew, with the messages that arrive from then on",
			path, ErrDamagedState, err, path, path)
	}
	for _, rec := range f.Sessions {
		st.sessions[string(sessionKey{rec.Consumer, rec.ClientID}.bytes())] = rec
	}
	if f.Cursors != nil {
		st.cursors = f.Cursors
	}
	return st, nil
}

func decodeState(data []byte) (stateFile, error) {
	var f stateFile
	body, sum, ok := bytes.Cut(bytes.TrimRight(data, "\n"), []byte("\ncrc32c "))
	if !ok {
		return f, errors.New("no checksum line (cut short?)")
	}
	want, err := hex.DecodeString(string(sum))
	if err != nil || len(want) != 4 {
		return f, errors.New("a malformed checksum line")
	}
	if got := crc32.Checksum(body, crcTable); got != uint32(want[0])<<24|uint32(want[1])<<16|uint32(want[2])<<8|uint32(want[3]) {
		return f, errors.New("checksum mismatch")
	}
	if err := json.Unmarshal(body, &f); err != nil {
		return f, err
	}
	if f.Version != stateVersion {
		return f, fmt.Errorf("version %d; this build reads %d", f.Version, stateVersion)
	}
	return f, nil
}

// writeLocked writes the whole state; st.mu held.
func (st *stateStore) writeLocked() error {
	f := stateFile{Version: stateVersion, Cursors: st.cursors}
	keys := make([]string, 0, len(st.sessions))
	for k := range st.sessions {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		f.Sessions = append(f.Sessions, st.sessions[k])
	}
	body, err := json.Marshal(f)
	if err != nil {
		return err
	}
	out := fmt.Appendf(body, "\ncrc32c %08x\n", crc32.Checksum(body, crcTable))
	return fsutil.WriteFileAtomic(st.path, out, 0o600)
}

func (st *stateStore) close() error { return nil }

// sessionRecord is a persistent session as stored.
type sessionRecord struct {
	Consumer     string      `json:"consumer"`
	ClientID     string      `json:"clientId"`
	ExpirySecs   uint32      `json:"expirySecs"`
	Subs         []subRecord `json:"subs,omitempty"`
	Disconnected time.Time   `json:"disconnected,omitzero"`
}

type subRecord struct {
	Filter string `json:"filter"`
	Group  string `json:"group,omitempty"`
	QoS    byte   `json:"qos"`
}

func (k sessionKey) bytes() []byte { return []byte(k.consumer + "\x00" + k.clientID) }

func (st *stateStore) putSession(k sessionKey, rec sessionRecord) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.sessions[string(k.bytes())] = rec
	return st.writeLocked()
}

func (st *stateStore) deleteSession(k sessionKey, streams []string) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	_, had := st.sessions[string(k.bytes())]
	delete(st.sessions, string(k.bytes()))
	for _, id := range streams {
		if _, ok := st.cursors[id]; ok {
			had = true
			delete(st.cursors, id)
		}
	}
	if !had {
		return nil
	}
	return st.writeLocked()
}

func (st *stateStore) deleteStreams(ids []string) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	changed := false
	for _, id := range ids {
		if _, ok := st.cursors[id]; ok {
			changed = true
			delete(st.cursors, id)
		}
	}
	if !changed {
		return nil
	}
	return st.writeLocked()
}

// putCursors stores streams' places.
func (st *stateStore) putCursors(cursors map[string]uint64) error {
	if len(cursors) == 0 {
		return nil
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	for id, c := range cursors {
		st.cursors[id] = c
	}
	return st.writeLocked()
}

// load returns every session and stream place read at open.
func (st *stateStore) load() (sessions []sessionRecord, cursors map[string]uint64, err error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, rec := range st.sessions {
		sessions = append(sessions, rec)
	}
	slices.SortFunc(sessions, func(a, b sessionRecord) int {
		return strings.Compare(a.Consumer+"\x00"+a.ClientID, b.Consumer+"\x00"+b.ClientID)
	})
	cursors = make(map[string]uint64, len(st.cursors))
	for id, c := range st.cursors {
		cursors[id] = c
	}
	return sessions, cursors, nil
}
