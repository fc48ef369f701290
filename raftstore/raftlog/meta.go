package raftlog

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"

	"appliance/internal/fsutil"
)

// The meta file: the stable store's keys (raft's term and vote) and the
// log's first index after raft dropped a prefix that ends inside a
// segment. It is small and rarely written (an election, a vote, a
// compaction), always whole: written to a temporary file, fsynced, renamed
// over the old one, the directory fsynced.
//
//	"raftlog-meta\x00v1\n" (16 bytes), u32 CRC-32C of the JSON, the JSON
const metaMagic = "raftlog-meta\x00v1\n"

type meta struct {
	// First: entries below it are not in the log (0: none dropped).
	First uint64 `json:"first_index,omitempty"`
	// Stable holds the stable store's keys.
	Stable map[string][]byte `json:"stable,omitempty"`
}

func readMeta(path string) (meta, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return meta{}, nil
	}
	if err != nil {
		return meta{}, fmt.Errorf("read %s: %w", path, err)
	}
	if len(b) < len(metaMagic)+4 || string(b[:len(metaMagic)]) != metaMagic {
		return meta{}, fmt.Errorf("%s: %w: it does not start with the meta file's header", path, ErrCorrupt)
	}
	body := b[len(metaMagic)+4:]
	if want, got := binary.LittleEndian.Uint32(b[len(metaMagic):]), crc32.Checksum(body, castagnoli); want != got {
		return meta{}, fmt.Errorf("%s: %w: it fails its checksum (stored %08x, computed %08x)", path, ErrCorrupt, want, got)
	}
	var m meta
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return meta{}, fmt.Errorf("%s: %w: it does not parse: %v", path, ErrCorrupt, err)
	}
	return m, nil
}

func writeMeta(path string, m meta) error {
	body, err := json.Marshal(m)
	if err != nil {
		return err
	}
	b := make([]byte, 0, len(metaMagic)+4+len(body))
	b = append(b, metaMagic...)
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(body, castagnoli))
	b = append(b, body...)
	if err := fsutil.WriteFileAtomic(path, b, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
