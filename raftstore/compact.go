package raftstore

import (
	"sync"
	"time"
)

// Compacting a log of large entries.
//
// Raft takes a snapshot, and compacts its log behind it, every
// SnapshotThreshold entries (8192), and keeps TrailingLogs (10,240) behind
// the snapshot. Counted in entries, that suits entries of a few hundred
// bytes, not a bulk import's 2 MiB: after a million devices the log held
// 600 entries and 280 MB, all of them read again at every start (the
// checks, raft's own scan for configurations, the replay), seconds of a
// restart for nothing. So the store also counts the bytes of the entries
// applied since the last snapshot, and once they pass compactBytes and the
// stream has paused (an import has ended; during one, a snapshot of the
// growing state file at every step would slow it down), or pass
// compactMaxBytes whatever the stream does, it takes a snapshot with a
// trailing window of compactKeepBytes of entries instead of 10,240.

// Defaults of the byte-based compaction (Config's unexported fields
// override them in tests).
const (
	defaultCompactBytes     = 64 << 20
	defaultCompactMaxBytes  = 1 << 30
	defaultCompactKeepBytes = 8 << 20
	defaultCompactEvery     = 5 * time.Second
)

// logSizes follows the sizes of the entries the state machine receives
// (it is fed by ApplyBatch, replays at start included).
type logSizes struct {
	mu        sync.Mutex
	sinceSnap int64    // bytes applied since the last snapshot
	ring      []uint32 // sizes of the newest entries, oldest overwritten
	next      int      // where the next size goes
	full      bool
}

func newLogSizes(capacity uint64) *logSizes {
	return &logSizes{ring: make([]uint32, max(capacity, 1))}
}

func (l *logSizes) add(size int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sinceSnap += int64(size)
	l.ring[l.next] = uint32(min(size, 1<<31))
	if l.next++; l.next == len(l.ring) {
		l.next, l.full = 0, true
	}
}

// snapshotTaken: the state machine's snapshot covers every entry so far.
func (l *logSizes) snapshotTaken() {
	l.mu.Lock()
	l.sinceSnap = 0
	l.mu.Unlock()
}

func (l *logSizes) pending() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.sinceSnap
}

// trailing is how many of the newest entries fit in keep bytes (at least
// one), or all when every entry the ring remembers fits: then the usual
// count, whole.
func (l *logSizes) trailing(keep int64, all uint64) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.next
	if l.full {
		n = len(l.ring)
	}
	var sum int64
	for k := 0; k < n; k++ {
		i := (l.next - 1 - k + len(l.ring)) % len(l.ring)
		if sum += int64(l.ring[i]); sum > keep {
			return max(uint64(k), 1)
		}
	}
	return all
}

// compactLoop runs on every node while the store is open: every
// compactEvery it compacts the log when the bytes since the last snapshot
// call for it (above).
func (s *Store) compactLoop() {
	defer close(s.compactDone)
	t := time.NewTicker(s.compact.every)
	defer t.Stop()
	var last int64
	for {
		select {
		case <-s.closing:
			return
		case <-s.halted:
			return
		case <-t.C:
		}
		n := s.fsm.sizes.pending()
		paused := n-last < s.compact.bytes/64
		last = n
		if n >= s.compact.maxBytes || n >= s.compact.bytes && paused {
			s.compactLog(n)
			last = s.fsm.sizes.pending()
		}
	}
}

// compactLog takes a snapshot and lets raft compact the log behind it down
// to the newest compact.keepBytes of entries.
func (s *Store) compactLog(pending int64) {
	rc := s.raft.ReloadableConfig()
	all := rc.TrailingLogs
	keep := s.fsm.sizes.trailing(s.compact.keepBytes, all)
	rc.TrailingLogs = keep
	if err := s.raft.ReloadConfig(rc); err != nil {
		s.logger.Warn("compact the raft log", "err", err)
		return
	}
	start := time.Now()
	err := s.raft.Snapshot().Error()
	rc.TrailingLogs = all
	if rerr := s.raft.ReloadConfig(rc); rerr != nil {
		s.logger.Warn("compact the raft log: restore the trailing entries", "err", rerr)
	}
	if err != nil {
		s.logger.Warn("compact the raft log: snapshot", "err", err, "log_bytes", pending)
		return
	}
	s.logger.Info("compacted the raft log: its entries since the last snapshot passed the bound in bytes",
		"log_bytes", pending, "trailing_entries", keep, "took", time.Since(start).Round(time.Millisecond))
}
