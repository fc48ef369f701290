// Package boltchecktest finds where a value lives in a bbolt file, for
// tests that damage files byte by byte.
package boltchecktest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// LiveOffset returns the file offset of pattern inside the one page of the
// bbolt file at path that the database uses (bbolt writes pages anew on
// every change, so stale copies of a value linger in freed pages). The
// test fails if no live page, or more than one, holds it.
func LiveOffset(t testing.TB, path string, pattern []byte) int64 {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, PreLoadFreelist: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pageSize := db.Info().PageSize
	found := int64(-1)
	err = db.View(func(tx *bolt.Tx) error {
		for id := 2; ; id++ {
			info, err := tx.Page(id)
			if err != nil {
				return err
			}
			if info == nil {
				return nil // past the high water mark
			}
			if info.Type != "leaf" && info.Type != "branch" {
				continue
			}
			start := id * pageSize
			end := min(start+(info.OverflowCount+1)*pageSize, len(raw))
			if i := bytes.Index(raw[start:end], pattern); i >= 0 {
				if found >= 0 {
					t.Fatalf("%q is in two live pages of %s", pattern, path)
				}
				found = int64(start + i)
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if found < 0 {
		t.Fatalf("%q is in no live page of %s", pattern, path)
	}
	return found
}

// Flip changes the byte at off in the file at path (xor mask, never 0).
func Flip(t testing.TB, path string, off int64, mask byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := []byte{0}
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= mask
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// Spot is a place in a bbolt file worth damaging, and what lives there.
type Spot struct {
	Off  int64
	What string
}

// Spots lists places in the bbolt file at path that hold each kind of
// thing bbolt keeps: fields of both meta pages (magic, root, free list,
// high water mark, txid, checksum), the free list page, and in up to
// maxPages live branch and leaf pages their header, an element's header,
// a key and a value.
func Spots(t testing.TB, path string, maxPages int) []Spot {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, PreLoadFreelist: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ps := db.Info().PageSize
	var spots []Spot
	for i, base := range []int{0, ps} {
		m := base + 16 // after the page header
		for _, f := range []struct {
			off  int
			what string
		}{{0, "magic"}, {16, "root bucket page"}, {32, "free list page id"}, {40, "high water mark"}, {48, "txid"}, {56, "checksum"}} {
			spots = append(spots, Spot{int64(m + f.off), fmt.Sprintf("meta page %d: %s", i, f.what)})
		}
	}
	le := binary.LittleEndian
	pages := 0
	err = db.View(func(tx *bolt.Tx) error {
		for id := 2; ; id++ {
			info, err := tx.Page(id)
			if err != nil {
				return err
			}
			if info == nil {
				return nil
			}
			base := id * ps
			switch info.Type {
			case "freelist":
				spots = append(spots, Spot{int64(base + 8), fmt.Sprintf("free list page %d: flags", id)},
					Spot{int64(base + 10), fmt.Sprintf("free list page %d: count", id)})
				if info.Count > 0 {
					spots = append(spots, Spot{int64(base + 16), fmt.Sprintf("free list page %d: first free page id", id)})
				}
			case "branch":
				if pages >= maxPages {
					continue
				}
				pages++
				spots = append(spots, Spot{int64(base + 8), fmt.Sprintf("branch page %d: flags", id)},
					Spot{int64(base + 16 + 8), fmt.Sprintf("branch page %d: first child's page id", id)})
			case "leaf":
				if pages >= maxPages || info.Count == 0 {
					continue
				}
				pages++
				spots = append(spots, Spot{int64(base + 8), fmt.Sprintf("leaf page %d: flags", id)},
					Spot{int64(base + 10), fmt.Sprintf("leaf page %d: element count", id)})
				elem := base + 16 + 16*(info.Count/2) // the middle element's header
				pos, ksize, vsize := int(le.Uint32(raw[elem+4:])), int(le.Uint32(raw[elem+8:])), int(le.Uint32(raw[elem+12:]))
				spots = append(spots, Spot{int64(elem + 4), fmt.Sprintf("leaf page %d: an element's position", id)},
					Spot{int64(elem + 12), fmt.Sprintf("leaf page %d: an element's value size", id)})
				if k := elem + pos; ksize > 0 && k+ksize <= len(raw) {
					spots = append(spots, Spot{int64(k + ksize - 1), fmt.Sprintf("leaf page %d: key %q", id, raw[k:k+ksize])})
					if vsize > 0 && k+ksize+vsize <= len(raw) {
						spots = append(spots, Spot{int64(k + ksize + vsize/2), fmt.Sprintf("leaf page %d: value of %q", id, raw[k:k+ksize])})
					}
				}
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return spots
}
