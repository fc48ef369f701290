package raftstore

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"

	"appliance/fleet"
)

// BenchmarkOpenCheck measures what the integrity checks add to opening a
// node's files, each against its baseline in the same run:
//   - state.db with N devices, each with a ~1 KB report: the checked open
//     (every page read, bbolt's check, the content digest recomputed)
//     against an unchecked open of the same file, and against the scan of
//     every device the node does at open anyway (Observer.Restored);
//   - a log of 10,000 entries, in raft.db (the release before) and in
//     raftlog's log/: the checks before raft starts (raft.db's every page;
//     every entry decoded and its checksum verified) against opening the
//     log store alone, and the migration of raft.db to log/.
//
// BENCH_DEVICES sets N (default 100,000).
func BenchmarkOpenCheck(b *testing.B) {
	devices := 100_000
	if v := os.Getenv("BENCH_DEVICES"); v != "" {
		devices, _ = strconv.Atoi(v)
	}
	statePath := buildStateFile(b, devices)
	st, _ := os.Stat(statePath)
	b.Logf("state.db: %d devices with reports, %d MB", devices, st.Size()>>20)
	logger := testLogger(b)
	b.Run(fmt.Sprintf("state.db/devices=%d/checked", devices), func(b *testing.B) {
		for b.Loop() {
			db, _, err := openStateDB(statePath, true, logger, nil)
			if err != nil {
				b.Fatal(err)
			}
			db.Close()
		}
	})
	b.Run(fmt.Sprintf("state.db/devices=%d/unchecked", devices), func(b *testing.B) {
		for b.Loop() {
			db, _, err := openStateDB(statePath, true, logger, &stateInfo{})
			if err != nil {
				b.Fatal(err)
			}
			db.Close()
		}
	})
	b.Run(fmt.Sprintf("state.db/devices=%d/devices-scan", devices), func(b *testing.B) {
		db, _, err := openStateDB(statePath, true, logger, &stateInfo{})
		if err != nil {
			b.Fatal(err)
		}
		defer db.Close()
		f := &fsm{db: db}
		for b.Loop() {
			n := 0
			if err := f.view(func(r *Reader) error {
				return r.Devices("", func(fleet.Device) bool { n++; return true })
			}); err != nil || n != devices {
				b.Fatal(n, err)
			}
		}
	})

	dir := buildRaftLog(b, 10_000)
	b.Run("raft.db/entries=10000/checked", func(b *testing.B) {
		for b.Loop() {
			files, err := checkRaftDir(dir, false, true, logger)
			if err != nil {
				b.Fatal(err)
			}
			files.logStore.Close()
		}
	})
	b.Run("raft.db/entries=10000/unchecked", func(b *testing.B) {
		for b.Loop() {
			ls, err := openLogStore(filepath.Join(dir, boltLogName), false)
			if err != nil {
				b.Fatal(err)
			}
			ls.Close()
		}
	})
	b.Run("raft.db/entries=10000/migrated-to-log", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			copied := copyDir(b, dir)
			b.StartTimer()
			files, err := checkRaftDir(copied, false, false, logger)
			if err != nil {
				b.Fatal(err)
			}
			files.logStore.Close()
		}
	})
	migrated := copyDir(b, dir)
	files, err := checkRaftDir(migrated, false, false, logger)
	if err != nil {
		b.Fatal(err)
	}
	files.logStore.Close()
	b.Run("log/entries=10000/checked", func(b *testing.B) {
		for b.Loop() {
			files, err := checkRaftDir(migrated, false, false, logger)
			if err != nil {
				b.Fatal(err)
			}
			files.logStore.Close()
		}
	})
	b.Run("log/entries=10000/unchecked", func(b *testing.B) {
		for b.Loop() {
			ls, err := openRaftLog(migrated, false, logger)
			if err != nil {
				b.Fatal(err)
			}
			ls.Close()
		}
	})
}

// buildStateFile writes a state file of n devices, each with a report, as
// the state machine writes them (batches of 256 entries).
func buildStateFile(b *testing.B, n int) string {
	b.Helper()
	path := filepath.Join(b.TempDir(), "state.db")
	f, err := openFSM(path, nil, testLogger(b), func() (string, error) { return "bench", nil })
	if err != nil {
		b.Fatal(err)
	}
	defer f.close()
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	report := json.RawMessage(fmt.Sprintf(`{"schemaVersion":"1.0","modules":{"m":{"status":"running","exitCode":0,"pad":%q}}}`, strings.Repeat("x", 900)))
	index := uint64(0)
	var batch []*raft.Log
	add := func(c Command) {
		data, err := Encode(c)
		if err != nil {
			b.Fatal(err)
		}
		index++
		l := commandLog(data)
		l.Index, l.Term, l.Type = index, 1, raft.LogCommand
		batch = append(batch, &l)
		if len(batch) == maxGroup {
			f.ApplyBatch(batch)
			batch = batch[:0]
		}
	}
	for i := range n {
		add(PutDevice{Time: t0, Device: fleet.Device{ID: fmt.Sprintf("device-%07d", i), Tags: map[string]any{"line": float64(i % 50), "site": "west"}}})
	}
	for i := 0; i < n; i += 500 {
		var reports []Report
		for j := i; j < min(i+500, n); j++ {
			reports = append(reports, Report{DeviceID: fmt.Sprintf("device-%07d", j), Document: report, Time: t0})
		}
		add(PutReports{Reports: reports})
	}
	if len(batch) > 0 {
		f.ApplyBatch(batch)
	}
	if err := f.stoppedErr(); err != nil {
		b.Fatal(err)
	}
	return path
}

// buildRaftLog writes a raft directory whose log holds n command entries
// (device writes of about 300 bytes) after a configuration entry.
func buildRaftLog(b *testing.B, n int) string {
	b.Helper()
	dir := b.TempDir()
	ls, err := raftboltdb.NewBoltStore(filepath.Join(dir, "raft.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer ls.Close()
	conf := raft.Configuration{Servers: []raft.Server{{Suffrage: raft.Voter, ID: "n1", Address: "127.0.0.1:1"}}}
	logs := []*raft.Log{{Index: 1, Term: 1, Type: raft.LogConfiguration, Data: raft.EncodeConfiguration(conf)}}
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for i := 2; i <= n+1; i++ {
		data, err := Encode(PutDevice{Time: t0, Device: fleet.Device{ID: fmt.Sprintf("device-%07d", i), Tags: map[string]any{"line": float64(i % 50), "site": "west", "pad": strings.Repeat("x", 150)}}})
		if err != nil {
			b.Fatal(err)
		}
		l := commandLog(data)
		l.Index, l.Term, l.Type = uint64(i), 1, raft.LogCommand
		logs = append(logs, &l)
		if len(logs) == 256 {
			if err := ls.StoreLogs(logs); err != nil {
				b.Fatal(err)
			}
			logs = logs[:0]
		}
	}
	if err := ls.StoreLogs(logs); err != nil {
		b.Fatal(err)
	}
	if err := ls.SetUint64(keyCurrentTerm, 1); err != nil {
		b.Fatal(err)
	}
	return dir
}
