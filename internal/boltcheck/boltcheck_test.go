package boltcheck

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// TestVerify_KeysOutOfOrder: a bbolt file whose keys no longer ascend (a
// flipped byte in a key) is refused, naming the file and the bucket, for a
// file with a stored free list and for one without (NoFreelistSync, as
// the node's history.db), in a top-level bucket and in a nested one; and
// Verify leaves nothing of bbolt running on the file once it returned.
//
// Before, a file without a free list went through bbolt's check, which
// rebuilt the list on a goroutine that kept reading the file after the
// first problem it reported: Verify closed the file under it, and the
// process died of a fault (node's TestDataDirFaults, under -race); short
// of dying, the goroutine stayed blocked for good at the next problem.
func TestVerify_KeysOutOfOrder(t *testing.T) {
	for _, tc := range []struct {
		name           string
		noFreelistSync bool
		nested         bool
	}{
		{"free list stored", false, false},
		{"free list stored, nested bucket", false, true},
		{"no free list", true, false},
		{"no free list, nested bucket", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "x.db")
			keys := writeKeys(t, path, tc.noFreelistSync, tc.nested)
			if err := Verify(path, nil); err != nil {
				t.Fatalf("the undamaged file: %v", err)
			}
			// Two keys in different pages (a quarter and three quarters
			// in), each made smaller than the key before it: 'k' (0x6b)
			// becomes 'c' (0x63). Only a key in one page will do, not one
			// that also heads a page (and so is in a branch page too).
			raw, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			for _, from := range []int{len(keys) / 4, 3 * len(keys) / 4} {
				i := from
				for i < len(keys) && bytes.Count(raw, keys[i]) != 1 {
					i++
				}
				if i == len(keys) {
					t.Fatalf("no key after %s is in one page only", keys[from])
				}
				raw[bytes.Index(raw, keys[i])] ^= 0x08
			}
			if err := os.WriteFile(path, raw, 0o600); err != nil {
				t.Fatal(err)
			}

			err = Verify(path, nil)
			if stacks := bboltGoroutines(); stacks != "" {
				t.Fatalf("bbolt still runs on the file after Verify returned:\n%s", stacks)
			}
			want := "bucket b"
			if tc.nested {
				want = "bucket b/nested"
			}
			if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), path) {
				t.Fatalf("Verify: %v, want an error wrapping ErrDamaged naming %s", err, path)
			}
			if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "out of order") {
				t.Fatalf("Verify: %v, want it to name %s and keys out of order", err, want)
			}
		})
	}
}

// writeKeys writes enough keys to bucket b (or to b/nested) of a new file
// at path to fill many leaf pages, in one transaction (so that each key
// is in the file once, or twice when it also heads a page), and returns
// them in order.
func writeKeys(t *testing.T, path string, noFreelistSync, nested bool) [][]byte {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{NoFreelistSync: noFreelistSync})
	if err != nil {
		t.Fatal(err)
	}
	var keys [][]byte
	err = db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucket([]byte("b"))
		if err != nil {
			return err
		}
		if nested {
			if err := b.Put([]byte("a-plain-key"), []byte("v")); err != nil {
				return err
			}
			if b, err = b.CreateBucket([]byte("nested")); err != nil {
				return err
			}
		}
		for i := range 2000 {
			k := []byte(fmt.Sprintf("key-%05d", i))
			keys = append(keys, k)
			if err := b.Put(k, bytes.Repeat([]byte{'v'}, 100)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	return keys
}

// bboltGoroutines returns the stacks of the goroutines running bbolt's
// free-list rebuild or check, "" when there are none.
func bboltGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "go.etcd.io/bbolt.(*DB).freepages") || strings.Contains(g, "go.etcd.io/bbolt.(*Tx).check") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}
