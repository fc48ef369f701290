package northbound

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"appliance/fleet"
)

// ErrMalformed: a batch that does not decode; sending it again cannot
// help (the broker answers it "payload format invalid").
var ErrMalformed = errors.New("malformed upstream batch")

// Ingest takes one upstream batch of a device (fleet.UpstreamTopic's
// payload) and returns once its messages are on disk: only then may the
// device's PUBACK go out (the device drops them from its queue after it).
// An error means nothing of the batch was kept and the device must send
// it again (ErrMalformed: it cannot be kept at all). It waits at most
// Limits.AppendTimeout.
//
// Messages this node already took from the device in its previous batch
// (the device sends a batch again when its acknowledgement was lost) are
// counted as duplicates and not stored twice.
func (s *Server) Ingest(ctx context.Context, deviceID string, payload []byte) error {
	batch, err := fleet.DecodeUpstreamBatch(payload)
	if err != nil {
		s.stats.batchesRefused.Add(1)
		if n, ok := s.clientLog.Allow(); ok {
			s.log.Warn("upstream batch refused", "device", deviceID, "error", err, "suppressed", n)
		}
		return fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	d := s.dedupe.device(deviceID)
	d.mu.Lock() // one batch of a device at a time: its messages stay in order
	defer d.mu.Unlock()
	now := time.Now()
	recs := make([][]byte, 0, len(batch.Messages))
	seqs := make([]uint64, 0, len(batch.Messages))
	dups := 0
	for i := range batch.Messages {
		m := &batch.Messages[i]
		if d.seen(m.Seq) {
			dups++
			continue
		}
		recs = append(recs, encodeRecord(nil, now, deviceID, m))
		seqs = append(seqs, m.Seq)
	}
	if len(recs) > 0 {
		ctx, cancel := context.WithTimeout(ctx, s.lim.AppendTimeout)
		defer cancel()
		if _, err := s.rlog.Append(ctx, recs); err != nil {
			s.stats.batchesRefused.Add(1)
			return err
		}
	}
	d.remember(seqs)
	s.stats.batchesIn.Add(1)
	s.stats.in.Add(uint64(len(recs)))
	s.stats.duplicates.Add(uint64(dups))
	return nil
}

// dedupe keeps, per device, the sequence numbers of the last batch this
// node stored: a device sends the same batch again (minus what expired)
// only when it did not get the acknowledgement, and builds the next batch
// only after one. After a node restart, or when the device moves to
// another node, a batch sent again is stored again: consumers see it
// twice, with the same $sequenceNumber (at-least-once).
type dedupe struct {
	mu      sync.Mutex
	devices map[string]*deviceSeqs
}

// deviceSeqs holds a device's last batch's sequence numbers as sorted
// runs of consecutive numbers: a queue's messages mostly are, so a batch
// of a thousand usually costs a few runs, not a thousand numbers. A batch
// of more than maxSeqRuns runs is not remembered (its resending would be
// stored twice: at-least-once), so a device costs at most a few KiB.
type deviceSeqs struct {
	mu   sync.Mutex
	last []seqRun
}

type seqRun struct{ from, to uint64 }

const maxSeqRuns = 256

func (d *dedupe) device(id string) *deviceSeqs {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.devices == nil {
		d.devices = map[string]*deviceSeqs{}
	}
	ds := d.devices[id]
	if ds == nil {
		ds = &deviceSeqs{}
		d.devices[id] = ds
	}
	return ds
}

func (ds *deviceSeqs) seen(seq uint64) bool {
	i, _ := slices.BinarySearchFunc(ds.last, seq, func(r seqRun, s uint64) int {
		switch {
		case r.to < s:
			return -1
		case r.from > s:
			return 1
		}
		return 0
	})
	return i < len(ds.last) && ds.last[i].from <= seq && seq <= ds.last[i].to
}

func (ds *deviceSeqs) remember(seqs []uint64) {
	if len(seqs) == 0 {
		return // a batch of duplicates only: the last one still stands
	}
	sorted := slices.Clone(seqs)
	slices.Sort(sorted)
	ds.last = ds.last[:0]
	for _, s := range sorted {
		if n := len(ds.last); n > 0 && ds.last[n-1].to+1 >= s {
			ds.last[n-1].to = max(ds.last[n-1].to, s)
			continue
		}
		if len(ds.last) == maxSeqRuns {
			ds.last = nil
			return
		}
		ds.last = append(ds.last, seqRun{s, s})
	}
}

// forget drops what is kept for devices (deleted ones).
func (d *dedupe) forget(id string) {
	d.mu.Lock()
	delete(d.devices, id)
	d.mu.Unlock()
}

// ForgetDevice drops the node's memory of a device's last batch (the
// device was deleted).
func (s *Server) ForgetDevice(id string) { s.dedupe.forget(id) }
