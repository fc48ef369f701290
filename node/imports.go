package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
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

// Bulk import and export of device identities (api.ImportBackend): an
// export file is read line by line, validated, checked against the
// replica, and proposed as raftstore.ImportDevices entries of
// importBatchDevices devices, a few in flight at once, so that a million
// devices cost a few hundred entries.

const (
	// importBatchDevices is the size of one ImportDevices entry: large
	// enough that raft, the state file and the assignments take a whole
	// batch in one go, small enough (about 0.5 MB) to replicate at once.
	importBatchDevices = 2000
	// importBatchBytes also ends a batch: devices with large tags make
	// larger entries, and an entry a follower forwards must stay well
	// within the cluster port's cap on a request (8 MiB). Counted as the
	// lines' lengths, which hold more than the entry will.
	importBatchBytes = 2 << 20
	// importInFlight batches are proposed at once; the reader waits for
	// one of them to finish before it reads more (the client's upload
	// waits with it).
	importInFlight = 8
	// exportPage devices are read per read transaction of an export: a
	// long-held read transaction would hold up the state file's growth.
	exportPage = 5000
)

// importer is one import in progress.
type importer struct {
	b      *backend
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

// ImportDevices implements api.ImportBackend.
func (b *backend) ImportDevices(ctx context.Context, body io.Reader, opts api.ImportOptions) (api.ImportSummary, error) {
	if !raftstore.ValidImportMode(opts.Mode) {
		return api.ImportSummary{}, fleet.Invalid("mode", "must be create, upsert or delete; got %q", opts.Mode)
	}
	if err := b.node().servingReads(); err != nil {
		return api.ImportSummary{}, err
	}
	if !opts.DryRun && b.store != nil {
		if err := b.store.CheckCommand(ctx, raftstore.CmdImportDevices); err != nil {
			if errors.Is(err, raftstore.ErrClusterBehind) {
				return api.ImportSummary{}, fmt.Errorf("%w: device import needs every member at this release: %w", api.ErrUpgradeRequired, err)
			}
			return api.ImportSummary{}, err
		}
	}
	imp := &importer{b: b, opts: opts, seen: map[string]int{}, limits: b.tagLimitChecker()}
	imp.sum = api.ImportSummary{Mode: opts.Mode, DryRun: opts.DryRun, Atomic: opts.Atomic, Errors: []api.ImportError{}}
	if opts.Atomic && !opts.DryRun {
		var r [8]byte
		_, _ = rand.Read(r[:])
		imp.stage = "import-" + strconv.FormatInt(time.Now().Unix(), 10) + "-" + hex.EncodeToString(r[:])
	}
	return imp.run(ctx, body)
}

func (imp *importer) run(ctx context.Context, body io.Reader) (api.ImportSummary, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	batches := make(chan []raftstore.ImportedDevice)
	var wg sync.WaitGroup
	for range importInFlight {
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
func (imp *importer) read(ctx context.Context, body io.Reader, batches chan<- []raftstore.ImportedDevice) error {
	lr := identityfile.NewReader(body, api.MaxImportLineBytes)
	pending := make([]raftstore.ImportedDevice, 0, importBatchDevices)
	pendingBytes := 0
	flush := func() bool {
		batch := imp.check(pending)
		pending, pendingBytes = make([]raftstore.ImportedDevice, 0, importBatchDevices), 0
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
		if imp.opts.Mode != raftstore.ImportDelete {
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
		if (len(pending) == importBatchDevices || pendingBytes >= importBatchBytes) && !flush() {
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

func (imp *importer) countLine() {
	imp.mu.Lock()
	imp.sum.Lines++
	imp.mu.Unlock()
}

func (imp *importer) fail(e api.ImportError) {
	imp.mu.Lock()
	defer imp.mu.Unlock()
	imp.sum.Failed++
	imp.errs = append(imp.errs, e)
}

func (imp *importer) refused() bool {
	imp.mu.Lock()
	defer imp.mu.Unlock()
	return imp.opts.Atomic && imp.sum.Failed > 0
}

// check compares a batch with the replica: it fails what cannot be
// (create of a device that exists, delete of one that does not), counts
// an upsert that would change nothing as unchanged, and, for a dry run,
// counts what would happen. It returns what is left to propose (nothing
// for a dry run, or an atomic import already refused).
func (imp *importer) check(batch []raftstore.ImportedDevice) []raftstore.ImportedDevice {
	out := batch[:0]
	var fails []api.ImportError
	var created, updated, unchanged, deleted, withoutKeys int
	err := imp.b.store.View(func(r *raftstore.Reader) error {
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
func (imp *importer) propose(ctx context.Context, batch []raftstore.ImportedDevice, stop context.CancelFunc) {
	if ctx.Err() != nil || imp.refused() {
		return
	}
	cmd := raftstore.ImportDevices{Mode: imp.opts.Mode, Stage: imp.stage, Devices: batch, Time: now(), Actor: operatorActor}
	res, err := imp.b.apply(ctx, cmd)
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
func (imp *importer) count(r *raftstore.ImportResult) {
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
func (imp *importer) finish(ctx context.Context, readErr error) (api.ImportSummary, error) {
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
	res, err := imp.b.apply(ctx, raftstore.FinishImport{Stage: imp.stage, Commit: true, Time: now(), Actor: operatorActor})
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
func (imp *importer) dropStage() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := imp.b.apply(ctx, raftstore.FinishImport{Stage: imp.stage, Time: now(), Actor: operatorActor}); err != nil {
		imp.b.logger.Warn("could not drop an atomic import's staged devices; they are dropped within a day", "stage", imp.stage, "err", err)
	}
}

// summary is the summary so far, its errors in line order and capped.
func (imp *importer) summary() api.ImportSummary {
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

// tagLimitChecker checks devices' tags against the limits of deployments
// per device, as a device write does: nothing to check while the cluster
// holds fewer deployments than a limit.
func (b *backend) tagLimitChecker() func(id string, tags map[string]any) error {
	if !b.tagLimitsReachable() {
		return func(string, map[string]any) error { return nil }
	}
	return b.checkDeviceTagLimits
}

// ExportDevices implements api.ImportBackend: every device in id order,
// exportPage per read transaction.
func (b *backend) ExportDevices(ctx context.Context, fn func(fleet.Device) error) error {
	after := ""
	for {
		page := make([]fleet.Device, 0, exportPage)
		err := b.view(ctx, false, func(r *raftstore.Reader) error {
			return r.Devices(after, func(d fleet.Device) bool {
				page = append(page, d)
				return len(page) < exportPage
			})
		})
		if err != nil {
			return err
		}
		for _, d := range page {
			if err := fn(d); err != nil {
				return err
			}
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if len(page) < exportPage {
			return nil
		}
		after = page[len(page)-1].ID
	}
}
