package raftstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/hashicorp/raft"

	"appliance/raftstore/raftlog"
)

// Checksums of raft log entries.
//
// raft-boltdb stores each entry as msgpack in a bbolt leaf page, which
// bbolt does not checksum: a flipped byte in a command's payload would be
// applied as a different command. Every command this release proposes
// carries, in raft.Log.Extensions, a format byte (entryChecksumV1) and the
// CRC-32C of Data. Extensions travel with the entry (raft's RPCs, the
// msgpack in raft.db) and reach the state machine, and the Data encoding
// is unchanged, so an earlier release reads these entries as it always
// did (it ignores Extensions).
//
// An entry is checked when a follower stores it (checkedLogStore), before
// raft starts (the whole log, preflight.go) and when it is applied. An
// entry without an extension was written by an earlier release and is
// accepted as raft always accepted it. A mismatch is corruption: the entry
// is never applied (the state machine stops, ErrCorrupt). An extension of a
// format this release does not know is refused the same way: a release
// that changes the format must wait until every voter runs it, as for a new
// command type.

const (
	entryChecksumV1  = 1
	entryChecksumLen = 5
)

var crc32c = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt is wrapped by every error that reports damaged stored state:
// a raft entry or state file that fails its checksum, a file bbolt cannot
// read, files that contradict each other. Such a node must not serve; see
// CorruptError for what the operator is told.
var ErrCorrupt = errors.New("stored state is damaged")

// entryExtension is the Extensions of a command entry carrying data.
func entryExtension(data []byte) []byte {
	ext := make([]byte, entryChecksumLen)
	ext[0] = entryChecksumV1
	binary.BigEndian.PutUint32(ext[1:], crc32.Checksum(data, crc32c))
	return ext
}

// commandLog is the entry raft.ApplyLog takes for an encoded command.
func commandLog(data []byte) raft.Log {
	return raft.Log{Data: data, Extensions: entryExtension(data)}
}

// verifyEntry checks a log entry's checksum. It returns nil for an entry
// with a matching checksum and for one without any (an earlier release's,
// or raft's own entries); otherwise an error wrapping ErrCorrupt.
func verifyEntry(l *raft.Log) error {
	ext := l.Extensions
	if len(ext) == 0 {
		return nil
	}
	if l.Type != raft.LogCommand {
		return fmt.Errorf("raft entry %d: %w: a %s entry carries a command checksum (its type was changed)", l.Index, ErrCorrupt, l.Type)
	}
	if ext[0] != entryChecksumV1 || len(ext) != entryChecksumLen {
		return fmt.Errorf("raft entry %d: %w: its checksum is of an unknown format (%d bytes, format %d)", l.Index, ErrCorrupt, len(ext), ext[0])
	}
	if want, got := binary.BigEndian.Uint32(ext[1:]), crc32.Checksum(l.Data, crc32c); want != got {
		return fmt.Errorf("raft entry %d: %w: its command does not match its checksum (CRC-32C stored %08x, computed %08x)", l.Index, ErrCorrupt, want, got)
	}
	return nil
}

// checkedLogStore verifies every entry before it is stored: a follower
// never keeps an entry that arrived damaged (raft then answers the leader
// with a failure and the entry is sent again). It also verifies every
// entry raft reads back (to send it to a follower, or to apply it): one
// damaged on this node's disk since the checks at open is reported to
// damaged, which stops the state machine, so that a leader whose log went
// bad steps out rather than keep offering followers an entry they refuse.
// The entry itself is still returned: raft panics on a read error while
// applying, and the state machine refuses the entry anyway.
type checkedLogStore struct {
	raft.LogStore
	damaged func(error)
}

func (s checkedLogStore) GetLog(index uint64, l *raft.Log) error {
	if err := s.LogStore.GetLog(index, l); err != nil {
		if !errors.Is(err, raftlog.ErrCorrupt) || s.damaged == nil {
			return err
		}
		// The record failed raftlog's own checksums: stop the state
		// machine, and hand raft (which panics on a read error while
		// applying) an entry that every check refuses.
		s.damaged(err)
		*l = raft.Log{Index: index, Type: raft.LogCommand, Extensions: []byte{0}}
		return nil
	}
	if err := verifyEntry(l); err != nil && s.damaged != nil {
		s.damaged(err)
	}
	return nil
}

// IsMonotonic passes on the log store's answer (raft.MonotonicLogStore):
// raft asks the store it holds, which is this wrapper.
func (s checkedLogStore) IsMonotonic() bool {
	m, ok := s.LogStore.(raft.MonotonicLogStore)
	return ok && m.IsMonotonic()
}

func (s checkedLogStore) StoreLog(l *raft.Log) error { return s.StoreLogs([]*raft.Log{l}) }

func (s checkedLogStore) StoreLogs(logs []*raft.Log) error {
	for _, l := range logs {
		if err := verifyEntry(l); err != nil {
			return fmt.Errorf("refusing to store it: %w", err)
		}
	}
	return s.LogStore.StoreLogs(logs)
}
