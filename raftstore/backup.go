package raftstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/hashicorp/raft"
	bolt "go.etcd.io/bbolt"

	"appliance/internal/boltcheck"
	"appliance/raftstore/raftlog"
)

// restoreTerm is the raft term of a restored cluster's first snapshot; the
// node's first election moves it to 2.
const restoreTerm = 1

// keyCurrentTerm is the stable-store key hashicorp/raft keeps its term
// under (unexported there). RestoreDir sets it to restoreTerm so that the
// term on disk is never behind the snapshot's.
var keyCurrentTerm = []byte("CurrentTerm")

// Backup writes a consistent copy of the state machine to w while the store
// runs: the bytes of state.db from one bbolt read transaction, which holds
// the data and the applied index together. It returns that index. On a
// follower the copy may lag the leader; RestoreDir turns it back into a
// raft directory.
func (s *Store) Backup(ctx context.Context, w io.Writer) (index uint64, err error) {
	return s.fsm.backup(ctx, w)
}

// RestoreDir prepares the empty raft directory dir from a Backup so that
// Open on it (Bootstrap not needed) starts a one-voter cluster,
// {nodeID at advertiseAddr}, holding exactly the backed-up state. It writes
// state.db (fsynced), a raft snapshot at the backup's applied index (term 1,
// that configuration) and the raft log (log/) holding the current term, so raft resumes at
// the next index and the node elects itself. advertiseAddr must be the
// address the node will advertise (Config.AdvertiseAddr, or the Stream's
// address), since it is what other nodes joining later will dial (if it
// differs, the node still elects itself, and AddVoter(nodeID, actual) on it
// corrects the configuration). Other nodes join it afresh (AddVoter); they
// must not keep their old raft directories.
//
// It refuses a directory that already holds log/, raft.db, state.db or
// snapshots/, and input that is not a state file written by this package
// ("not an appliance backup"). On failure it removes what it wrote.
func RestoreDir(dir, nodeID, advertiseAddr string, state io.Reader) (index uint64, err error) {
	if dir == "" || nodeID == "" || advertiseAddr == "" {
		return 0, errors.New("restore: dir, node id and advertise address are required")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, fmt.Errorf("restore: create raft dir %s: %w", dir, err)
	}
	statePath := filepath.Join(dir, "state.db")
	logPath := filepath.Join(dir, logDirName)
	snapPath := filepath.Join(dir, "snapshots")
	for _, p := range []string{filepath.Join(dir, boltLogName), logPath, statePath, snapPath} {
		_, err := os.Lstat(p)
		if err == nil {
			return 0, fmt.Errorf("restore: %s already exists: restore needs an empty raft directory", p)
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return 0, fmt.Errorf("restore: check %s: %w", p, err)
		}
	}
	tmp := statePath + ".restore"
	created := []string{tmp}
	defer func() {
		if err != nil {
			for _, p := range created {
				os.RemoveAll(p)
			}
		}
	}()

	if err := writeFileSync(tmp, state); err != nil {
		return 0, fmt.Errorf("restore: write %s: %w", tmp, err)
	}
	index, err = backupIndex(tmp)
	if err != nil {
		return 0, err
	}

	// The snapshot makes raft start at index with this configuration and
	// not ask for entries before it; it is also what raft sends a node that
	// joins later.
	created = append(created, snapPath)
	if err := writeRestoreSnapshot(dir, tmp, index, nodeID, advertiseAddr); err != nil {
		return 0, err
	}
	created = append(created, logPath)
	if err := writeRestoreTerm(logPath); err != nil {
		return 0, err
	}
	// state.db last: with the snapshot in place, a missing state file
	// would still be rebuilt from it, but a state file alone would not do.
	created = append(created, statePath)
	if err := os.Rename(tmp, statePath); err != nil {
		return 0, fmt.Errorf("restore: install %s: %w", statePath, err)
	}
	syncDir(dir)
	return index, nil
}

// backupIndex checks that path is a state file of this package and returns
// its applied index.
func backupIndex(path string) (uint64, error) {
	db, err := boltcheck.Open(path, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		return 0, fmt.Errorf("restore: not an appliance backup (not a bbolt file: %v)", err)
	}
	defer db.Close()
	var idx uint64
	err = boltcheck.Guard(path, func() error {
		return db.View(func(tx *bolt.Tx) error {
			meta := tx.Bucket(bucketMeta)
			if meta == nil {
				return fmt.Errorf("restore: not an appliance backup (a bbolt file without the %q bucket)", bucketMeta)
			}
			v := meta.Get(keyAppliedIndex)
			if len(v) != 8 {
				return fmt.Errorf("restore: not an appliance backup (no %s)", keyAppliedIndex)
			}
			idx = binary.BigEndian.Uint64(v)
			if idx == 0 {
				return fmt.Errorf("restore: not an appliance backup (%s is 0: nothing was ever applied)", keyAppliedIndex)
			}
			return nil
		})
	})
	if err != nil {
		return 0, err
	}
	// An appliance state file: every page must read and its content match
	// its digest (a backup of an earlier release has none yet).
	if _, err := checkStateFile(db); err != nil {
		return 0, fmt.Errorf("restore: the backup is damaged: %w", err)
	}
	return idx, nil
}

func writeRestoreSnapshot(dir, statePath string, index uint64, nodeID, advertiseAddr string) error {
	quiet := newHCLogger(slog.New(slog.DiscardHandler))
	snaps, err := newPrivateSnapshots(dir, 2, quiet)
	if err != nil {
		return fmt.Errorf("restore: open snapshot store in %s: %w", dir, err)
	}
	conf := raft.Configuration{Servers: []raft.Server{{
		Suffrage: raft.Voter, ID: raft.ServerID(nodeID), Address: raft.ServerAddress(advertiseAddr),
	}}}
	// Create also writes the pre-v1 peer list, encoded by a transport; an
	// in-memory one encodes addresses as they are, like the real one.
	_, trans := raft.NewInmemTransport(raft.ServerAddress(advertiseAddr))
	defer trans.Close()
	sink, err := snaps.Create(raft.SnapshotVersionMax, index, restoreTerm, conf, index, trans)
	if err != nil {
		return fmt.Errorf("restore: create snapshot in %s: %w", dir, err)
	}
	f, err := os.Open(statePath)
	if err != nil {
		sink.Cancel()
		return fmt.Errorf("restore: %w", err)
	}
	defer f.Close()
	if _, err := io.Copy(sink, f); err != nil {
		sink.Cancel()
		return fmt.Errorf("restore: write snapshot %s: %w", sink.ID(), err)
	}
	if err := sink.Close(); err != nil {
		return fmt.Errorf("restore: finish snapshot %s: %w", sink.ID(), err)
	}
	return nil
}

func writeRestoreTerm(dir string) error {
	ls, err := raftlog.Open(dir, raftlog.Options{})
	if err != nil {
		return fmt.Errorf("restore: create raft log %s: %w", dir, err)
	}
	if err := ls.SetUint64(keyCurrentTerm, restoreTerm); err != nil {
		ls.Close()
		return fmt.Errorf("restore: set term in %s: %w", dir, err)
	}
	if err := ls.Close(); err != nil {
		return fmt.Errorf("restore: close %s: %w", dir, err)
	}
	return nil
}
