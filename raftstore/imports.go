package raftstore

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"appliance/fleet"
)

// Bulk import of device identities (appliance device import): a file of
// many devices is proposed as ImportDevices entries of a few thousand
// devices each, so that a million devices cost a few hundred entries, not a
// million. An atomic import stages its entries aside (buckets importStages
// and importStaged) and FinishImport applies them all in one entry, or
// drops them: until then no device changes.

// Import modes.
const (
	ImportCreate = "create" // a device that exists is a failure of its line
	ImportUpsert = "upsert" // create, or replace status, tags and (when given) keys; equal devices are left alone
	ImportDelete = "delete" // a device that does not exist is a failure of its line
)

// ValidImportMode tells the import modes apart from anything else.
func ValidImportMode(mode string) bool {
	return mode == ImportCreate || mode == ImportUpsert || mode == ImportDelete
}

// Command types of the bulk import (numbers 27-29 belong to it; 29 is
// unused).
const (
	CmdImportDevices CommandType = 27 // a batch of device identities created, replaced or deleted
	CmdFinishImport  CommandType = 28 // apply or drop an atomic import's staged batches
)

// ImportedDevice is one device of an ImportDevices batch: the line of the
// file it came from (for failures), and what the device becomes. Short
// JSON names: a million of them travel through the log.
type ImportedDevice struct {
	Line   int            `json:"l,omitempty"`
	ID     string         `json:"id"`
	Status string         `json:"s,omitempty"`
	Tags   map[string]any `json:"t,omitempty"`
	// Keys are the digests of the device's keys; nil: the line had none
	// (a created device then has no key and cannot connect until
	// `device keys regenerate`; a replaced one keeps its keys).
	Keys *fleet.KeyHashes `json:"k,omitempty"`
}

// ImportDevices creates, replaces or deletes a batch of devices (Mode),
// each on its own: a device that cannot be (create: it exists; delete: it
// does not) is a failure of its line in the result, and the others are
// applied. With Stage set the batch is only kept aside for FinishImport.
type ImportDevices struct {
	Mode    string           `json:"mode"`
	Stage   string           `json:"stage,omitempty"`
	Devices []ImportedDevice `json:"devices"`
	Time    time.Time        `json:"time"`
	Actor   string           `json:"actor,omitempty"`
}

func (ImportDevices) Type() CommandType { return CmdImportDevices }

// FinishImport ends an atomic import: with Commit, every staged batch of
// Stage is applied in this entry, all or nothing (one device that cannot
// be refuses them all, with every such device's line in the result);
// without, they are dropped. Either way the stage is gone afterwards, and
// so is any other stage left for over staleStageAge (an importer that
// died before it finished).
type FinishImport struct {
	Stage  string    `json:"stage"`
	Commit bool      `json:"commit,omitempty"`
	Time   time.Time `json:"time"`
	Actor  string    `json:"actor,omitempty"`
}

func (FinishImport) Type() CommandType { return CmdFinishImport }

// ImportResult counts what an import entry did.
type ImportResult struct {
	Created   int             `json:"created,omitempty"`
	Updated   int             `json:"updated,omitempty"`
	Unchanged int             `json:"unchanged,omitempty"`
	Deleted   int             `json:"deleted,omitempty"`
	Staged    int             `json:"staged,omitempty"`
	Failed    []ImportFailure `json:"failed,omitempty"`
}

// ImportFailure is a device an import entry could not apply.
type ImportFailure struct {
	Line int    `json:"line"`
	ID   string `json:"id"`
	// Code is the error's class (exists, not_found, invalid).
	Code string `json:"code"`
	Msg  string `json:"msg"`
}

// maxStageFailures bounds the failures a refused commit lists.
const maxStageFailures = 1000

// staleStageAge: a stage older than this is dropped by the next
// FinishImport of any import.
const staleStageAge = 24 * time.Hour

var (
	bucketImportStages = []byte("importStages") // stage -> stageInfo
	bucketImportStaged = []byte("importStaged") // stage \x00 index -> ImportDevices batch
)

type stageInfo struct {
	Mode    string    `json:"mode"`
	Started time.Time `json:"started"`
	Devices int       `json:"devices"`
}

func (w *writer) importDevices(index uint64, c *ImportDevices) *Result {
	if !ValidImportMode(c.Mode) {
		return &Result{Index: index, Err: fleet.Invalid("mode", "must be %s, %s or %s; got %q", ImportCreate, ImportUpsert, ImportDelete, c.Mode)}
	}
	if c.Stage != "" {
		return w.stageImport(index, c)
	}
	w.packDevices()
	res := &ImportResult{}
	for i := range c.Devices {
		if f := w.importOne(index, c.Mode, &c.Devices[i], c.Time, c.Actor, res); f != nil {
			res.Failed = append(res.Failed, *f)
		}
	}
	return &Result{Index: index, Import: res}
}

// importFillPercent is how full bbolt fills the devices' pages in an
// import's transaction. An export file lists devices in id order, so an
// import appends: at bbolt's default (half) every page it writes is left
// less than half full, and the state file, which every open walks page by
// page, is twice the size it needs (41 % of its pages in use, measured
// after 300,000 devices).
const importFillPercent = 0.9

// packDevices has this transaction fill the devices' pages up to
// importFillPercent. It changes how pages are laid out, not what they
// hold: the content and its digest are the same on every replica.
func (w *writer) packDevices() {
	w.tx.Bucket(bucketDevices).FillPercent = importFillPercent
}

// importOne applies one device of an import and counts it, or returns why
// it cannot be applied.
func (w *writer) importOne(index uint64, mode string, d *ImportedDevice, at time.Time, actor string, res *ImportResult) *ImportFailure {
	b := w.tx.Bucket(bucketDevices)
	old := mustGet[fleet.Device](b, d.ID)
	switch {
	case mode == ImportDelete && old == nil:
		return &ImportFailure{Line: d.Line, ID: d.ID, Code: codeNotFound, Msg: fmt.Sprintf("device %q does not exist", d.ID)}
	case mode == ImportDelete:
		w.del(bucketDevices, []byte(d.ID))
		w.del(bucketReports, []byte(d.ID))
		w.forgetRolloutDevice(d.ID)
		w.changes = append(w.changes, Change{Index: index, Kind: DeviceDeleted, ID: d.ID, Time: at, Actor: actor, Imported: true})
		res.Deleted++
		return nil
	case mode == ImportCreate && old != nil:
		return &ImportFailure{Line: d.Line, ID: d.ID, Code: codeExists, Msg: fmt.Sprintf("device %q already exists", d.ID)}
	}
	nw := fleet.Device{ID: d.ID, Tags: d.Tags, Status: d.Status, Authentication: fleet.Authentication{Type: "sas", KeyHashes: d.Keys}}
	if nw.Tags == nil {
		nw.Tags = map[string]any{}
	}
	if nw.Status == "" {
		nw.Status = fleet.DeviceEnabled
	}
	credentials := false
	if old == nil {
		nw.CreatedTimeUTC = at
		res.Created++
	} else {
		if d.Keys == nil {
			nw.Authentication = old.Authentication
		}
		if sameIdentity(*old, nw) {
			res.Unchanged++
			return nil
		}
		credentials = old.Status != nw.Status || !sameKeys(old.Authentication.KeyHashes, nw.Authentication.KeyHashes)
		nw.CreatedTimeUTC, nw.Enrollment = old.CreatedTimeUTC, old.Enrollment
		nw.ResetIndex, nw.ResetTimeUTC = old.ResetIndex, old.ResetTimeUTC
		res.Updated++
	}
	nw.LastUpdatedTimeUTC = at
	nw.Etag = etagFor(index)
	w.putJSON(bucketDevices, nw.ID, nw)
	w.changes = append(w.changes, Change{Index: index, Kind: DevicePut, ID: nw.ID, Device: &nw, Time: at, Actor: actor,
		Created: old == nil, CredentialsChanged: credentials, Imported: true})
	return nil
}

// sameIdentity: an import would change nothing of the device (status,
// tags, keys), so it is left alone, its etag kept.
func sameIdentity(old, nw fleet.Device) bool {
	if old.Status != nw.Status || !sameKeys(old.Authentication.KeyHashes, nw.Authentication.KeyHashes) {
		return false
	}
	a, errA := json.Marshal(old.Tags)
	b, errB := json.Marshal(nw.Tags)
	if old.Tags == nil {
		a = []byte("{}")
	}
	return errA == nil && errB == nil && string(a) == string(b)
}

func sameKeys(a, b *fleet.KeyHashes) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

// stageImport keeps a batch aside for FinishImport.
func (w *writer) stageImport(index uint64, c *ImportDevices) *Result {
	info := mustGet[stageInfo](w.bucket(bucketImportStages), c.Stage)
	if info == nil {
		info = &stageInfo{Mode: c.Mode, Started: c.Time}
	} else if info.Mode != c.Mode {
		return &Result{Index: index, Err: fmt.Errorf("import %s: staged as %s, this batch is %s: %w", c.Stage, info.Mode, c.Mode, fleet.ErrConflict)}
	}
	info.Devices += len(c.Devices)
	w.putJSON(bucketImportStages, c.Stage, info)
	batch := *c
	batch.Stage = ""
	w.putJSON(bucketImportStaged, string(stagedKey(c.Stage, index)), batch)
	return &Result{Index: index, Import: &ImportResult{Staged: len(c.Devices)}}
}

func stagedKey(stage string, index uint64) []byte {
	k := make([]byte, 0, len(stage)+9)
	k = append(k, stage...)
	k = append(k, 0)
	return binary.BigEndian.AppendUint64(k, index)
}

// stagedBatches lists a stage's batches in the order they were staged.
func (w *writer) stagedBatches(stage string) (keys [][]byte, batches []ImportDevices) {
	b := w.tx.Bucket(bucketImportStaged)
	if b == nil {
		return nil, nil
	}
	prefix := append([]byte(stage), 0)
	c := b.Cursor()
	for k, v := c.Seek(prefix); k != nil && len(k) == len(prefix)+8 && string(k[:len(prefix)]) == string(prefix); k, v = c.Next() {
		var batch ImportDevices
		if err := json.Unmarshal(v, &batch); err != nil {
			panic(fmt.Sprintf("decode staged import %q: %v", k, err))
		}
		keys = append(keys, slices.Clone(k))
		batches = append(batches, batch)
	}
	return keys, batches
}

func (w *writer) finishImport(index uint64, c *FinishImport) *Result {
	info := (*stageInfo)(nil)
	if b := w.tx.Bucket(bucketImportStages); b != nil {
		info = mustGet[stageInfo](b, c.Stage)
	}
	defer w.dropStaleStages(c.Time)
	if info == nil {
		return &Result{Index: index, Err: fmt.Errorf("import %s: nothing staged (finished already, or dropped as stale): %w", c.Stage, fleet.ErrNotFound)}
	}
	keys, batches := w.stagedBatches(c.Stage)
	defer w.dropStage(c.Stage, keys)
	if !c.Commit {
		return &Result{Index: index, Import: &ImportResult{}}
	}
	// All or nothing: first find every device that cannot be applied.
	res := &ImportResult{}
	devices := w.tx.Bucket(bucketDevices)
	failures := 0
	for _, batch := range batches {
		for _, d := range batch.Devices {
			exists := devices.Get([]byte(d.ID)) != nil
			var f *ImportFailure
			switch {
			case info.Mode == ImportCreate && exists:
				f = &ImportFailure{Line: d.Line, ID: d.ID, Code: codeExists, Msg: fmt.Sprintf("device %q already exists", d.ID)}
			case info.Mode == ImportDelete && !exists:
				f = &ImportFailure{Line: d.Line, ID: d.ID, Code: codeNotFound, Msg: fmt.Sprintf("device %q does not exist", d.ID)}
			}
			if f == nil {
				continue
			}
			failures++
			if len(res.Failed) < maxStageFailures {
				res.Failed = append(res.Failed, *f)
			}
		}
	}
	if failures > 0 {
		return &Result{Index: index, Import: res, Err: fmt.Errorf("import %s: %d devices cannot be %s (the first on line %d: %s); nothing was imported: %w",
			c.Stage, failures, modePast(info.Mode), res.Failed[0].Line, res.Failed[0].Msg, fleet.ErrConflict)}
	}
	w.packDevices()
	for _, batch := range batches {
		for i := range batch.Devices {
			if f := w.importOne(index, info.Mode, &batch.Devices[i], c.Time, c.Actor, res); f != nil {
				// Checked above, in this same transaction: only a device
				// given twice in the file gets here.
				res.Failed = append(res.Failed, *f)
			}
		}
	}
	return &Result{Index: index, Import: res}
}

func modePast(mode string) string {
	switch mode {
	case ImportCreate:
		return "created"
	case ImportDelete:
		return "deleted"
	}
	return "imported"
}

func (w *writer) dropStage(stage string, keys [][]byte) {
	for _, k := range keys {
		w.del(bucketImportStaged, k)
	}
	w.del(bucketImportStages, []byte(stage))
}

// dropStaleStages drops stages older than staleStageAge at the entry's
// time: their importer died before finishing. Deterministic: the time is
// the entry's.
func (w *writer) dropStaleStages(now time.Time) {
	b := w.tx.Bucket(bucketImportStages)
	if b == nil {
		return
	}
	var stale []string
	_ = b.ForEach(func(k, v []byte) error {
		var info stageInfo
		if json.Unmarshal(v, &info) == nil && now.Sub(info.Started) > staleStageAge {
			stale = append(stale, string(k))
		}
		return nil
	})
	for _, stage := range stale {
		keys, _ := w.stagedBatches(stage)
		w.dropStage(stage, keys)
	}
}

// ImportStages lists the atomic imports staged and not finished (a stage
// is dropped when its import finishes or, left behind, a day later).
func (r *Reader) ImportStages() ([]string, error) {
	b := r.tx.Bucket(bucketImportStages)
	if b == nil {
		return nil, nil
	}
	var out []string
	err := b.ForEach(func(k, _ []byte) error {
		out = append(out, string(k))
		return nil
	})
	return out, err
}

// DeviceIDs calls fn with each device's id in order, without decoding the
// devices, until fn returns false.
func (r *Reader) DeviceIDs(fn func(id string) bool) {
	c := r.tx.Bucket(bucketDevices).Cursor()
	for k, _ := c.First(); k != nil; k, _ = c.Next() {
		if !fn(string(k)) {
			return
		}
	}
}

// HasDevice tells whether a device exists, without decoding it.
func (r *Reader) HasDevice(id string) bool {
	return r.tx.Bucket(bucketDevices).Get([]byte(id)) != nil
}

// SameIdentity tells whether importing d would leave the stored device as
// it is (status, tags, and keys when d gives them): what an upsert counts
// as unchanged.
func SameIdentity(old fleet.Device, d ImportedDevice) bool {
	nw := fleet.Device{Status: d.Status, Tags: d.Tags, Authentication: fleet.Authentication{KeyHashes: d.Keys}}
	if nw.Status == "" {
		nw.Status = fleet.DeviceEnabled
	}
	if nw.Tags == nil {
		nw.Tags = map[string]any{}
	}
	if d.Keys == nil {
		nw.Authentication.KeyHashes = old.Authentication.KeyHashes
	}
	return sameIdentity(old, nw)
}
