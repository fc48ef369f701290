package raftstore

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	bolt "go.etcd.io/bbolt"

	"appliance/fleet"
	"appliance/internal/boltcheck"
)

// Bucket names of the state machine's bbolt file.
var (
	bucketMeta        = []byte("meta")
	bucketDevices     = []byte("devices")
	bucketDeployments = []byte("deployments")
	bucketReports     = []byte("reports")
	bucketEnrollments = []byte("enrollments")

	keyAppliedIndex = []byte("appliedIndex")
	keyAdminToken   = []byte("adminToken")
	keyJoinToken    = []byte("joinToken")
)

// ChangeKind says what one applied command did.
type ChangeKind int

const (
	DevicePut ChangeKind = iota + 1
	DeviceDeleted
	DeploymentPut
	DeploymentDeleted
	ReportPut
	AdminTokenSet    // Secret is the new admin token
	JoinTokenSet     // Secret is the new join token
	NodeCertsChanged // a node's certificate was bound or revoked (ID: the node)
	RolloutAdmitted  // devices were admitted to a rollout (ID: the deployment; Admitted, Rollout)
	RolloutChanged   // a rollout's state changed (ID: the deployment; Rollout, Action)
	ConsumerDeleted  // a consumer credential was deleted (ID: its name)
	DeviceReset      // a device was reset (Device: the new state, its ResetIndex the entry's index)
)

// Change is one effect of an applied command, published to the Observer in
// log order after the batch that holds it is committed to bbolt.
type Change struct {
	Index uint64
	Kind  ChangeKind
	ID    string
	// Time and Actor of the command, for history (deployments only).
	Time  time.Time
	Actor string
	// Created tells a DeploymentPut that made a new deployment.
	Created bool
	// CredentialsChanged tells a DevicePut that replaced the device's
	// keys or changed its status: sessions opened with what it had before
	// must be checked again.
	CredentialsChanged bool
	// Imported tells a DevicePut or DeviceDeleted made by a bulk import
	// (ImportDevices, FinishImport): one entry holds thousands of them.
	Imported   bool
	Device     *fleet.Device     // the new state, for DevicePut
	Deployment *fleet.Deployment // the new state, for DeploymentPut
	Secret     string            // the new token, for AdminTokenSet and JoinTokenSet: never log it
	// Rollout is the deployment's rollout after the command, for a
	// DeploymentPut of a deployment that has one, RolloutAdmitted and
	// RolloutChanged.
	Rollout *fleet.Rollout
	// Admitted are the devices a RolloutAdmitted admitted; Action is what
	// a RolloutChanged did (fleet.RolloutStartWave ...).
	Admitted []RolloutAdmission
	Action   string
}

// Observer follows the state machine. Its methods run on raft's apply
// goroutine (Restored also in Open), so they must be quick and must not
// call back into Apply.
type Observer interface {
	// Applied receives the changes of one committed batch, in log order.
	Applied(changes []Change)
	// Restored says the whole state was replaced (at open, or a snapshot
	// was installed): derived state must be rebuilt from r. An error (a
	// read failed) means the derived state is incomplete: Open fails with
	// it, and after a snapshot install the state machine stops (Halted).
	Restored(r *Reader) error
	// Halted says the state machine stopped for good: it found damaged
	// state (an error wrapping ErrCorrupt) or could not write its file, and
	// applies nothing more. Derived state may be behind or incomplete: the
	// node must stop serving from it. Called once.
	Halted(err error)
}

// ErrStopped is wrapped by the result of every entry the state machine
// did not apply because it stopped (see Observer.Halted).
var ErrStopped = errors.New("the state machine has stopped: this node applies no more entries")

// Result is what Apply returns for one command. Err carries a rule
// rejection (not found, precondition failed, immutable content): the entry
// is in the log but changed nothing.
type Result struct {
	Index   uint64
	Created bool
	// Stored counts the reports a PutReports stored.
	Stored     int
	Device     *fleet.Device
	Deployment *fleet.Deployment
	Enrollment *fleet.Enrollment
	Consumer   *fleet.Consumer
	// Revoked lists the devices whose keys a revocation cleared.
	Revoked []string
	// Import is what an ImportDevices or FinishImport did.
	Import *ImportResult
	Err    error
}

// fsm is the replicated state machine: a bbolt file holding devices and
// deployments together with the index of the last applied log entry, written
// in the same transaction so that replaying the log after a crash is safe.
type fsm struct {
	path     string
	logger   *slog.Logger
	observer Observer
	// noSync: commits skip fsync, the file is synced at close (statefile.go).
	noSync bool
	// unlock releases the state file's lock (statefile.go), after close.
	unlock func() error
	// machineDown: the machine went down while the previous run had the
	// state file open (statefile.go); a write torn at the end of the raft
	// log is expected.
	machineDown bool
	// logPath is the raft log store's file or directory, for errors.
	logPath string
	// sizes follows the bytes of the log since the last snapshot
	// (compact.go); nil until Open sets it.
	sizes *logSizes
	// stopped is set (once, on raft's apply goroutine, or in Restore) when
	// the state machine stops (stop): an entry holds a command this build
	// cannot apply, or damaged state was found. From then on nothing is
	// applied and no snapshot is taken, so the state file stays exactly at
	// the entry before, and a newer build (or a repaired file) resumes
	// there. onHalt is told; it must not block.
	stopped atomic.Pointer[error]
	onHalt  func(error)

	// mu guards db against the swap in Restore; apply and reads take it shared.
	mu sync.RWMutex
	db *bolt.DB

	appliedMu   sync.Mutex
	appliedCond *sync.Cond
	applied     uint64
	// closed: the store shut down, applied will not move again.
	closed bool

	// version is this build's, for the halt's message.
	version string
	// decode reads an entry's command: Decode, or a test's stand-in for
	// a newer release's (Config.decode).
	decode func(entry []byte) (Command, error)
}

var _ raft.BatchingFSM = (*fsm)(nil)

// openFSM opens the state file at path; bootID tells a machine crash from a
// process crash (statefile.go), nil means readBootID.
func openFSM(path string, observer Observer, logger *slog.Logger, bootID func() (string, error)) (*fsm, error) {
	f, err := claimFSM(path, observer, logger, bootID)
	if err != nil {
		return nil, err
	}
	if err := f.open(); err != nil {
		return nil, err
	}
	return f, nil
}

// claimFSM takes the state file at path for this process (its lock and
// open marker, statefile.go): whether the machine went down during the
// last run is known from here on. open then opens and checks the file.
func claimFSM(path string, observer Observer, logger *slog.Logger, bootID func() (string, error)) (*fsm, error) {
	if bootID == nil {
		bootID = readBootID
	}
	unlock, err := lockFile(path + lockSuffix)
	switch {
	case errors.Is(err, errLocked):
		return nil, fmt.Errorf("state file %s is in use by another process (it holds %s): is another node running on this data directory?", path, path+lockSuffix)
	case errors.Is(err, errLockUnsupported):
		// Sync every commit: without the lock the open marker could be
		// another process's.
		lockErr := err
		unlock = func() error { return nil }
		bootID = func() (string, error) { return "", lockErr }
	case err != nil:
		return nil, fmt.Errorf("lock state file: %w", err)
	}
	noSync, machineDown, err := claimStateFile(path, bootID, logger)
	if err != nil {
		unlock()
		return nil, err
	}
	f := &fsm{path: path, logger: logger, observer: observer, noSync: noSync, unlock: unlock, machineDown: machineDown, decode: Decode,
		logPath: filepath.Join(filepath.Dir(path), logDirName)}
	f.appliedCond = sync.NewCond(&f.appliedMu)
	return f, nil
}

// open opens and checks the claimed state file (openStateDB); on an error
// it lets go of the claim.
func (f *fsm) open() error {
	db, info, err := openStateDB(f.path, f.noSync, f.logger, nil)
	if err != nil {
		f.unlock()
		return err
	}
	f.db = db
	f.applied = info.applied
	return nil
}

// openStateDB opens a state file: unless trusted (a file just checked),
// it reads every page and checks the content against its digest
// (digest.go) before anything writes to it, then creates missing buckets
// and, for a file of an earlier release, stores its digest. Damage is an
// error wrapping boltcheck.ErrDamaged, naming the file; nothing of the
// file is changed then.
func openStateDB(path string, noSync bool, logger *slog.Logger, trusted *stateInfo) (*bolt.DB, stateInfo, error) {
	if st, err := os.Stat(path); err == nil && st.Size() == 0 {
		// bbolt would silently make a new, empty state of it.
		return nil, stateInfo{}, fmt.Errorf("%s: %w: the file is empty", path, boltcheck.ErrDamaged)
	}
	db, err := boltcheck.Open(path, &bolt.Options{NoSync: noSync})
	if err != nil {
		return nil, stateInfo{}, stateFileError(path, err)
	}
	var info stateInfo
	if trusted != nil {
		info = *trusted
		info.migrate = false
	} else if info, err = checkStateFile(db); err != nil {
		db.Close()
		return nil, stateInfo{}, stateFileError(path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketDevices, bucketDeployments, bucketReports, bucketEnrollments} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil && info.migrate {
		err = storeDigest(db, info)
		if err == nil && info.applied > 0 {
			logger.Info("the state file had no content digest (written by an earlier release): computed and stored it",
				"file", path, "applied_index", info.applied)
		}
	}
	if err != nil {
		db.Close()
		return nil, stateInfo{}, fmt.Errorf("init state db %s: %w", path, err)
	}
	return db, info, nil
}

// stateFileError keeps a damage report as it is (it names the file) and
// says which file any other error is about.
func stateFileError(path string, err error) error {
	if isDamage(err) {
		return err
	}
	return fmt.Errorf("open state db %s: %w", path, err)
}

// isDamage tells errors about damaged stored state.
func isDamage(err error) bool {
	return errors.Is(err, ErrCorrupt) || errors.Is(err, boltcheck.ErrDamaged)
}

// readAppliedIndex reads meta/appliedIndex of an open state file.
func readAppliedIndex(db *bolt.DB) (uint64, error) {
	var idx uint64
	err := db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get(keyAppliedIndex); len(v) == 8 {
			idx = binary.BigEndian.Uint64(v)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("read applied index: %w", err)
	}
	return idx, nil
}

// visibleIndex is the highest applied index a reader may already have
// seen. ApplyBatch commits its bbolt transaction (readers see the new data
// at once) before it publishes the index in memory (setApplied), so in
// between the in-memory index lags what a read returns; a read index taken
// from it would let a follower serve older data than the leader just did.
// The index committed in state.db, read in a fresh transaction, covers
// everything visible.
func (f *fsm) visibleIndex() (uint64, error) {
	idx := f.AppliedIndex()
	err := f.view(func(r *Reader) error {
		idx = max(idx, r.AppliedIndex())
		return nil
	})
	return idx, err
}

// AppliedIndex is the index of the last log entry reflected in the state.
func (f *fsm) AppliedIndex() uint64 {
	f.appliedMu.Lock()
	defer f.appliedMu.Unlock()
	return f.applied
}

func (f *fsm) setApplied(idx uint64) {
	f.appliedMu.Lock()
	f.applied = idx
	f.appliedMu.Unlock()
	f.appliedCond.Broadcast()
}

// waitApplied blocks until applied reaches index, ctx ends, or the store
// closes.
func (f *fsm) waitApplied(ctx context.Context, index uint64) error {
	f.appliedMu.Lock()
	defer f.appliedMu.Unlock()
	if f.applied >= index {
		return nil
	}
	// A sync.Cond cannot select on ctx, so ctx's end broadcasts. Taking the
	// lock first orders that broadcast after a waiter's ctx check, so the
	// wake-up cannot fall between the check and Wait. stop (deferred, runs
	// first) unregisters it: no goroutine outlives the call.
	stop := context.AfterFunc(ctx, func() {
		f.appliedMu.Lock()
		f.appliedMu.Unlock()
		f.appliedCond.Broadcast()
	})
	defer stop()
	for f.applied < index {
		if f.closed {
			return fmt.Errorf("wait for index %d to apply: %w", index, ErrClosed)
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("wait for index %d to apply (applied %d): %w", index, f.applied, err)
		}
		f.appliedCond.Wait()
	}
	return nil
}

// stopWaiters releases waitApplied callers for good: the store is closing.
func (f *fsm) stopWaiters() {
	f.appliedMu.Lock()
	f.closed = true
	f.appliedMu.Unlock()
	f.appliedCond.Broadcast()
}

// backup writes a consistent copy of the state file, from one read
// transaction, and returns the applied index it holds.
func (f *fsm) backup(ctx context.Context, w io.Writer) (uint64, error) {
	f.mu.RLock()
	tx, err := f.db.Begin(false)
	// As in Snapshot, the open transaction keeps the file mapped: a
	// concurrent Restore waits for it in db.Close.
	f.mu.RUnlock()
	if err != nil {
		return 0, fmt.Errorf("backup %s: begin read tx: %w", f.path, err)
	}
	defer tx.Rollback()
	idx := (&Reader{tx: tx}).AppliedIndex()
	if _, err := tx.WriteTo(ctxWriter{ctx: ctx, w: w}); err != nil {
		return 0, fmt.Errorf("backup %s: %w", f.path, err)
	}
	return idx, nil
}

// ctxWriter stops a long copy when its context ends.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c ctxWriter) Write(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.w.Write(p)
}

// Apply applies a single entry; raft uses ApplyBatch, this is for completeness.
func (f *fsm) Apply(l *raft.Log) interface{} {
	return f.ApplyBatch([]*raft.Log{l})[0]
}

// ApplyBatch applies committed entries in one bbolt transaction, together
// with the new applied index and content digest. Entries at or below the
// stored applied index were applied before a restart and are skipped, so
// replay is idempotent.
//
// The state machine stops for good (stop) rather than go on:
//   - at an entry that fails its checksum, a stored value that does not
//     decode, or a transaction that cannot commit: the batch is not
//     applied, nor anything after it. Going on would apply a command
//     nobody proposed, or let this node diverge from its peers.
//   - at an entry whose command type this build does not know (a newer
//     release wrote it): the entries before it are committed, it and
//     everything after it are not. Skipping it instead would leave this
//     node's state different from its peers' for good.
func (f *fsm) ApplyBatch(logs []*raft.Log) []interface{} {
	results := make([]interface{}, len(logs))
	if len(logs) == 0 {
		return results
	}
	if err := f.stoppedErr(); err != nil {
		return haltedResults(results, logs, 0, err)
	}
	for _, l := range logs {
		if f.sizes != nil {
			f.sizes.add(len(l.Data) + len(l.Extensions))
		}
		if err := verifyEntry(l); err != nil {
			f.stop(corrupt(filepath.Dir(f.path), f.logPath, fmt.Errorf("%s: %w", f.logPath, err)))
			return haltedResults(results, logs, 0, f.stoppedErr())
		}
	}
	changes, applied, unknown, err := f.applyBatch(logs, results)
	if err != nil {
		f.stop(corrupt(filepath.Dir(f.path), f.path, err))
		return haltedResults(results, logs, 0, f.stoppedErr())
	}
	if unknown == nil || applied > f.AppliedIndex() {
		f.setApplied(applied)
	}
	if f.observer != nil && len(changes) > 0 {
		f.observer.Applied(changes)
	}
	if unknown != nil {
		f.stop(unknown)
	}
	return results
}

// applyBatch runs the batch's transaction and returns the changes, the
// index it applied up to, and the unknown command it stopped at (its
// results and those after it are set). A panic of the writer (our own
// stored bytes not decoding) rolls the transaction back and is returned.
func (f *fsm) applyBatch(logs []*raft.Log, results []interface{}) (changes []Change, applied uint64, unknown *UnknownCommandError, err error) {
	first, last := logs[0].Index, logs[len(logs)-1].Index
	applied = last
	f.mu.RLock()
	defer f.mu.RUnlock()
	defer func() {
		if r := recover(); r != nil {
			changes, unknown = nil, nil
			err = fmt.Errorf("apply raft entries %d..%d to %s: %w: %v", first, last, f.path, ErrCorrupt, r)
		}
	}()
	err = f.db.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		var stored uint64
		if v := meta.Get(keyAppliedIndex); len(v) == 8 {
			stored = binary.BigEndian.Uint64(v)
		}
		w := &writer{tx: tx, sum: storedSum(tx)}
		for i, l := range logs {
			if l.Index <= stored || l.Type != raft.LogCommand {
				continue
			}
			cmd, err := f.decode(l.Data)
			if errors.Is(err, ErrUnknownCommand) {
				unknown = &UnknownCommandError{Index: l.Index, Type: CommandType(l.Data[0]), Version: f.version}
				haltedResults(results, logs, i, unknown)
				applied = l.Index - 1
				break
			}
			if err != nil {
				// A known type whose payload does not decode: every node of
				// this build refuses it alike, so it is a rejection (as a
				// value), not a divergence.
				results[i] = &Result{Index: l.Index, Err: fmt.Errorf("entry %d: %w", l.Index, err)}
				f.logger.Error("cannot decode raft entry", "index", l.Index, "err", err)
				continue
			}
			res := w.apply(l.Index, cmd)
			w.noteCommandType(cmd.Type())
			results[i] = res
			changes = append(changes, w.changes...)
			w.changes = w.changes[:0]
		}
		if applied > stored {
			var b [8]byte
			binary.BigEndian.PutUint64(b[:], applied)
			w.put(bucketMeta, keyAppliedIndex, b[:])
			return meta.Put(keyContentDigest, encodeDigest(applied, w.sum))
		}
		return nil
	})
	if err != nil {
		// The disk under the state machine failed.
		return nil, 0, nil, fmt.Errorf("apply raft entries %d..%d to %s: %w", first, last, f.path, err)
	}
	return changes, applied, unknown, nil
}

// haltedResults answers the entries from logs[from] on, which a stopped
// state machine did not apply. The entries are committed, so nodes whose
// state machines run do apply them: for whoever proposed one, the outcome
// is unknown.
func haltedResults(results []interface{}, logs []*raft.Log, from int, cause error) []interface{} {
	for i := from; i < len(logs); i++ {
		results[i] = &Result{Index: logs[i].Index, Err: fmt.Errorf("entry %d not applied on this node: %w: %w: %w", logs[i].Index, ErrStopped, cause, ErrUnknownOutcome)}
	}
	return results
}

// UnknownCommandError is why a state machine halted: the log holds, at
// Index, a command of a type this build (Version) cannot apply.
type UnknownCommandError struct {
	Index   uint64
	Type    CommandType
	Version string
}

func (e *UnknownCommandError) Error() string {
	return fmt.Sprintf("raft entry %d holds command type %d, which this build (version %s) cannot apply: a newer release wrote it; "+
		"upgrade this node to the release its peers run and start it again (it resumes at entry %d, nothing was skipped)",
		e.Index, byte(e.Type), e.Version, e.Index)
}

func (e *UnknownCommandError) Unwrap() error { return ErrUnknownCommand }

// stop stops the state machine for good: nothing more is applied, no
// snapshot is taken or installed, and the observer and the store are told
// (once). err says why and what to do: a CorruptError naming the damaged
// file, or an UnknownCommandError.
func (f *fsm) stop(err error) {
	if !f.stopped.CompareAndSwap(nil, &err) {
		return
	}
	var unknown *UnknownCommandError
	if errors.As(err, &unknown) {
		f.logger.Error("stopped applying the raft log: "+err.Error(), "index", unknown.Index, "command_type", int(unknown.Type))
	} else {
		f.logger.Error("the state machine stopped: this node applies no more entries and serves no devices: "+err.Error(), "file", f.path)
	}
	if f.observer != nil {
		f.observer.Halted(err)
	}
	if f.onHalt != nil {
		f.onHalt(err)
	}
}

// stoppedErr is the error that stopped the state machine, nil while it runs.
func (f *fsm) stoppedErr() error {
	if p := f.stopped.Load(); p != nil {
		return *p
	}
	return nil
}

// Snapshot captures the state in a read transaction; Persist streams it.
// A stopped state machine takes none: its state is behind the index raft
// would label it with.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	if err := f.stoppedErr(); err != nil {
		// Raft would label the snapshot with an index past what the file
		// holds; a restart from it would skip the unapplied entries.
		return nil, fmt.Errorf("snapshot: %w: %w", ErrStopped, err)
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	tx, err := f.db.Begin(false)
	if err != nil {
		return nil, fmt.Errorf("snapshot: begin read tx: %w", err)
	}
	if f.sizes != nil {
		f.sizes.snapshotTaken()
	}
	return &snapshot{tx: tx}, nil
}

type snapshot struct{ tx *bolt.Tx }

func (s *snapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := s.tx.WriteTo(sink); err != nil {
		sink.Cancel()
		return fmt.Errorf("persist snapshot: %w", err)
	}
	return sink.Close()
}

func (s *snapshot) Release() { _ = s.tx.Rollback() }

// Restore replaces the state with a snapshot: the stream is written to a
// temporary file, fsynced, checked whole (every page, the content digest)
// and renamed over the state file, so a crash leaves either the old state
// or the new one, never a mix. A snapshot that fails the check is refused
// and the old state stays. Once the new file is in place, failing to open
// it or to rebuild the derived state from it stops the state machine.
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	if err := f.stoppedErr(); err != nil {
		return fmt.Errorf("restore snapshot: %w: %w", ErrStopped, err)
	}
	tmp := f.path + ".restore"
	if err := writeFileSync(tmp, rc); err != nil {
		return fmt.Errorf("restore snapshot: %w", err)
	}
	// Check the file before swapping it in.
	check, info, err := openStateDB(tmp, false, f.logger, nil)
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("restore snapshot: %w", err)
	}
	check.Close()

	f.mu.Lock()
	if err := f.db.Close(); err != nil {
		f.mu.Unlock()
		return fmt.Errorf("restore snapshot: close state db: %w", err)
	}
	if err := os.Rename(tmp, f.path); err != nil {
		// The old file is still in place: reopen it.
		err = fmt.Errorf("restore snapshot: swap state file: %w", err)
		if db, _, reopenErr := openStateDB(f.path, f.noSync, f.logger, nil); reopenErr == nil {
			f.db = db
			f.mu.Unlock()
			return err
		}
		f.mu.Unlock()
		f.stop(corrupt(filepath.Dir(f.path), f.path, err))
		return err
	}
	syncDir(filepath.Dir(f.path))
	db, _, err := openStateDB(f.path, f.noSync, f.logger, &info)
	if err != nil {
		f.mu.Unlock()
		err = fmt.Errorf("reopen state db after restore: %w", err)
		f.stop(corrupt(filepath.Dir(f.path), f.path, err))
		return err
	}
	f.db = db
	f.mu.Unlock()

	f.setApplied(info.applied)
	if f.observer != nil {
		f.mu.RLock()
		err := f.db.View(func(tx *bolt.Tx) error { return f.observer.Restored(&Reader{tx: tx}) })
		f.mu.RUnlock()
		if err != nil {
			// The state file is the new one, the derived state is not.
			err = fmt.Errorf("load the restored state from %s: %w", f.path, err)
			f.stop(corrupt(filepath.Dir(f.path), f.path, err))
			return err
		}
	}
	return nil
}

func writeFileSync(path string, r io.Reader) error {
	out, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, r); err != nil {
		out.Close()
		os.Remove(path)
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		os.Remove(path)
		return err
	}
	return out.Close()
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}

// view runs fn in a read transaction of the current state.
func (f *fsm) view(fn func(r *Reader) error) error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.db.View(func(tx *bolt.Tx) error { return fn(&Reader{tx: tx}) })
}

// close syncs and closes the state file; only then is its open marker
// removed (statefile.go).
func (f *fsm) close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	defer f.unlock() // last: the marker is ours until then
	if f.noSync {
		if err := f.db.Sync(); err != nil {
			f.db.Close()
			return fmt.Errorf("sync state db %s: %w", f.path, err)
		}
	}
	if err := f.db.Close(); err != nil {
		return fmt.Errorf("close state db %s: %w", f.path, err)
	}
	if f.noSync {
		return releaseStateFile(f.path)
	}
	return nil
}

// writer applies decoded commands inside one write transaction. Every
// write goes through put or del, which keep the content digest (sum) up
// to date (digest.go): a write past them is caught as damage at the next
// open.
type writer struct {
	tx      *bolt.Tx
	sum     uint64
	changes []Change
}

// put stores value under key in bucket (made the first time) and updates
// the digest.
func (w *writer) put(bucket, key, value []byte) {
	b := w.tx.Bucket(bucket)
	if b == nil {
		b = w.bucket(bucket)
	}
	if old := b.Get(key); old != nil {
		w.sum -= entryHash(bucket, key, old)
	}
	if err := b.Put(key, value); err != nil {
		panic(fmt.Sprintf("store %s %q: %v", bucket, key, err))
	}
	w.sum += entryHash(bucket, key, value)
}

// del removes key from bucket (if there) and updates the digest.
func (w *writer) del(bucket, key []byte) {
	b := w.tx.Bucket(bucket)
	if b == nil {
		return
	}
	old := b.Get(key)
	if old == nil {
		return
	}
	if err := b.Delete(key); err != nil {
		panic(fmt.Sprintf("delete %s %q: %v", bucket, key, err))
	}
	w.sum -= entryHash(bucket, key, old)
}

// putJSON stores v as JSON under id in bucket.
func (w *writer) putJSON(bucket []byte, id string, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("encode %q: %v", id, err))
	}
	w.put(bucket, []byte(id), data)
}

func etagFor(index uint64) string { return strconv.FormatUint(index, 10) }

func checkPrecondition(p Precondition, exists bool, etag string) error {
	if p.IfNoneMatch == "*" && exists {
		return fleet.ErrExists
	}
	if p.IfMatch != "" {
		if !exists {
			return fleet.ErrNotFound
		}
		if p.IfMatch != "*" && p.IfMatch != etag {
			return fmt.Errorf("%w: etag is %q, If-Match was %q", fleet.ErrPreconditionFailed, etag, p.IfMatch)
		}
	}
	return nil
}

func (w *writer) apply(index uint64, cmd Command) *Result {
	switch c := cmd.(type) {
	case *PutDevice:
		return w.putDevice(index, c)
	case *PatchDevice:
		return w.patchDevice(index, c)
	case *DeleteDevice:
		return w.deleteDevice(index, c)
	case *PutDeployment:
		return w.putDeployment(index, c)
	case *PatchDeployment:
		return w.patchDeployment(index, c)
	case *DeleteDeployment:
		return w.deleteDeployment(index, c)
	case *PutReports:
		return w.putReports(index, c)
	case *PutEnrollment:
		return w.putEnrollment(index, c)
	case *DeleteEnrollment:
		return w.deleteEnrollment(index, c)
	case *SetAdminToken:
		return w.setSecret(index, keyAdminToken, AdminTokenSet, "admin token", c.Token)
	case *SetJoinToken:
		return w.setSecret(index, keyJoinToken, JoinTokenSet, "join token", c.Token)
	case *RotateEnrollment:
		return w.rotateEnrollment(index, c)
	case *RevokeEnrollmentDevices:
		return w.revokeEnrollmentDevices(index, c)
	case *AdmitRollout:
		return w.admitRollout(index, c)
	case *RolloutAction:
		return w.rolloutAction(index, c)
	case *BindNode:
		return w.bindNode(index, c)
	case *RevokeNode:
		return w.revokeNode(index, c)
	case *PutConsumer:
		return w.putConsumer(index, c)
	case *DeleteConsumer:
		return w.deleteConsumer(index, c)
	case *ResetDevice:
		return w.resetDevice(index, c)
	case *ImportDevices:
		return w.importDevices(index, c)
	case *FinishImport:
		return w.finishImport(index, c)
	}
	return &Result{Index: index, Err: fmt.Errorf("entry %d: no handler for %s", index, cmd.Type())}
}

func getJSON[T any](b *bolt.Bucket, id string) (*T, error) {
	v := b.Get([]byte(id))
	if v == nil {
		return nil, nil
	}
	var out T
	if err := json.Unmarshal(v, &out); err != nil {
		return nil, fmt.Errorf("decode stored %s %q: %w", b, id, err)
	}
	return &out, nil
}

func mustGet[T any](b *bolt.Bucket, id string) *T {
	v, err := getJSON[T](b, id)
	if err != nil {
		// Our own bytes failed to decode: local corruption.
		panic(err)
	}
	return v
}

func (w *writer) putDevice(index uint64, c *PutDevice) *Result {
	b := w.tx.Bucket(bucketDevices)
	old := mustGet[fleet.Device](b, c.Device.ID)
	etag := ""
	if old != nil {
		etag = old.Etag
	}
	if err := checkPrecondition(c.Precondition, old != nil, etag); err != nil {
		return &Result{Index: index, Err: fmt.Errorf("device %q: %w", c.Device.ID, err)}
	}
	d := c.Device
	if d.Tags == nil {
		d.Tags = map[string]any{}
	}
	if d.Status == "" {
		d.Status = fleet.DeviceEnabled
	}
	d.Authentication.SymmetricKey = nil
	created := old == nil
	if created {
		d.CreatedTimeUTC = c.Time
		d.ResetIndex, d.ResetTimeUTC = 0, nil
	} else {
		d.CreatedTimeUTC = old.CreatedTimeUTC
		d.Authentication = old.Authentication
		d.Enrollment = old.Enrollment
		d.ResetIndex, d.ResetTimeUTC = old.ResetIndex, old.ResetTimeUTC
	}
	d.LastUpdatedTimeUTC = c.Time
	d.Etag = etagFor(index)
	w.putJSON(bucketDevices, d.ID, d)
	w.changes = append(w.changes, Change{Index: index, Kind: DevicePut, ID: d.ID, Device: &d,
		CredentialsChanged: old != nil && old.Status != d.Status})
	return &Result{Index: index, Created: created, Device: &d}
}

func (w *writer) patchDevice(index uint64, c *PatchDevice) *Result {
	b := w.tx.Bucket(bucketDevices)
	d := mustGet[fleet.Device](b, c.ID)
	if d == nil {
		return &Result{Index: index, Err: fmt.Errorf("device %q: %w", c.ID, fleet.ErrNotFound)}
	}
	if err := checkPrecondition(c.Precondition, true, d.Etag); err != nil {
		return &Result{Index: index, Err: fmt.Errorf("device %q: %w", c.ID, err)}
	}
	if c.ReplaceTags {
		d.Tags = map[string]any{}
	}
	if d.Tags == nil {
		d.Tags = map[string]any{}
	}
	MergePatch(d.Tags, c.Tags)
	credentials := false
	if c.Status != "" {
		credentials = d.Status != c.Status
		d.Status = c.Status
	}
	if c.KeyHashes != nil {
		credentials = true
		d.Authentication.KeyHashes = c.KeyHashes
	}
	if d.Enrollment == "" {
		d.Enrollment = c.Enrollment
	}
	d.LastUpdatedTimeUTC = c.Time
	d.Etag = etagFor(index)
	w.putJSON(bucketDevices, d.ID, d)
	w.changes = append(w.changes, Change{Index: index, Kind: DevicePut, ID: d.ID, Device: d, CredentialsChanged: credentials})
	return &Result{Index: index, Device: d}
}

// MergePatch applies an RFC 7396 JSON merge patch to obj: null removes a
// key, an object merges recursively, anything else replaces.
func MergePatch(obj map[string]any, patch map[string]any) {
	for k, v := range patch {
		switch pv := v.(type) {
		case nil:
			delete(obj, k)
		case map[string]any:
			cur, ok := obj[k].(map[string]any)
			if !ok {
				cur = map[string]any{}
			}
			MergePatch(cur, pv)
			obj[k] = cur
		default:
			obj[k] = v
		}
	}
}

// resetDevice marks a device reset at this entry (see ResetDevice).
func (w *writer) resetDevice(index uint64, c *ResetDevice) *Result {
	b := w.tx.Bucket(bucketDevices)
	d := mustGet[fleet.Device](b, c.ID)
	if d == nil {
		return &Result{Index: index, Err: fmt.Errorf("device %q: %w", c.ID, fleet.ErrNotFound)}
	}
	if err := checkPrecondition(c.Precondition, true, d.Etag); err != nil {
		return &Result{Index: index, Err: fmt.Errorf("device %q: %w", c.ID, err)}
	}
	at := c.Time
	d.ResetIndex, d.ResetTimeUTC = index, &at
	d.LastUpdatedTimeUTC = c.Time
	d.Etag = etagFor(index)
	w.putJSON(bucketDevices, d.ID, d)
	w.changes = append(w.changes, Change{Index: index, Kind: DeviceReset, ID: d.ID, Device: d, Time: c.Time, Actor: c.Actor})
	return &Result{Index: index, Device: d}
}

func (w *writer) deleteDevice(index uint64, c *DeleteDevice) *Result {
	b := w.tx.Bucket(bucketDevices)
	d := mustGet[fleet.Device](b, c.ID)
	if d == nil {
		return &Result{Index: index, Err: fmt.Errorf("device %q: %w", c.ID, fleet.ErrNotFound)}
	}
	if err := checkPrecondition(c.Precondition, true, d.Etag); err != nil {
		return &Result{Index: index, Err: fmt.Errorf("device %q: %w", c.ID, err)}
	}
	w.del(bucketDevices, []byte(c.ID))
	w.del(bucketReports, []byte(c.ID))
	w.forgetRolloutDevice(c.ID)
	w.changes = append(w.changes, Change{Index: index, Kind: DeviceDeleted, ID: c.ID})
	return &Result{Index: index, Device: d}
}

func (w *writer) putDeployment(index uint64, c *PutDeployment) *Result {
	b := w.tx.Bucket(bucketDeployments)
	id := c.Deployment.ID
	old := mustGet[fleet.Deployment](b, id)
	etag := ""
	if old != nil {
		etag = old.Etag
	}
	if err := checkPrecondition(c.Precondition, old != nil, etag); err != nil {
		return &Result{Index: index, Err: fmt.Errorf("deployment %q: %w", id, err)}
	}
	d := c.Deployment
	if old != nil {
		if !jsonEqual(old.Content, d.Content) || old.Layered != d.Layered {
			return &Result{Index: index, Err: fmt.Errorf("deployment %q: content: %w: a deployment's content cannot change after creation; create a new deployment (only targetCondition, priority, labels and metrics can be updated)", id, fleet.ErrImmutable)}
		}
		if err := checkRolloutPolicy(id, old.Rollout, d.Rollout); err != nil {
			return &Result{Index: index, Err: err}
		}
		d.CreatedTimeUTC = old.CreatedTimeUTC
	} else {
		d.CreatedTimeUTC = c.Time
	}
	d.LastUpdatedTimeUTC = c.Time
	d.Etag = etagFor(index)
	w.putJSON(bucketDeployments, id, d)
	ro := w.rollout(id)
	if old == nil && d.Rollout != nil {
		ro = w.startRollout(index, id, c.Time)
	}
	w.changes = append(w.changes, Change{Index: index, Kind: DeploymentPut, ID: id, Deployment: &d, Time: c.Time, Actor: c.Actor, Created: old == nil, Rollout: ro})
	return &Result{Index: index, Created: old == nil, Deployment: &d}
}

func jsonEqual(a, b json.RawMessage) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return string(a) == string(b)
	}
	ca, _ := json.Marshal(x)
	cb, _ := json.Marshal(y)
	return string(ca) == string(cb)
}

func (w *writer) patchDeployment(index uint64, c *PatchDeployment) *Result {
	b := w.tx.Bucket(bucketDeployments)
	d := mustGet[fleet.Deployment](b, c.ID)
	if d == nil {
		return &Result{Index: index, Err: fmt.Errorf("deployment %q: %w", c.ID, fleet.ErrNotFound)}
	}
	if err := checkPrecondition(c.Precondition, true, d.Etag); err != nil {
		return &Result{Index: index, Err: fmt.Errorf("deployment %q: %w", c.ID, err)}
	}
	if c.Rollout != nil {
		if err := checkRolloutPolicy(c.ID, d.Rollout, c.Rollout); err != nil {
			return &Result{Index: index, Err: err}
		}
		d.Rollout = c.Rollout
	}
	if c.TargetCondition != nil {
		d.TargetCondition = *c.TargetCondition
	}
	if c.Priority != nil {
		d.Priority = *c.Priority
	}
	if c.ReplaceLabels {
		d.Labels = nil
	}
	for k, v := range c.Labels {
		if d.Labels == nil {
			d.Labels = map[string]string{}
		}
		if v == "" {
			delete(d.Labels, k)
			continue
		}
		d.Labels[k] = v
	}
	for k, v := range c.MetricQueries {
		if d.Metrics.Queries == nil {
			d.Metrics.Queries = map[string]string{}
		}
		if v == "" {
			delete(d.Metrics.Queries, k)
			continue
		}
		d.Metrics.Queries[k] = v
	}
	d.LastUpdatedTimeUTC = c.Time
	d.Etag = etagFor(index)
	w.putJSON(bucketDeployments, d.ID, d)
	w.changes = append(w.changes, Change{Index: index, Kind: DeploymentPut, ID: d.ID, Deployment: d, Time: c.Time, Actor: c.Actor, Rollout: w.rollout(d.ID)})
	return &Result{Index: index, Deployment: d}
}

func (w *writer) deleteDeployment(index uint64, c *DeleteDeployment) *Result {
	b := w.tx.Bucket(bucketDeployments)
	d := mustGet[fleet.Deployment](b, c.ID)
	if d == nil {
		return &Result{Index: index, Err: fmt.Errorf("deployment %q: %w", c.ID, fleet.ErrNotFound)}
	}
	if err := checkPrecondition(c.Precondition, true, d.Etag); err != nil {
		return &Result{Index: index, Err: fmt.Errorf("deployment %q: %w", c.ID, err)}
	}
	w.del(bucketDeployments, []byte(c.ID))
	w.dropRollout(c.ID)
	w.changes = append(w.changes, Change{Index: index, Kind: DeploymentDeleted, ID: c.ID, Time: c.Time, Actor: c.Actor})
	return &Result{Index: index, Deployment: d}
}

func (w *writer) putReports(index uint64, c *PutReports) *Result {
	devices := w.tx.Bucket(bucketDevices)
	reports := w.tx.Bucket(bucketReports)
	stored := 0
	for _, r := range c.Reports {
		if devices.Get([]byte(r.DeviceID)) == nil {
			continue
		}
		old, err := getStoredReport(reports, r.DeviceID, decodeStoredReportMeta) // its session only
		if err != nil {
			panic(err) // our own bytes failed to decode: local corruption (as mustGet)
		}
		if old != nil && !r.Session.IsZero() && r.Session.Before(old.Session) {
			continue // from a session older than the stored report's: stale
		}
		w.putJSON(bucketReports, r.DeviceID, StoredReport{Document: r.Document, ReceivedTimeUTC: r.Time, Node: r.Node, Session: r.Session, Index: index})
		w.changes = append(w.changes, Change{Index: index, Kind: ReportPut, ID: r.DeviceID})
		stored++
	}
	return &Result{Index: index, Stored: stored}
}

func (w *writer) putEnrollment(index uint64, c *PutEnrollment) *Result {
	b := w.tx.Bucket(bucketEnrollments)
	e := c.Enrollment
	old := mustGet[fleet.Enrollment](b, e.Name)
	etag := ""
	if old != nil {
		etag = old.Etag
	}
	if err := checkPrecondition(c.Precondition, old != nil, etag); err != nil {
		return &Result{Index: index, Err: fmt.Errorf("enrollment %q: %w", e.Name, err)}
	}
	e.Token = ""
	if old != nil {
		// Only the tags change: a new token needs a new enrollment.
		e.CreatedTimeUTC, e.DerivationKey = old.CreatedTimeUTC, old.DerivationKey
	} else {
		e.CreatedTimeUTC = c.Time
	}
	e.LastUpdatedTimeUTC = c.Time
	e.Etag = etagFor(index)
	w.putJSON(bucketEnrollments, e.Name, e)
	return &Result{Index: index, Created: old == nil, Enrollment: &e}
}

func (w *writer) deleteEnrollment(index uint64, c *DeleteEnrollment) *Result {
	b := w.tx.Bucket(bucketEnrollments)
	e := mustGet[fleet.Enrollment](b, c.Name)
	if e == nil {
		return &Result{Index: index, Err: fmt.Errorf("enrollment %q: %w", c.Name, fleet.ErrNotFound)}
	}
	if err := checkPrecondition(c.Precondition, true, e.Etag); err != nil {
		return &Result{Index: index, Err: fmt.Errorf("enrollment %q: %w", c.Name, err)}
	}
	w.del(bucketEnrollments, []byte(c.Name))
	return &Result{Index: index, Enrollment: e}
}

func (w *writer) rotateEnrollment(index uint64, c *RotateEnrollment) *Result {
	b := w.tx.Bucket(bucketEnrollments)
	e := mustGet[fleet.Enrollment](b, c.Name)
	if e == nil {
		return &Result{Index: index, Err: fmt.Errorf("enrollment %q: %w", c.Name, fleet.ErrNotFound)}
	}
	if err := checkPrecondition(c.Precondition, true, e.Etag); err != nil {
		return &Result{Index: index, Err: fmt.Errorf("enrollment %q: %w", c.Name, err)}
	}
	if c.DerivationKey == "" || c.DerivationKey == e.DerivationKey {
		return &Result{Index: index, Err: fmt.Errorf("enrollment %q: rotation needs a new derivation key: %w", c.Name, fleet.ErrInvalid)}
	}
	e.DerivationKey = c.DerivationKey
	e.LastUpdatedTimeUTC = c.Time
	e.Etag = etagFor(index)
	w.putJSON(bucketEnrollments, e.Name, e)
	res := &Result{Index: index, Enrollment: e}
	if c.RevokeDevices {
		res.Revoked = w.revokeDevices(index, c.Name, c.EnrollmentDevices, c.Time)
	}
	return res
}

func (w *writer) revokeEnrollmentDevices(index uint64, c *RevokeEnrollmentDevices) *Result {
	b := w.tx.Bucket(bucketEnrollments)
	e := mustGet[fleet.Enrollment](b, c.Name)
	if e == nil {
		return &Result{Index: index, Err: fmt.Errorf("enrollment %q: %w", c.Name, fleet.ErrNotFound)}
	}
	if err := checkPrecondition(c.Precondition, true, e.Etag); err != nil {
		return &Result{Index: index, Err: fmt.Errorf("enrollment %q: %w", c.Name, err)}
	}
	res := &Result{Index: index, Enrollment: e}
	res.Revoked = w.revokeDevices(index, c.Name, c.EnrollmentDevices, c.Time)
	if c.DeleteEnrollment {
		w.del(bucketEnrollments, []byte(c.Name))
	}
	return res
}

// revokeDevices clears the keys of the listed devices and of those that
// name the enrollment and changed after the list was read: none of them
// can connect until an operator gives it keys again. Each becomes a
// DevicePut with CredentialsChanged, so every node ends its sessions.
func (w *writer) revokeDevices(index uint64, enrollment string, which EnrollmentDevices, at time.Time) []string {
	b := w.tx.Bucket(bucketDevices)
	ids := map[string]bool{}
	for _, id := range which.Devices {
		ids[id] = true
	}
	c := b.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if ids[string(k)] {
			continue
		}
		var d struct {
			Enrollment string `json:"enrollment"`
			Etag       string `json:"etag"`
		}
		if err := json.Unmarshal(v, &d); err != nil {
			panic(fmt.Sprintf("decode stored device %q: %v", k, err))
		}
		if etag, _ := strconv.ParseUint(d.Etag, 10, 64); d.Enrollment == enrollment && etag > which.AsOf {
			ids[string(k)] = true
		}
	}
	// In id order: the changes reach every node's observer alike.
	sorted := slices.Sorted(maps.Keys(ids))
	revoked := make([]string, 0, len(sorted))
	for _, id := range sorted {
		d := mustGet[fleet.Device](b, id)
		if d == nil {
			continue
		}
		d.Authentication.KeyHashes = nil
		d.LastUpdatedTimeUTC = at
		d.Etag = etagFor(index)
		w.putJSON(bucketDevices, d.ID, d)
		w.changes = append(w.changes, Change{Index: index, Kind: DevicePut, ID: d.ID, Device: d, CredentialsChanged: true})
		revoked = append(revoked, d.ID)
	}
	return revoked
}

// setSecret keeps a cluster-wide token (admin or join) in the meta bucket.
func (w *writer) setSecret(index uint64, key []byte, kind ChangeKind, what, token string) *Result {
	if len(token) < 32 {
		return &Result{Index: index, Err: fmt.Errorf("%s: at least 32 characters: %w", what, fleet.ErrInvalid)}
	}
	w.put(bucketMeta, key, []byte(token))
	w.changes = append(w.changes, Change{Index: index, Kind: kind, Secret: token})
	return &Result{Index: index}
}

// AdminToken is the admin token last set through the log, "" if none was
// (the nodes then use the one in their data directory).
func (r *Reader) AdminToken() string {
	return string(r.tx.Bucket(bucketMeta).Get(keyAdminToken))
}

// JoinToken is the join token last set through the log, "" if none was.
func (r *Reader) JoinToken() string {
	return string(r.tx.Bucket(bucketMeta).Get(keyJoinToken))
}

// Enrollments calls fn for each enrollment in name order.
func (r *Reader) Enrollments(fn func(fleet.Enrollment) bool) error {
	return each(r.tx.Bucket(bucketEnrollments), "", fn)
}

// Enrollment returns one enrollment, or fleet.ErrNotFound.
func (r *Reader) Enrollment(name string) (fleet.Enrollment, error) {
	e, err := getJSON[fleet.Enrollment](r.tx.Bucket(bucketEnrollments), name)
	if err != nil {
		return fleet.Enrollment{}, err
	}
	if e == nil {
		return fleet.Enrollment{}, fmt.Errorf("enrollment %q: %w", name, fleet.ErrNotFound)
	}
	return *e, nil
}

// StoredReport is a device's last reported document.
type StoredReport struct {
	Document        json.RawMessage `json:"document"`
	ReceivedTimeUTC time.Time       `json:"receivedTimeUtc"`
	Node            string          `json:"node,omitempty"`
	// Session is when the device's session that carried it began.
	Session time.Time `json:"session,omitempty"`
	// Index is the raft entry that stored it.
	Index uint64 `json:"index"`
}

// Report returns a device's last reported document, or fleet.ErrNotFound.
func (r *Reader) Report(deviceID string) (StoredReport, error) {
	return r.report(deviceID, decodeStoredReport)
}

// ReportMeta is Report without the document: when and where the last
// report arrived and the entry that stored it (Index), or fleet.ErrNotFound.
func (r *Reader) ReportMeta(deviceID string) (StoredReport, error) {
	return r.report(deviceID, decodeStoredReportMeta)
}

func (r *Reader) report(deviceID string, decode func([]byte) (StoredReport, error)) (StoredReport, error) {
	rep, err := getStoredReport(r.tx.Bucket(bucketReports), deviceID, decode)
	if err != nil {
		return StoredReport{}, err
	}
	if rep == nil {
		return StoredReport{}, fmt.Errorf("report of %q: %w", deviceID, fleet.ErrNotFound)
	}
	return *rep, nil
}

// getStoredReport is getJSON for a report, decoded whole
// (decodeStoredReport) or without its document (decodeStoredReportMeta).
func getStoredReport(b *bolt.Bucket, deviceID string, decode func([]byte) (StoredReport, error)) (*StoredReport, error) {
	v := b.Get([]byte(deviceID))
	if v == nil {
		return nil, nil
	}
	rep, err := decode(v)
	if err != nil {
		return nil, fmt.Errorf("decode stored %s %q: %w", b, deviceID, err)
	}
	return &rep, nil
}

// Reader reads the state inside one consistent transaction.
type Reader struct{ tx *bolt.Tx }

// Device returns one device, or fleet.ErrNotFound.
func (r *Reader) Device(id string) (fleet.Device, error) {
	d, err := getJSON[fleet.Device](r.tx.Bucket(bucketDevices), id)
	if err != nil {
		return fleet.Device{}, err
	}
	if d == nil {
		return fleet.Device{}, fmt.Errorf("device %q: %w", id, fleet.ErrNotFound)
	}
	return *d, nil
}

// Deployment returns one deployment, or fleet.ErrNotFound.
func (r *Reader) Deployment(id string) (fleet.Deployment, error) {
	d, err := getJSON[fleet.Deployment](r.tx.Bucket(bucketDeployments), id)
	if err != nil {
		return fleet.Deployment{}, err
	}
	if d == nil {
		return fleet.Deployment{}, fmt.Errorf("deployment %q: %w", id, fleet.ErrNotFound)
	}
	return *d, nil
}

// Devices calls fn for each device in id order, starting after the id
// `after`; fn returns false to stop.
func (r *Reader) Devices(after string, fn func(fleet.Device) bool) error {
	return each(r.tx.Bucket(bucketDevices), after, fn)
}

// Deployments calls fn for each deployment in id order after `after`.
func (r *Reader) Deployments(after string, fn func(fleet.Deployment) bool) error {
	return each(r.tx.Bucket(bucketDeployments), after, fn)
}

// AppliedIndex is the index of the last log entry this state reflects.
func (r *Reader) AppliedIndex() uint64 {
	if v := r.tx.Bucket(bucketMeta).Get(keyAppliedIndex); len(v) == 8 {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

// DeviceCount is the number of devices stored.
func (r *Reader) DeviceCount() int { return r.tx.Bucket(bucketDevices).Stats().KeyN }

func each[T any](b *bolt.Bucket, after string, fn func(T) bool) error {
	c := b.Cursor()
	var k, v []byte
	if after == "" {
		k, v = c.First()
	} else {
		k, v = c.Seek([]byte(after))
		if k != nil && string(k) == after {
			k, v = c.Next()
		}
	}
	for ; k != nil; k, v = c.Next() {
		var item T
		if err := json.Unmarshal(v, &item); err != nil {
			return fmt.Errorf("decode stored %q: %w", k, err)
		}
		if !fn(item) {
			return nil
		}
	}
	return nil
}
