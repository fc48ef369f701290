package history

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"appliance/evaluator"
	"appliance/fleet"
	"appliance/internal/testlog"
)

// TestHistory_Retention: at most perKey events per subject, none older
// than the retention, across separate writes and across a restart.
func TestHistory_Retention(t *testing.T) {
	// The writer counts a subject's events from the file the first time.
	path := t.TempDir() + "/h.db"
	h, err := Open(path, false, time.Hour, 3, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	assign := func(h *History, index uint64, at time.Time) {
		h.Add(Item{Event: fleet.HistoryEvent{Time: at, Index: index}, Cause: "test",
			Moves: []evaluator.Change{{DeviceID: "x", To: "d"}, {DeviceID: "y", To: "d"}}})
	}
	indexes := func(h *History, subject string) []uint64 {
		evs, err := h.Events(false, subject, 100)
		if err != nil {
			t.Fatal(err)
		}
		var out []uint64
		for _, ev := range evs {
			out = append(out, ev.Index)
		}
		return out
	}
	for i := range 10 {
		assign(h, uint64(i+1), time.Now())
	}
	assign(h, 0, time.Now().Add(-2*time.Hour))
	h.Flush()
	if got := indexes(h, "x"); !slices.Equal(got, []uint64{10, 9, 8}) {
		t.Fatalf("after retention: x has events %v", got)
	}
	assign(h, 11, time.Now())
	assign(h, 12, time.Now())
	h.Flush()
	if got := indexes(h, "y"); !slices.Equal(got, []uint64{12, 11, 10}) {
		t.Fatalf("after a second write: y has events %v", got)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	h, err = Open(path, false, time.Hour, 3, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	assign(h, 13, time.Now())
	h.Flush()
	if got := indexes(h, "x"); !slices.Equal(got, []uint64{13, 12, 11}) {
		t.Fatalf("after a restart: x has events %v", got)
	}
	if evs, _ := h.Events(false, "x", 1); len(evs) != 1 || evs[0].What != "applied deployment none → d (test)" || evs[0].Kind != "assigned" || evs[0].Deployment != "d" {
		t.Fatalf("assignment event %+v", evs)
	}
}

// TestHistory_AgeRetention: events older than the retention go when their
// subject is next written, however few it has (the cap per subject is far
// away here), and a deployment's events the same way as a device's.
func TestHistory_AgeRetention(t *testing.T) {
	h, err := Open(filepath.Join(t.TempDir(), "h.db"), false, time.Hour, 100, testlog.New(t, slog.LevelInfo))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	now := time.Now()
	write := func(index uint64, at time.Time) {
		h.Add(Item{Event: fleet.HistoryEvent{Time: at, Index: index}, Cause: "test", Moves: []evaluator.Change{{DeviceID: "x", To: "d"}}},
			Item{Deployment: "dep", Event: fleet.HistoryEvent{Time: at, Index: index, Kind: "updated"}})
		h.Flush()
	}
	indexes := func(deployment bool, subject string) []uint64 {
		evs, err := h.Events(deployment, subject, 100)
		if err != nil {
			t.Fatal(err)
		}
		var out []uint64
		for _, ev := range evs {
			out = append(out, ev.Index)
		}
		return out
	}
	write(1, now.Add(-3*time.Hour))
	write(2, now.Add(-2*time.Hour))
	write(3, now.Add(-30*time.Minute))
	write(4, now)
	for _, deployment := range []bool{false, true} {
		if got := indexes(deployment, map[bool]string{false: "x", true: "dep"}[deployment]); !slices.Equal(got, []uint64{4, 3}) {
			t.Errorf("deployment=%v: events %v after a write, want [4 3]: the ones older than an hour must go", deployment, got)
		}
	}
}

// TestDecodeEvent_ChecksumEndingInABrace: an event whose checksum's last
// byte is '}' (one in 256) reads back; an earlier release's plain JSON
// reads too; a changed byte reads as damage.
func TestDecodeEvent_ChecksumEndingInABrace(t *testing.T) {
	var data []byte
	for i := uint64(1); ; i++ {
		var err error
		if data, err = encodeEvent(fleet.HistoryEvent{Time: time.Unix(0, 0).UTC(), Index: i, Kind: "assigned", What: "x"}); err != nil {
			t.Fatal(err)
		}
		if data[len(data)-1] == '}' {
			break
		}
	}
	if ev, err := decodeEvent(data); err != nil || ev.Kind != "assigned" {
		t.Fatalf("an event whose checksum ends in '}': %+v, %v", ev, err)
	}
	plain, _ := json.Marshal(fleet.HistoryEvent{Index: 9, Kind: "created"})
	if ev, err := decodeEvent(plain); err != nil || ev.Index != 9 {
		t.Fatalf("an earlier release's event: %+v, %v", ev, err)
	}
	damaged := append([]byte{}, data...)
	damaged[3] ^= 1
	if _, err := decodeEvent(damaged); !errors.Is(err, errEventDamaged) {
		t.Fatalf("a changed byte: %v, want errEventDamaged", err)
	}
}

// TestHistory_DeviceEvents: a device's own events (not derived from the
// log) recorded at the index the node had applied sit after that index's
// assignment, in time order; two at the same index are both kept, in
// separate writes too; the same event recorded twice (as every node
// records it) is one.
func TestHistory_DeviceEvents(t *testing.T) {
	h, err := Open(filepath.Join(t.TempDir(), "h.db"), false, time.Hour, 100, testlog.New(t, slog.LevelInfo))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	t0 := time.Now().UTC()
	restart := func(at time.Time, what string) Item {
		return Item{Device: "x", Event: fleet.HistoryEvent{Time: at, Index: 5, Kind: fleet.HistoryModuleRestarted, What: what}}
	}
	h.Add(Item{Event: fleet.HistoryEvent{Time: t0, Index: 5}, Cause: "test", Moves: []evaluator.Change{{DeviceID: "x", To: "d"}}})
	h.Add(restart(t0.Add(time.Second), "first"))
	h.Flush()
	h.Add(restart(t0.Add(2*time.Second), "second"), restart(t0.Add(time.Second), "first"))
	h.Add(Item{Event: fleet.HistoryEvent{Time: t0.Add(3 * time.Second), Index: 6}, Cause: "test", Moves: []evaluator.Change{{DeviceID: "x", From: "d"}}})
	h.Flush()
	evs, err := h.Events(false, "x", 100)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range evs {
		got = append(got, e.Kind+":"+e.What)
	}
	want := []string{"assigned:applied deployment d → none (test)", "module-restarted:second", "module-restarted:first", "assigned:applied deployment none → d (test)"}
	if !slices.Equal(got, want) {
		t.Errorf("events, newest first:\n got %q\nwant %q", got, want)
	}
}

// TestHistory_StopIsBounded: what is queued when the node stops is written
// within one budget for the whole stop and the rest dropped, counted and
// logged, never lost without a word; with no budget left nothing more is
// written; a stop in
// the middle of a paced write writes or counts every event. Before, the
// stop wrote everything in one transaction: over 30 s after a
// million-device import.
func TestHistory_StopIsBounded(t *testing.T) {
	const devices = 50_000
	fleetMove := func(index uint64) Item {
		moves := make([]evaluator.Change, devices)
		for i := range moves {
			moves[i] = evaluator.Change{DeviceID: fmt.Sprintf("dev-%06d", i), To: "d"}
		}
		return Item{Event: fleet.HistoryEvent{Time: time.Now(), Index: index}, Cause: "test", Moves: moves}
	}
	stored := func(h *History) int {
		n := 0
		h.db.View(func(tx *bolt.Tx) error {
			n = tx.Bucket(bucketDeviceHistory).Stats().KeyN
			return nil
		})
		return n
	}
	open := func(t *testing.T) (*History, *bytes.Buffer) {
		var logs bytes.Buffer
		h, err := Open(filepath.Join(t.TempDir(), "h.db"), false, time.Hour, 100, slog.New(slog.NewTextHandler(&logs, nil)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.Close() })
		return h, &logs
	}

	t.Run("no budget left", func(t *testing.T) {
		h, logs := open(t)
		h.Add(fleetMove(1))
		h.FlushWithin(0)
		if got := stored(h); got != 0 || h.Dropped() != devices {
			t.Fatalf("stored %d, dropped %d; want 0 and %d", got, h.Dropped(), devices)
		}
		if !strings.Contains(logs.String(), "events not written") || !strings.Contains(logs.String(), fmt.Sprintf("events=%d", devices)) {
			t.Fatalf("no warning naming the %d events not written: %s", devices, logs)
		}
		// One budget for the whole stop: a later flush does not start
		// another (the node flushes again after raft has stopped).
		h.Add(fleetMove(2))
		h.FlushWithin(time.Minute)
		if got := stored(h); got != 0 || h.Dropped() != 2*devices {
			t.Fatalf("a second flush of the stop: stored %d, dropped %d; want 0 and %d", got, h.Dropped(), 2*devices)
		}
	})
	t.Run("stopped while writing", func(t *testing.T) {
		h, _ := open(t)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); h.Run(ctx) }()
		h.Add(fleetMove(1), fleetMove(2))
		time.Sleep(historyDelay + 100*time.Millisecond) // the paced write has begun
		cancel()
		<-done
		if got := stored(h); uint64(got)+h.Dropped() != 2*devices || got == 0 {
			t.Fatalf("stored %d + dropped %d, want %d in all and some stored", got, h.Dropped(), 2*devices)
		}
	})
	t.Run("room enough", func(t *testing.T) {
		h, _ := open(t)
		h.Add(fleetMove(1))
		h.FlushWithin(time.Minute)
		if got := stored(h); got != devices || h.Dropped() != 0 {
			t.Fatalf("stored %d, dropped %d; want %d and 0", got, h.Dropped(), devices)
		}
	})
}
