package deviceimport

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"appliance/api"
	"appliance/fleet"
	"appliance/identityfile"
	"appliance/raftstore"
)

const (
	// batchDevices is the size of one ImportDevices entry: large enough
	// that raft, the state file and the assignments take a whole batch in
	// one go, small enough (about 0.5 MB) to replicate at once.
	batchDevices = 2000
	// batchBytes also ends a batch: devices with large tags make larger
	// entries, and an entry a follower forwards must stay well within the
	// cluster port's cap on a request (8 MiB). Counted as the lines'
	// lengths, which hold more than the entry will.
	batchBytes = 2 << 20
	// inFlight batches are proposed at once; the reader waits for one of
	// them to finish before it reads more (the client's upload waits with
	// it).
	inFlight = 8
)

// Store is what an import and an export need of the controller's
// replicated store. The node implements it.
type Store interface {
	// Ready is nil while the node serves reads, or why it does not (an
	// api error class: it answers the request as it is).
	Ready() error
	// CheckCommand says whether every member can apply commands of type
	// t (raftstore.ErrClusterBehind when one may not).
	CheckCommand(ctx context.Context, t raftstore.CommandType) error
	// View reads the local replica in one read transaction.
	View(fn func(r *raftstore.Reader) error) error
	// Apply proposes cmd and waits until it is applied; its errors are
	// in the API's classes (api.ErrUnavailable for a lost leader).
	Apply(ctx context.Context, cmd raftstore.Command) (*raftstore.Result, error)
}

// Config is what an Importer works with.
type Config struct {
	// Store is the replicated store the devices go to.
	Store Store
	// TagLimits returns, once per import, the check of a device's tags
	// against the limits of deployments per device (as a device write
	// checks them); nil, or a nil check, checks nothing.
	TagLimits func() func(id string, tags map[string]any) error
	// Actor is who the import's entries say made them.
	Actor string
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Importer runs imports and exports of device identities; it keeps
// nothing between them.
type Importer struct {
	cfg Config
}

// New returns an Importer.
func New(cfg Config) *Importer {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Importer{cfg: cfg}
}

// run is one import in progress.
type run struct {
	cfg    Config
	opts   api.ImportOptions
	stage  string // atomic: the stage its batches are kept in
	limits func(id string, tags map[string]any) error

	mu      sync.Mutex // guards what the proposers update
	sum     api.ImportSummary
	errs    []api.ImportError
	staged  bool
	stopped error // why the import stopped part way
	stopAt  int   // the first line of the batch that failed

	seen map[string]int // device id -> its line: a device given twice is a bad line
}

// Import reads an export file from body and imports its devices as opts
// say (api.ImportBackend's ImportDevices).
func (im *Importer) Import(ctx context.Context, body io.Reader, opts api.ImportOptions) (api.ImportSummary, error) {
	if !raftstore.ValidImportMode(opts.Mode) {
		return api.ImportSummary{}, fleet.Invalid("mode", "must be create, upsert or delete; got %q", opts.Mode)
	}
	if err := im.cfg.Store.Ready(); err != nil {
		return api.ImportSummary{}, err
	}
	if !opts.DryRun {
		if err := im.cfg.Store.CheckCommand(ctx, raftstore.CmdImportDevices); err != nil {
			if errors.Is(err, raftstore.ErrClusterBehind) {
				return api.ImportSummary{}, fmt.Errorf("%w: device import needs every member at this release: %w", api.ErrUpgradeRequired, err)
			}
			return api.ImportSummary{}, err
		}
	}
	imp := &run{cfg: im.cfg, opts: opts, seen: map[string]int{}}
	if im.cfg.TagLimits != nil {
		imp.limits = im.cfg.TagLimits()
	}
	imp.sum = api.ImportSummary{Mode: opts.Mode, DryRun: opts.DryRun, Atomic: opts.Atomic, Errors: []api.ImportError{}}
	if opts.Atomic && !opts.DryRun {
		var r [8]byte
		_, _ = rand.Read(r[:])
		imp.stage = "import-" + strconv.FormatInt(time.Now().Unix(), 10) + "-" + hex.EncodeToString(r[:])
	}
	return imp.run(ctx, body)
}

func (imp *run) run(ctx context.Context, body io.Reader) (api.ImportSummary, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	batches := make(chan []raftstore.ImportedDevice)
	var wg sync.WaitGroup
	for range inFlight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for batch := range batches {
				imp.propose(ctx, batch, cancel)
			}
		}()
	}
	readErr := imp.read(ctx, body, batches)
	close(batches)
	wg.Wait()
	return imp.finish(ctx, readErr)
}

// read parses every line and hands full batches to the proposers.
func (imp *run) read(ctx context.Context, body io.Reader, batches chan<- []raftstore.ImportedDevice) error {
	lr := identityfile.NewReader(body, api.MaxImportLineBytes)
	pending := make([]raftstore.ImportedDevice, 0, batchDevices)
	pendingBytes := 0
	flush := func() bool {
		batch := imp.check(pending)
		pending, pendingBytes = make([]raftstore.ImportedDevice, 0, batchDevices), 0
		if len(batch) == 0 {
			return true
		}
		select {
		case batches <- batch:
			return true
		case <-ctx.Done():
			return false
		}
	}
	for {
		n, line, err := lr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if errors.Is(err, identityfile.ErrLineTooLong) {
			imp.countLine()
			imp.fail(api.ImportError{Line: n, Message: fmt.Sprintf("longer than %d bytes, the cap of a line", api.MaxImportLineBytes)})
			continue
		}
		if err != nil {
			return fmt.Errorf("read the file at line %d: %w", n+1, err)
		}
		imp.countLine()
		id, err := identityfile.Parse(line)
		if err != nil {
			imp.fail(lineError(n, "", err))
			continue
		}
		if first, ok := imp.seen[id.ID]; ok {
			imp.fail(api.ImportError{Line: n, DeviceID: id.ID, Field: "id", Message: fmt.Sprintf("device %s is also on line %d: a device may be given once", id.ID, first)})
			continue
		}
		imp.seen[id.ID] = n
		if imp.opts.Mode != raftstore.ImportDelete && imp.limits != nil {
			if err := imp.limits(id.ID, id.Tags); err != nil {
				imp.fail(lineError(n, id.ID, err))
				continue
			}
		}
		d := raftstore.ImportedDevice{Line: n, ID: id.ID}
		if imp.opts.Mode != raftstore.ImportDelete {
			d.Status, d.Tags, d.Keys = id.Status, id.Tags, id.KeyHashes()
		}
		pending, pendingBytes = append(pending, d), pendingBytes+len(line)
		if (len(pending) == batchDevices || pendingBytes >= batchBytes) && !flush() {
			return nil
		}
		if ctx.Err() != nil {
			return nil // a proposer stopped the import
		}
	}
	if len(pending) > 0 {
		flush()
	}
	return nil
}

func lineError(line int, id string, err error) api.ImportError {
	e := api.ImportError{Line: line, DeviceID: id, Message: err.Error()}
	var ve *fleet.ValidationError
	if errors.As(err, &ve) {
		e.Field, e.Message = ve.Field, ve.Msg
	}
	return e
}

func (imp *run) countLine() {
	imp.mu.Lock()
	imp.sum.Lines++
	imp.mu.Unlock()
}

func (imp *run) fail(e api.ImportError) {
	imp.mu.Lock()
	defer imp.mu.Unlock()
	imp.sum.Failed++
	imp.errs = append(imp.errs, e)
}

func (imp *run) refused() bool {
	imp.mu.Lock()
	defer imp.mu.Unlock()
	return imp.opts.Atomic && imp.sum.Failed > 0
}

// check compares a batch with the replica: it fails what cannot be
// (create of a device that exists, delete of one that does not), counts
// an upsert that would change nothing as unchanged, and, for a dry run,
// counts what would happen. It returns what is left to propose (nothing
// for a dry run, or an atomic import already refused).
func (imp *run) check(batch []raftstore.ImportedDevice) []raftstore.ImportedDevice {
	out := batch[:0]
	var fails []api.ImportError
	var created, updated, unchanged, deleted, withoutKeys int
	err := imp.cfg.Store.View(func(r *raftstore.Reader) error {
		for _, d := range batch {
			exists := r.HasDevice(d.ID)
			switch imp.opts.Mode {
			case raftstore.ImportCreate:
				if exists {
					fails = append(fails, api.ImportError{Line: d.Line, DeviceID: d.ID, Message: fmt.Sprintf("device %s already exists (import it with --mode upsert to replace it)", d.ID)})
					continue
				}
			case raftstore.ImportDelete:
				if !exists {
					fails = append(fails, api.ImportError{Line: d.Line, DeviceID: d.ID, Message: fmt.Sprintf("device %s does not exist", d.ID)})
					continue
				}
				deleted++
				out = append(out, d)
				continue
			case raftstore.ImportUpsert:
				if exists {
					old, err := r.Device(d.ID)
					if err != nil {
						return err
					}
					if raftstore.SameIdentity(old, d) {
						unchanged++
						continue
					}
					updated++
					out = append(out, d)
					continue
				}
			}
			created++
			if d.Keys == nil {
				withoutKeys++
			}
			out = append(out, d)
		}
		return nil
	})
	imp.mu.Lock()
	defer imp.mu.Unlock()
	if err != nil {
		// The replica could not be read: propose the batch as it is; the
		// state machine checks every device again.
		return batch
	}
	imp.sum.Failed += len(fails)
	imp.errs = append(imp.errs, fails...)
	imp.sum.Unchanged += unchanged
	imp.sum.WithoutKeys += withoutKeys
	if imp.opts.DryRun {
		imp.sum.Created += created
		imp.sum.Updated += updated
		imp.sum.Deleted += deleted
		return nil
	}
	if imp.opts.Atomic && imp.sum.Failed > 0 {
		return nil // refused: nothing more is staged
	}
	return out
}

// propose proposes one batch and counts what it did; a failure that is
// not a device's own stops the import.
func (imp *run) propose(ctx context.Context, batch []raftstore.ImportedDevice, stop context.CancelFunc) {
	if ctx.Err() != nil || imp.refused() {
		return
	}
	cmd := raftstore.ImportDevices{Mode: imp.opts.Mode, Stage: imp.stage, Devices: batch, Time: now(), Actor: imp.cfg.Actor}
	res, err := imp.cfg.Store.Apply(ctx, cmd)
	imp.mu.Lock()
	defer imp.mu.Unlock()
	if err != nil {
		if imp.stopped == nil {
			imp.stopped, imp.stopAt = err, batch[0].Line
		}
		stop()
		return
	}
	if imp.stage != "" {
		imp.staged = true
		return
	}
	imp.count(res.Import)
}

// count adds an entry's result (under mu).
func (imp *run) count(r *raftstore.ImportResult) {
	if r == nil {
		return
	}
	imp.sum.Created += r.Created
	imp.sum.Updated += r.Updated
	imp.sum.Unchanged += r.Unchanged
	imp.sum.Deleted += r.Deleted
	imp.sum.Failed += len(r.Failed)
	for _, f := range r.Failed {
		imp.errs = append(imp.errs, api.ImportError{Line: f.Line, DeviceID: f.ID, Message: f.Msg})
	}
}

// finish commits or drops an atomic import's stage and puts the summary
// together.
func (imp *run) finish(ctx context.Context, readErr error) (api.ImportSummary, error) {
	imp.mu.Lock()
	stopped, stopAt, staged := imp.stopped, imp.stopAt, imp.staged
	imp.mu.Unlock()
	if stopped == nil && readErr != nil {
		stopped, stopAt = readErr, imp.sum.Lines+1
	}
	if stopped != nil {
		if staged {
			imp.dropStage()
		}
		return imp.summary(), &api.ImportStoppedError{Summary: imp.summary(), Line: stopAt, Err: stopped}
	}
	if !imp.opts.Atomic || imp.opts.DryRun {
		return imp.summary(), nil
	}
	if imp.sum.Failed > 0 {
		if staged {
			imp.dropStage()
		}
		sum := imp.summary()
		return sum, &api.ImportRefusedError{Summary: sum, Err: refusal(sum, fleet.ErrInvalid)}
	}
	if !staged {
		return imp.summary(), nil // nothing to change (every device unchanged, or an empty file)
	}
	res, err := imp.cfg.Store.Apply(ctx, raftstore.FinishImport{Stage: imp.stage, Commit: true, Time: now(), Actor: imp.cfg.Actor})
	imp.mu.Lock()
	if res != nil {
		imp.count(res.Import)
	}
	imp.mu.Unlock()
	sum := imp.summary()
	switch {
	case err != nil && errors.Is(err, fleet.ErrConflict):
		sum.Created, sum.Updated, sum.Deleted = 0, 0, 0
		return sum, &api.ImportRefusedError{Summary: sum, Err: refusal(sum, fleet.ErrConflict)}
	case err != nil:
		// Committed or not: the outcome is the raft error's to say
		// (unknown for a lost leader). Devices are all there or none.
		return sum, fmt.Errorf("commit the atomic import: %w", err)
	}
	return sum, nil
}

// refusal is the error of an atomic import refused whole, naming its
// first failed lines.
func refusal(sum api.ImportSummary, class error) error {
	if len(sum.Errors) == 0 {
		return fmt.Errorf("the import was refused; nothing was imported (atomic): %w", class)
	}
	first := sum.Errors[0]
	var lines []string
	for _, e := range sum.Errors[:min(len(sum.Errors), 10)] {
		lines = append(lines, strconv.Itoa(e.Line))
	}
	more := ""
	if sum.Failed > len(lines) {
		more = ", ..."
	}
	msg := first.Message
	if first.Field != "" {
		msg = first.Field + ": " + msg
	}
	err := &fleet.ValidationError{Field: fmt.Sprintf("line %d", first.Line),
		Msg: fmt.Sprintf("%s; %d lines failed (lines %s%s); nothing was imported (atomic)", msg, sum.Failed, strings.Join(lines, ", "), more)}
	if class == fleet.ErrInvalid {
		return err
	}
	return fmt.Errorf("%w: %w", err, class)
}

// dropStage drops an atomic import's staged batches (best effort: a stage
// left behind is dropped a day later by any import's finish).
func (imp *run) dropStage() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := imp.cfg.Store.Apply(ctx, raftstore.FinishImport{Stage: imp.stage, Time: now(), Actor: imp.cfg.Actor}); err != nil {
		imp.cfg.Logger.Warn("could not drop an atomic import's staged devices; they are dropped within a day", "stage", imp.stage, "err", err)
	}
}

// summary is the summary so far, its errors in line order and capped.
func (imp *run) summary() api.ImportSummary {
	imp.mu.Lock()
	defer imp.mu.Unlock()
	slices.SortFunc(imp.errs, func(a, b api.ImportError) int { return a.Line - b.Line })
	sum := imp.sum
	sum.Errors = imp.errs[:min(len(imp.errs), api.MaxImportErrors)]
	sum.ErrorsOmitted = len(imp.errs) - len(sum.Errors)
	if sum.Errors == nil {
		sum.Errors = []api.ImportError{}
	}
	return sum
}

// now is the time an entry carries: UTC, to the microsecond, as every
// other command's.
func now() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }
