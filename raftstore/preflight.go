package raftstore

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc64"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	bolt "go.etcd.io/bbolt"

	"appliance/internal/boltcheck"
	"appliance/raftstore/raftlog"
)

// Checking the raft directory before raft starts.
//
// raft and raft-boltdb trust their files: a damaged raft.db can make bbolt
// panic or fault inside raft's goroutines, a missing log entry makes raft
// panic when it applies ("log not found"), a configuration entry that does
// not decode panics too, and a snapshot whose metadata no longer parses is
// skipped in silence, so that raft starts from an older one and replays
// entries that compaction removed. None of that can be recovered from
// once raft runs, so Open reads everything raft will read first, under
// boltcheck's guard, and checks that the files agree with each other.
// Anything wrong is a CorruptError: one line naming the file and what to
// do, and the node does not start.

// CorruptError is the error Open returns for damaged or inconsistent
// stored state: the file, what is wrong, and how to recover. It wraps
// ErrCorrupt.
type CorruptError struct {
	File string // the file (or directory) at fault
	Err  error  // what is wrong with it; its text starts with File
	Hint string // what the operator can do
}

func (e *CorruptError) Error() string { return e.Err.Error() + "; " + e.Hint }

func (e *CorruptError) Unwrap() []error { return []error{e.Err, ErrCorrupt} }

// corrupt wraps err (which names file) in a CorruptError with the recovery
// hint that fits the file: the state file can be rebuilt from the log,
// the log and the snapshots only restored or fetched from the cluster.
func corrupt(dir, file string, err error) *CorruptError {
	var ce *CorruptError
	if errors.As(err, &ce) {
		return ce
	}
	hint := fmt.Sprintf("this node will not serve from it. To recover: restore a backup (appliance restore), or, on a cluster, remove %s and rejoin the cluster (appliance serve --join)", dir)
	if filepath.Base(file) == "state.db" {
		hint = fmt.Sprintf("this node will not serve from it. To recover: move it aside (mv %s %s.damaged) and start again to rebuild it from the raft log and snapshots, or restore a backup (appliance restore), or, on a cluster, remove %s and rejoin the cluster (appliance serve --join)", file, file, dir)
	}
	return &CorruptError{File: file, Err: err, Hint: hint}
}

// logFacts is what the checks learned about the log.
type logFacts struct {
	first, last uint64
	lastTerm    uint64
	// lastApplied: the last entry the state machine receives (a command
	// or a configuration); raft's no-ops and barriers never reach it.
	lastApplied uint64
	// entries by index (for the snapshot checks); nil without a log.
	entries map[uint64]entryFact
}

// count is how many entries the log holds.
func (f logFacts) count() uint64 {
	if f.last == 0 {
		return 0
	}
	return f.last - f.first + 1
}

type entryFact struct {
	term uint64
	typ  raft.LogType
	conf *raft.Configuration // for a configuration entry
}

// sameStateAt says whether a state file at index applied holds the state
// at index: at or past it, or short of it only by entries that change no
// state, all still in the log. A snapshot's index is raft's last applied
// entry, and raft's no-ops and barriers count there although they never
// reach the state machine (a snapshot taken just after a leader's no-op
// is ahead of the state file by one): re-installing such a snapshot at
// start, and rebuilding everything derived from it, would change nothing.
func (l logFacts) sameStateAt(applied, index uint64) bool {
	if applied >= index {
		return true
	}
	for i := applied + 1; i <= index; i++ {
		if e, ok := l.entries[i]; !ok || e.changesState() {
			return false
		}
	}
	return true
}

// changesState: the state machine receives the entry.
func (e entryFact) changesState() bool {
	return e.typ == raft.LogCommand || e.typ == raft.LogConfiguration
}

// raftFiles is the outcome of the checks: the log store, opened, and what
// raft will start from.
type raftFiles struct {
	logStore raftLog
	logPath  string // the log store's file or directory, for errors
	log      logFacts
	newest   *raft.SnapshotMeta // nil when there is no snapshot
	// For the check against the state file (agrees).
	tailPath string
	stable   map[string][]byte
	snaps    []snapshotMeta
}

// checkRaftDir checks the raft log and snapshots/ in dir against each
// other, and opens the log store: raftlog in log/, after migrating a
// raft.db it finds there (logstore.go), or raft.db itself when boltLog
// (benchmarks only); agrees then checks them against the state file.
// machineDown says the machine went down during the last run
// (statefile.go), which excuses a write torn at the end of the log. It
// reads nothing of the state file, so it runs beside the state file's own
// checks (Open).
func checkRaftDir(dir string, machineDown, boltLog bool, logger *slog.Logger) (_ *raftFiles, err error) {
	var out *raftFiles
	var stable map[string][]byte
	logPath := filepath.Join(dir, logDirName)
	tailPath := "" // the file holding the log's end, for errors about it
	defer func() {
		if err != nil && out != nil && out.logStore != nil {
			out.logStore.Close()
		}
	}()
	checkBolt := func(raftPath string) (*raftFiles, map[string][]byte, error) {
		return checkBoltLog(dir, raftPath, machineDown)
	}
	if boltLog {
		logPath = filepath.Join(dir, boltLogName)
		if _, err := os.Stat(filepath.Join(dir, logDirName)); err == nil {
			return nil, fmt.Errorf("raftstore: %s holds log/: the raft-boltdb log store is for benchmarks on a directory that never had raftlog", dir)
		}
		if out, stable, err = checkBolt(logPath); err != nil {
			return nil, err
		}
		// Reopen for writing: raft-boltdb commits a transaction when it
		// opens a file for writing, which must not happen to a damaged one.
		out.logStore.Close()
		if out.logStore, err = openLogStore(logPath, false); err != nil {
			return nil, err
		}
	} else {
		if err := migrateBoltLog(dir, checkBolt, logger); err != nil {
			return nil, err
		}
		ls, err := openRaftLog(dir, machineDown, logger)
		if err != nil {
			if errors.Is(err, raftlog.ErrCorrupt) {
				return nil, corrupt(dir, logPath, fmt.Errorf("%w: %w", ErrCorrupt, err))
			}
			return nil, err
		}
		out = &raftFiles{logStore: ls}
		if out.log, err = checkLogEntries(logPath, ls); err != nil {
			return nil, corrupt(dir, logPath, err)
		}
		stable = ls.Stable()
		tailPath = ls.Tail()
		if err := checkStable(logPath, stable, out.log); err != nil {
			return nil, corrupt(dir, logPath, err)
		}
	}
	out.logPath = logPath
	if tailPath == "" {
		tailPath = logPath
	}
	snaps, err := readSnapshotMetas(filepath.Join(dir, "snapshots"))
	if err != nil {
		return nil, corrupt(dir, filepath.Join(dir, "snapshots"), err)
	}
	if len(snaps) > 0 {
		out.newest = &snaps[0].SnapshotMeta
	}
	out.tailPath, out.stable, out.snaps = tailPath, stable, snaps
	return out, nil
}

// agrees checks the raft files against the state machine's applied index
// (checkAgreement).
func (rf *raftFiles) agrees(dir string, applied uint64) error {
	return checkAgreement(dir, rf.tailPath, applied, rf.log, rf.stable, rf.snaps)
}

// checkBoltLog checks raft.db (the previous release's log store) at
// raftPath: every page, every entry, the stable store; it returns it
// opened read-only with what it holds. A missing file is an empty log.
func checkBoltLog(dir, raftPath string, machineDown bool) (*raftFiles, map[string][]byte, error) {
	out := &raftFiles{}
	stable, err := checkLogFile(raftPath, machineDown)
	if err != nil {
		return nil, nil, corrupt(dir, raftPath, err)
	}
	if stable != nil {
		// Read-only first: raft-boltdb commits a transaction when it opens
		// a file for writing, which must not happen to a damaged one.
		ro, err := openLogStore(raftPath, true)
		if err != nil {
			return nil, nil, corrupt(dir, raftPath, err)
		}
		out.logStore = ro
		out.log, err = checkLogEntries(raftPath, ro)
		if err != nil {
			ro.Close()
			return nil, nil, corrupt(dir, raftPath, err)
		}
		if err := checkStable(raftPath, stable, out.log); err != nil {
			ro.Close()
			return nil, nil, corrupt(dir, raftPath, err)
		}
		return out, stable, nil
	}
	// No raft.db: only in the benchmark mode (the migration runs only
	// when there is one). Made by opening it for writing.
	ls, err := openLogStore(raftPath, false)
	if err != nil {
		return nil, nil, err
	}
	out.logStore = ls
	return out, stable, nil
}

// openLogStore opens raft.db (for raft, or read-only to check it), under
// the guard.
func openLogStore(path string, readOnly bool) (*raftboltdb.BoltStore, error) {
	var ls *raftboltdb.BoltStore
	err := boltcheck.Guard(path, func() error {
		var err error
		ls, err = raftboltdb.New(raftboltdb.Options{Path: path,
			BoltOptions: &bolt.Options{ReadOnly: readOnly, Timeout: 5 * time.Second}})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open raft log %s: %w", path, err)
	}
	return ls, nil
}

// checkLogFile reads every page of raft.db (boltcheck) and returns the
// stable store's keys (raft-boltdb's "conf" bucket). A missing file is
// fine (a new node); an empty one is not (bbolt would silently make a new
// log of it).
func checkLogFile(path string, machineDown bool) (map[string][]byte, error) {
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Size() == 0 {
		return nil, fmt.Errorf("%s: %w: the file is empty", path, ErrCorrupt)
	}
	// bbolt falls back to the older meta page when the newer one is
	// damaged, losing the last transaction: entries raft acknowledged, or
	// a vote. Only a write torn by the machine going down excuses that
	// (that write was never acknowledged).
	lost, err := boltcheck.NewestMetaDamaged(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if lost && !machineDown {
		return nil, fmt.Errorf("%s: %w: its newest meta page is damaged, so the last write to the log would be lost", path, ErrCorrupt)
	}
	stable := map[string][]byte{}
	err = boltcheck.Verify(path, func(bucket, key, value []byte) error {
		switch string(bucket) {
		case "conf":
			stable[string(key)] = bytes.Clone(value)
		case "logs":
		default:
			// raft-boltdb keeps two buckets: another name is a damaged one.
			return fmt.Errorf("%s: %w: it holds a bucket raft never writes (%q)", path, ErrCorrupt, bucket)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return stable, nil
}

// checkLogEntries reads every entry raft may read (all of them: raft reads
// the configurations in the log at start, and replays the rest) and checks
// that they run without a gap, that each is stored under its own index,
// that terms never go back, that each checksum matches and that
// configurations decode.
func checkLogEntries(path string, ls raft.LogStore) (logFacts, error) {
	facts := logFacts{entries: map[uint64]entryFact{}}
	err := boltcheck.Guard(path, func() error {
		first, err := ls.FirstIndex()
		if err != nil {
			return err
		}
		last, err := ls.LastIndex()
		if err != nil {
			return err
		}
		facts.first, facts.last = first, last
		if last == 0 {
			return nil
		}
		var l raft.Log
		var prevTerm uint64
		for i := first; i <= last; i++ {
			l = raft.Log{}
			if err := ls.GetLog(i, &l); err != nil {
				if errors.Is(err, raft.ErrLogNotFound) {
					return fmt.Errorf("%w: raft entry %d is missing (the log runs from %d to %d)", ErrCorrupt, i, first, last)
				}
				return fmt.Errorf("%w: raft entry %d does not decode: %v", ErrCorrupt, i, err)
			}
			if l.Index != i {
				return fmt.Errorf("%w: the raft entry stored under index %d says it is entry %d", ErrCorrupt, i, l.Index)
			}
			if l.Term == 0 || l.Term < prevTerm {
				return fmt.Errorf("%w: raft entry %d has term %d after term %d", ErrCorrupt, i, l.Term, prevTerm)
			}
			prevTerm = l.Term
			if err := verifyEntry(&l); err != nil {
				return err
			}
			fact := entryFact{term: l.Term, typ: l.Type}
			switch l.Type {
			case raft.LogCommand, raft.LogNoop, raft.LogBarrier:
			case raft.LogConfiguration:
				conf, err := decodeConfiguration(l.Data)
				if err != nil {
					return fmt.Errorf("%w: raft entry %d: the configuration does not decode: %v", ErrCorrupt, i, err)
				}
				fact.conf = &conf
			default:
				return fmt.Errorf("%w: raft entry %d has type %d, which this cluster never writes", ErrCorrupt, i, l.Type)
			}
			if fact.changesState() {
				facts.lastApplied = i
			}
			facts.entries[i] = fact
		}
		facts.lastTerm = prevTerm
		return nil
	})
	if err != nil {
		if !errors.Is(err, ErrCorrupt) && !errors.Is(err, boltcheck.ErrDamaged) {
			return facts, fmt.Errorf("read the raft log %s: %w", path, err)
		}
		return facts, fmt.Errorf("%s: %w", path, err)
	}
	return facts, nil
}

// decodeConfiguration is raft's DecodeConfiguration, which panics on bad
// input, as an error.
func decodeConfiguration(data []byte) (conf raft.Configuration, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	return raft.DecodeConfiguration(data), nil
}

// The stable store keys raft keeps in raft.db (unexported in raft).
var (
	keyLastVoteTerm = []byte("LastVoteTerm")
	keyLastVoteCand = []byte("LastVoteCand")
)

// checkStable checks raft's term and vote: raft reads them as 8-byte
// integers (a shorter value panics) and its term is never behind its log.
func checkStable(path string, stable map[string][]byte, log logFacts) error {
	for k, v := range stable {
		switch k {
		case string(keyCurrentTerm), string(keyLastVoteTerm):
			if len(v) != 8 {
				return fmt.Errorf("%s: %w: raft's %s is %d bytes, not 8", path, ErrCorrupt, k, len(v))
			}
		case string(keyLastVoteCand):
		default:
			return fmt.Errorf("%s: %w: raft's stable store holds a key it never writes (%q)", path, ErrCorrupt, k)
		}
	}
	term := func(k []byte) uint64 {
		if v, ok := stable[string(k)]; ok {
			return binary.BigEndian.Uint64(v)
		}
		return 0
	}
	current := term(keyCurrentTerm)
	if current < log.lastTerm {
		return fmt.Errorf("%s: %w: raft's current term %d is behind its log's last term %d", path, ErrCorrupt, current, log.lastTerm)
	}
	if vote := term(keyLastVoteTerm); vote > current {
		return fmt.Errorf("%s: %w: raft's last vote is in term %d, after its current term %d", path, ErrCorrupt, vote, current)
	}
	return nil
}

// snapshotMeta is raft's meta.json of a file snapshot.
type snapshotMeta struct {
	raft.SnapshotMeta
	CRC []byte
	dir string
}

const (
	snapshotMetaFile  = "meta.json"
	snapshotStateFile = "state.bin"
)

// readSnapshotMetas reads every snapshot's metadata, newest first as raft
// orders them. raft skips a snapshot whose meta.json it cannot read; here
// a meta.json that does not parse is damage (raft would start from an
// older snapshot in silence). A directory without one is skipped as raft
// skips it; checkAgreement then tells whether raft can start from what
// remains.
func readSnapshotMetas(dir string) ([]snapshotMeta, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", dir, err)
	}
	var metas []snapshotMeta
	for _, e := range entries {
		if !e.IsDir() || strings.HasSuffix(e.Name(), ".tmp") {
			continue // raft ignores files and unfinished snapshots
		}
		m, err := readSnapshotMeta(filepath.Join(dir, e.Name()))
		if errors.Is(err, fs.ErrNotExist) {
			// Not a snapshot (raft skips it too): if it was the newest,
			// the checks of the log against the snapshots that remain
			// say whether raft can still start without it.
			continue
		}
		if err != nil {
			return nil, err
		}
		metas = append(metas, m)
	}
	slices.SortFunc(metas, func(a, b snapshotMeta) int {
		switch {
		case a.Term != b.Term:
			return compare(b.Term, a.Term)
		case a.Index != b.Index:
			return compare(b.Index, a.Index)
		}
		return strings.Compare(b.ID, a.ID)
	})
	return metas, nil
}

func compare(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func readSnapshotMeta(dir string) (snapshotMeta, error) {
	path := filepath.Join(dir, snapshotMetaFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return snapshotMeta{}, err
	}
	if err != nil {
		return snapshotMeta{}, fmt.Errorf("%s: %w: %v", path, ErrCorrupt, err)
	}
	var m snapshotMeta
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return snapshotMeta{}, fmt.Errorf("%s: %w: it does not parse: %v", path, ErrCorrupt, err)
	}
	m.dir = dir
	bad := func(format string, args ...any) (snapshotMeta, error) {
		return snapshotMeta{}, fmt.Errorf("%s: %w: %s", path, ErrCorrupt, fmt.Sprintf(format, args...))
	}
	switch {
	case m.ID != filepath.Base(dir):
		return bad("it names snapshot %q, not %q", m.ID, filepath.Base(dir))
	case m.Version < raft.SnapshotVersionMin || m.Version > raft.SnapshotVersionMax:
		return bad("version %d is not one raft reads", m.Version)
	case m.Index == 0 || m.Term == 0:
		return bad("index %d, term %d", m.Index, m.Term)
	case len(m.CRC) != 8:
		return bad("its checksum is %d bytes, not 8", len(m.CRC))
	case m.ConfigurationIndex > m.Index:
		return bad("its configuration (index %d) is after the snapshot (index %d)", m.ConfigurationIndex, m.Index)
	}
	st, err := os.Stat(filepath.Join(dir, snapshotStateFile))
	if err != nil {
		return bad("%v", err)
	}
	if st.Size() != m.Size {
		return snapshotMeta{}, fmt.Errorf("%s: %w: it is %d bytes, its meta.json says %d", filepath.Join(dir, snapshotStateFile), ErrCorrupt, st.Size(), m.Size)
	}
	return m, nil
}

// checkAgreement checks the state file, the log and the snapshots against
// each other, as raft will use them: raft starts from the newest snapshot
// (installing it unless the state file is at least as new) and replays
// every entry after it, which must all be in the log.
// raftPath is the file holding the end of the log.
func checkAgreement(dir, raftPath string, applied uint64, log logFacts, stable map[string][]byte, snaps []snapshotMeta) error {
	statePath := filepath.Join(dir, "state.db")
	var snapIndex uint64
	if len(snaps) > 0 {
		snapIndex = snaps[0].Index
	}
	if applied > max(log.last, snapIndex) {
		return corrupt(dir, raftPath, fmt.Errorf("%s: %w: the state file %s is at index %d, but the raft log ends at %d and the newest snapshot is at %d: entries the state machine applied are gone from the log",
			raftPath, ErrCorrupt, statePath, applied, log.last, snapIndex))
	}
	if log.last > snapIndex && log.first > snapIndex+1 {
		what := "no snapshot covers them"
		if len(snaps) > 0 {
			what = fmt.Sprintf("the newest snapshot (%s) ends at %d", snaps[0].ID, snapIndex)
		}
		return corrupt(dir, filepath.Join(dir, "snapshots"), fmt.Errorf("%s: %w: the raft log starts at entry %d and %s, so entries %d..%d are nowhere",
			filepath.Join(dir, "snapshots"), ErrCorrupt, log.first, what, snapIndex+1, log.first-1))
	}
	for _, s := range snaps {
		if err := checkSnapshotAgainstLog(s, log, stable); err != nil {
			return corrupt(dir, filepath.Join(s.dir, snapshotMetaFile), err)
		}
	}
	if len(snaps) > 0 && !log.sameStateAt(applied, snapIndex) {
		// raft installs this snapshot at start: it must be whole.
		if err := checkSnapshotContent(snaps[0], log); err != nil {
			return corrupt(dir, filepath.Join(snaps[0].dir, snapshotStateFile), err)
		}
	}
	return nil
}

// checkSnapshotAgainstLog checks a snapshot's metadata against the log
// entries it overlaps and raft's term.
func checkSnapshotAgainstLog(s snapshotMeta, log logFacts, stable map[string][]byte) error {
	path := filepath.Join(s.dir, snapshotMetaFile)
	if v, ok := stable[string(keyCurrentTerm)]; ok && len(v) == 8 && s.Term > binary.BigEndian.Uint64(v) {
		return fmt.Errorf("%s: %w: the snapshot's term %d is after raft's current term %d", path, ErrCorrupt, s.Term, binary.BigEndian.Uint64(v))
	}
	if e, ok := log.entries[s.Index]; ok && e.term != s.Term {
		return fmt.Errorf("%s: %w: the snapshot says entry %d is of term %d, the log says %d", path, ErrCorrupt, s.Index, s.Term, e.term)
	}
	if e, ok := log.entries[s.ConfigurationIndex]; ok && s.Version > 0 {
		if e.conf == nil || !reflect.DeepEqual(*e.conf, s.Configuration) {
			return fmt.Errorf("%s: %w: its configuration differs from the log's entry %d", path, ErrCorrupt, s.ConfigurationIndex)
		}
	}
	return nil
}

// checkSnapshotContent reads a snapshot raft will install: its CRC-64 (as
// raft's snapshot store checks it), its bbolt pages and content digest, and
// that the state it holds is the state at the snapshot's index.
func checkSnapshotContent(s snapshotMeta, log logFacts) error {
	path := filepath.Join(s.dir, snapshotStateFile)
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("%s: %w: %v", path, ErrCorrupt, err)
	}
	h := crc64.New(crc64.MakeTable(crc64.ECMA))
	_, err = io.Copy(h, f)
	f.Close()
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	if !bytes.Equal(h.Sum(nil), s.CRC) {
		return fmt.Errorf("%s: %w: it does not match its CRC-64 in meta.json", path, ErrCorrupt)
	}
	db, err := boltcheck.Open(path, &bolt.Options{ReadOnly: true})
	if err != nil {
		return err
	}
	defer db.Close()
	info, err := checkStateFile(db)
	if err != nil {
		return err
	}
	// The state machine saw every command and configuration up to the
	// snapshot's index: none may lie between what it holds and that index.
	if info.applied > s.Index {
		return fmt.Errorf("%s: %w: it holds the state at index %d, after the snapshot's index %d", path, ErrCorrupt, info.applied, s.Index)
	}
	for i, e := range log.entries {
		if i > info.applied && i <= s.Index && e.changesState() {
			return fmt.Errorf("%s: %w: it holds the state at index %d, but entry %d before its index %d changed the state", path, ErrCorrupt, info.applied, i, s.Index)
		}
	}
	return nil
}
