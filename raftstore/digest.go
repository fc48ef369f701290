package raftstore

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cespare/xxhash/v2"
	bolt "go.etcd.io/bbolt"

	"appliance/internal/boltcheck"
)

// The content digest of the state file.
//
// bbolt checksums its two meta pages and nothing else: a flipped byte in a
// leaf page changes a device's tags or a deployment's condition, and bbolt
// reads it back without a word (a corrupt state.db once made a `*`
// deployment target 87 of 1,788 devices). So the state machine keeps a
// digest of its whole content: the sum, modulo 2^64, of xxhash64 over every
// (bucket, key, value) entry of every bucket but the digest itself. A sum
// does not depend on order, so each write updates it in the same
// transaction (subtract the old entry's hash, add the new one's) for the
// cost of two hashes, and an open recomputes it in one pass and compares.
// The stored digest holds the applied index it belongs to, so a damaged
// appliedIndex is caught as well.
//
// The meta bucket's sequence number says the file keeps a digest (format
// 1). A state file of an earlier release has neither: the digest is
// computed and stored once (a migration), never held against it. A file
// whose sequence says it has a digest but whose digest key is gone (a
// flipped byte in the key) is damaged, not old.

// keyContentDigest holds the digest: the applied index, then the sum, 8
// bytes each, big-endian.
var keyContentDigest = []byte("contentDigest")

// digestFormat is the meta bucket's sequence number in a state file that
// keeps a content digest.
const digestFormat = 1

// entryHash is one entry's share of the digest. Lengths are hashed with
// the bytes so that moving a byte between bucket, key and value changes it.
func entryHash(bucket, key, value []byte) uint64 {
	var d xxhash.Digest
	d.Reset()
	var n [4]byte
	for _, part := range [][]byte{bucket, key, value} {
		binary.BigEndian.PutUint32(n[:], uint32(len(part)))
		d.Write(n[:])
		d.Write(part)
	}
	return d.Sum64()
}

// isDigestKey tells the one entry the digest does not cover: itself.
func isDigestKey(bucket, key []byte) bool {
	return string(bucket) == string(bucketMeta) && string(key) == string(keyContentDigest)
}

func encodeDigest(index, sum uint64) []byte {
	b := make([]byte, 16)
	binary.BigEndian.PutUint64(b, index)
	binary.BigEndian.PutUint64(b[8:], sum)
	return b
}

// stateInfo is what checking a state file found.
type stateInfo struct {
	applied uint64
	sum     uint64 // the digest recomputed from the content
	// migrate: the file has no digest yet (an earlier release, or new).
	migrate bool
}

// checkStateFile reads every page of the open state file (under
// boltcheck's guard, so damage is an error and never a panic), recomputes
// the content digest and compares it with the stored one. Every error
// wraps boltcheck.ErrDamaged and names the file.
func checkStateFile(db *bolt.DB) (stateInfo, error) {
	path := db.Path()
	var sum uint64
	err := boltcheck.Walk(db, func(bucket, key, value []byte) error {
		if !isDigestKey(bucket, key) {
			sum += entryHash(bucket, key, value)
		}
		return nil
	})
	if err != nil {
		return stateInfo{}, err
	}
	info := stateInfo{sum: sum}
	damaged := func(format string, args ...any) (stateInfo, error) {
		return stateInfo{}, fmt.Errorf("%s: %w: %s", path, boltcheck.ErrDamaged, fmt.Sprintf(format, args...))
	}
	err = db.View(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if meta == nil {
			if hasBuckets(tx) {
				return fmt.Errorf("it has no %q bucket", bucketMeta)
			}
			info.migrate = true // a new, empty file
			return nil
		}
		if v := meta.Get(keyAppliedIndex); v != nil {
			if len(v) != 8 {
				return fmt.Errorf("%s is %d bytes, not 8", keyAppliedIndex, len(v))
			}
			info.applied = binary.BigEndian.Uint64(v)
		}
		stored := meta.Get(keyContentDigest)
		switch seq := meta.Sequence(); {
		case seq == 0 && stored == nil:
			info.migrate = true
			return nil
		case seq > digestFormat:
			return fmt.Errorf("its content digest is of format %d, which this release does not know (written by a newer release?)", seq)
		case seq == 0 || stored == nil:
			return errors.New("its content digest is missing or unmarked")
		case len(stored) != 16:
			return fmt.Errorf("its content digest is %d bytes, not 16", len(stored))
		}
		index, want := binary.BigEndian.Uint64(stored), binary.BigEndian.Uint64(stored[8:])
		if index != info.applied {
			return fmt.Errorf("its content digest belongs to index %d but %s is %d", index, keyAppliedIndex, info.applied)
		}
		if want != sum {
			return fmt.Errorf("its content does not match its digest (stored %016x, computed %016x at index %d): some entry changed on disk", want, sum, index)
		}
		return nil
	})
	if err != nil {
		return damaged("%v", err)
	}
	return info, nil
}

func hasBuckets(tx *bolt.Tx) bool {
	found := false
	_ = tx.ForEach(func([]byte, *bolt.Bucket) error { found = true; return errors.New("stop") })
	return found
}

// storeDigest writes the digest of a file that had none (checkStateFile
// said migrate), in a write transaction of its own.
func storeDigest(db *bolt.DB, info stateInfo) error {
	err := db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		if err := meta.SetSequence(digestFormat); err != nil {
			return err
		}
		return meta.Put(keyContentDigest, encodeDigest(info.applied, info.sum))
	})
	if err != nil {
		return fmt.Errorf("store the content digest of %s: %w", db.Path(), err)
	}
	return nil
}

// storedSum reads the digest's sum inside a write transaction (the start
// of a batch).
func storedSum(tx *bolt.Tx) uint64 {
	if v := tx.Bucket(bucketMeta).Get(keyContentDigest); len(v) == 16 {
		return binary.BigEndian.Uint64(v[8:])
	}
	return 0
}
