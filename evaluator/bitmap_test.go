package evaluator

import (
	"maps"
	"slices"
	"testing"

	"pgregory.net/rapid"
)

// Slots are drawn from a few chunks, densely enough to cross the
// array/bitset boundary in both directions.
func genSlot(t *rapid.T) uint32 {
	chunk := uint32(rapid.IntRange(0, 2).Draw(t, "chunk"))
	return chunk<<chunkBits | uint32(rapid.IntRange(0, 9000).Draw(t, "lo"))
}

func TestBitmap_Property_MatchesMap(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		var b bitmap
		ref := map[uint32]bool{}
		for range rapid.IntRange(1, 30).Draw(t, "steps") {
			switch rapid.IntRange(0, 5).Draw(t, "op") {
			case 4: // single adds and removes, around the small form
				x := genSlot(t) % 64
				if got := b.Add(x); got == ref[x] {
					t.Fatalf("Add(%d) = %v with member %v", x, got, ref[x])
				}
				ref[x] = true
			case 5:
				x := genSlot(t) % 64
				if got := b.Remove(x); got != ref[x] {
					t.Fatalf("Remove(%d) = %v with member %v", x, got, ref[x])
				}
				delete(ref, x)
			case 0, 1: // bulk add, to reach bitset containers
				lo := genSlot(t)
				n := rapid.IntRange(1, 6000).Draw(t, "n")
				for x := lo; x < lo+uint32(n); x++ {
					if got := b.Add(x); got == ref[x] {
						t.Fatalf("Add(%d) = %v with member %v", x, got, ref[x])
					}
					ref[x] = true
				}
			case 2: // bulk remove
				lo := genSlot(t)
				n := rapid.IntRange(1, 6000).Draw(t, "n")
				for x := lo; x < lo+uint32(n); x++ {
					if got := b.Remove(x); got != ref[x] {
						t.Fatalf("Remove(%d) = %v with member %v", x, got, ref[x])
					}
					delete(ref, x)
				}
			case 3:
				x := genSlot(t)
				if b.Contains(x) != ref[x] {
					t.Fatalf("Contains(%d) = %v", x, !ref[x])
				}
			}
			want := slices.Sorted(maps.Keys(ref))
			var got []uint32
			b.Each(func(x uint32) bool { got = append(got, x); return true })
			if !slices.Equal(got, want) || b.Len() != len(want) {
				t.Fatalf("members %d (Len %d), want %d", len(got), b.Len(), len(want))
			}
			if b.conts != nil && b.small != nil || len(b.small) > smallMax || !slices.IsSorted(b.small) {
				t.Fatalf("bad small form: %d members, %d containers", len(b.small), len(b.conts))
			}
			for i, c := range b.conts {
				n := len(c.arr)
				if c.bits != nil {
					n = len(collect(dense(c.bits)))
				}
				if c.n == 0 || int(c.n) != n || i > 0 && c.key <= b.conts[i-1].key {
					t.Fatalf("bad container %d: n=%d, holds %d, key %d", i, c.n, n, c.key)
				}
			}
			// Round trip through dense and the set operations.
			d := newDense(3 << chunkBits)
			d.or(&b)
			if d.count() != len(want) || !slices.Equal(collect(d), want) {
				t.Fatal("dense.or lost members")
			}
			back := d.toBitmap()
			var got2 []uint32
			back.Each(func(x uint32) bool { got2 = append(got2, x); return true })
			if back.Len() != len(want) || !slices.Equal(got2, want) {
				t.Fatal("toBitmap lost members")
			}
			all := newDense(3 << chunkBits)
			for i := range all {
				all[i] = ^uint64(0)
			}
			all.and(&b)
			if !slices.Equal(collect(all), want) {
				t.Fatal("dense.and wrong")
			}
			none := newDense(3 << chunkBits)
			none.or(&b)
			none.andNot(&b)
			if !none.empty() {
				t.Fatal("dense.andNot wrong")
			}
			if c := b.Clone(); c.Len() != b.Len() {
				t.Fatal("Clone wrong")
			}
		}
	})
}

func collect(d dense) []uint32 {
	var out []uint32
	d.each(func(x uint32) { out = append(out, x) })
	return out
}
