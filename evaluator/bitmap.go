package evaluator

import (
	"math/bits"
	"slices"
)

// Sets of device slots come in two forms:
//
//   - bitmap, a small Roaring-style compressed set: up to smallMax members
//     are a sorted []uint32; beyond, slots are split into chunks of 65,536
//     by their high 16 bits, and a chunk is a sorted []uint16 while it holds
//     at most arrMax slots and a 1,024-word bitset above that. It is what
//     the engine stores (postings, target sets): a few bytes for a term
//     only one device holds (a serial number), about 2 bytes a member when
//     sparse, 1 bit a slot when dense, and an add or remove touches one
//     chunk.
//   - dense, a plain bitset over every slot, used for the set algebra of one
//     evaluation: AND, OR and NOT are word loops, so a condition over a
//     million devices costs tens of microseconds per operator.

const (
	chunkBits  = 16
	chunkWords = 1 << chunkBits / 64 // 1,024
	// arrMax is where a chunk turns into a bitset. Roaring uses 4,096 (where
	// the bitset becomes smaller); 1,024 makes a device change, which adds
	// and removes single members of cache-cold sets, a third faster, for at
	// most 8 KiB per chunk.
	arrMax   = 1024
	smallMax = 16 // beyond this chunks are smaller
)

type container struct {
	key  uint16 // the high half of its members
	n    int32
	arr  []uint16 // sorted, when bits == nil
	bits []uint64 // chunkWords words, when dense
}

type bitmap struct {
	small []uint32    // the members while conts == nil
	conts []container // sorted by key
}

// find returns the index of the container for hi, or where it would go.
func (b *bitmap) find(hi uint16) (int, bool) {
	lo, up := 0, len(b.conts)
	for lo < up {
		m := int(uint(lo+up) >> 1)
		if b.conts[m].key < hi {
			lo = m + 1
		} else {
			up = m
		}
	}
	return lo, lo < len(b.conts) && b.conts[lo].key == hi
}

// Len returns the number of members.
func (b *bitmap) Len() int {
	if b.conts == nil {
		return len(b.small)
	}
	n := 0
	for i := range b.conts {
		n += int(b.conts[i].n)
	}
	return n
}

func (b *bitmap) Contains(x uint32) bool {
	if b.conts == nil {
		_, found := slices.BinarySearch(b.small, x)
		return found
	}
	i, ok := b.find(uint16(x >> chunkBits))
	if !ok {
		return false
	}
	c := &b.conts[i]
	lo := uint16(x)
	if c.bits != nil {
		return c.bits[lo>>6]&(1<<(lo&63)) != 0
	}
	_, found := slices.BinarySearch(c.arr, lo)
	return found
}

// Add adds x and reports whether it was absent.
func (b *bitmap) Add(x uint32) bool {
	if b.conts == nil {
		j, found := slices.BinarySearch(b.small, x)
		if found {
			return false
		}
		if len(b.small) < smallMax {
			b.small = slices.Insert(b.small, j, x)
			return true
		}
		small := b.small
		b.small = nil
		for _, y := range small {
			b.addChunked(y)
		}
	}
	return b.addChunked(x)
}

func (b *bitmap) addChunked(x uint32) bool {
	hi, lo := uint16(x>>chunkBits), uint16(x)
	i, ok := b.find(hi)
	if !ok {
		b.conts = slices.Insert(b.conts, i, container{key: hi, n: 1, arr: []uint16{lo}})
		return true
	}
	c := &b.conts[i]
	if c.bits != nil {
		w, m := lo>>6, uint64(1)<<(lo&63)
		if c.bits[w]&m != 0 {
			return false
		}
		c.bits[w] |= m
		c.n++
		return true
	}
	j, found := slices.BinarySearch(c.arr, lo)
	if found {
		return false
	}
	c.arr = slices.Insert(c.arr, j, lo)
	c.n++
	if c.n > arrMax {
		words := make([]uint64, chunkWords)
		for _, v := range c.arr {
			words[v>>6] |= 1 << (v & 63)
		}
		c.arr, c.bits = nil, words
	}
	return true
}

// Remove removes x and reports whether it was present.
func (b *bitmap) Remove(x uint32) bool {
	if b.conts == nil {
		j, found := slices.BinarySearch(b.small, x)
		if found {
			b.small = slices.Delete(b.small, j, j+1)
			if len(b.small) == 0 {
				b.small = nil
			}
		}
		return found
	}
	hi, lo := uint16(x>>chunkBits), uint16(x)
	i, ok := b.find(hi)
	if !ok {
		return false
	}
	c := &b.conts[i]
	if c.bits != nil {
		w, m := lo>>6, uint64(1)<<(lo&63)
		if c.bits[w]&m == 0 {
			return false
		}
		c.bits[w] &^= m
		c.n--
		if c.n <= arrMax/2 { // hysteresis: no flapping at the boundary
			c.arr, c.bits = wordsToArray(c.bits, int(c.n)), nil
		}
	} else {
		j, found := slices.BinarySearch(c.arr, lo)
		if !found {
			return false
		}
		c.arr = slices.Delete(c.arr, j, j+1)
		c.n--
		if cap(c.arr) > 32 && len(c.arr) < cap(c.arr)/4 {
			c.arr = slices.Clip(slices.Clone(c.arr))
		}
	}
	if c.n == 0 {
		b.conts = slices.Delete(b.conts, i, i+1)
		if len(b.conts) == 0 {
			b.conts = nil // back to the small form
		}
	}
	return true
}

func wordsToArray(words []uint64, n int) []uint16 {
	arr := make([]uint16, 0, n)
	for w, word := range words {
		for word != 0 {
			t := bits.TrailingZeros64(word)
			arr = append(arr, uint16(w*64+t))
			word &= word - 1
		}
	}
	return arr
}

// Each calls fn for every member in ascending order until fn returns false.
func (b *bitmap) Each(fn func(uint32) bool) {
	for _, x := range b.small {
		if !fn(x) {
			return
		}
	}
	for i := range b.conts {
		c := &b.conts[i]
		base := uint32(c.key) << chunkBits
		if c.bits == nil {
			for _, lo := range c.arr {
				if !fn(base | uint32(lo)) {
					return
				}
			}
			continue
		}
		for w, word := range c.bits {
			for word != 0 {
				t := bits.TrailingZeros64(word)
				if !fn(base | uint32(w*64+t)) {
					return
				}
				word &= word - 1
			}
		}
	}
}

// Clone returns an independent copy.
func (b *bitmap) Clone() *bitmap {
	out := &bitmap{small: slices.Clone(b.small)}
	if b.conts != nil {
		out.conts = make([]container, len(b.conts))
		for i, c := range b.conts {
			out.conts[i] = container{key: c.key, n: c.n, arr: slices.Clone(c.arr), bits: slices.Clone(c.bits)}
		}
	}
	return out
}

// dense is a bitset over slots [0, 64*len).
type dense []uint64

func newDense(slots int) dense { return make(dense, (slots+63)/64) }

func (d dense) has(x uint32) bool {
	w := int(x >> 6)
	return w < len(d) && d[w]&(1<<(x&63)) != 0
}

func (d dense) set(x uint32) { d[x>>6] |= 1 << (x & 63) }

func (d dense) clear(x uint32) { d[x>>6] &^= 1 << (x & 63) }

// chunk returns the words of d that chunk hi covers (possibly fewer than
// chunkWords at the end, or none).
func (d dense) chunk(hi uint16) []uint64 {
	lo := int(hi) * chunkWords
	if lo >= len(d) {
		return nil
	}
	return d[lo:min(lo+chunkWords, len(d))]
}

// or sets every member of b in d. d must cover b.
func (d dense) or(b *bitmap) {
	for _, x := range b.small {
		d.set(x)
	}
	for i := range b.conts {
		c := &b.conts[i]
		words := d.chunk(c.key)
		if c.bits != nil {
			for w := range words {
				words[w] |= c.bits[w]
			}
			continue
		}
		for _, lo := range c.arr {
			if int(lo>>6) < len(words) {
				words[lo>>6] |= 1 << (lo & 63)
			}
		}
	}
}

// and keeps in d only the members of b.
func (d dense) and(b *bitmap) {
	if b.conts == nil {
		var keep []uint32
		for _, x := range b.small {
			if d.has(x) {
				keep = append(keep, x)
			}
		}
		clear(d)
		for _, x := range keep {
			d.set(x)
		}
		return
	}
	ki := 0
	for base := 0; base < len(d); base += chunkWords {
		hi := uint16(base / chunkWords)
		words := d[base:min(base+chunkWords, len(d))]
		for ki < len(b.conts) && b.conts[ki].key < hi {
			ki++
		}
		if ki == len(b.conts) || b.conts[ki].key != hi {
			clear(words)
			continue
		}
		c := &b.conts[ki]
		if c.bits != nil {
			for w := range words {
				words[w] &= c.bits[w]
			}
			continue
		}
		var keep [chunkWords]uint64
		for _, lo := range c.arr {
			keep[lo>>6] |= 1 << (lo & 63)
		}
		for w := range words {
			words[w] &= keep[w]
		}
	}
}

// andNot removes from d every member of b.
func (d dense) andNot(b *bitmap) {
	for _, x := range b.small {
		d.clear(x)
	}
	for i := range b.conts {
		c := &b.conts[i]
		words := d.chunk(c.key)
		if c.bits != nil {
			for w := range words {
				words[w] &^= c.bits[w]
			}
			continue
		}
		for _, lo := range c.arr {
			if int(lo>>6) < len(words) {
				words[lo>>6] &^= 1 << (lo & 63)
			}
		}
	}
}

func (d dense) andD(o dense) {
	for i := range d {
		d[i] &= o[i]
	}
}

func (d dense) orD(o dense) {
	for i := range d {
		d[i] |= o[i]
	}
}

func (d dense) andNotD(o dense) {
	for i := range d {
		d[i] &^= o[i]
	}
}

func (d dense) count() int {
	n := 0
	for _, w := range d {
		n += bits.OnesCount64(w)
	}
	return n
}

func (d dense) empty() bool {
	for _, w := range d {
		if w != 0 {
			return false
		}
	}
	return true
}

// each calls fn for every member in ascending order.
func (d dense) each(fn func(uint32)) {
	for i, w := range d {
		for w != 0 {
			t := bits.TrailingZeros64(w)
			fn(uint32(i*64 + t))
			w &= w - 1
		}
	}
}

// toBitmap compresses d.
func (d dense) toBitmap() *bitmap {
	b := &bitmap{}
	if n := d.count(); n <= smallMax {
		d.each(func(x uint32) { b.small = append(b.small, x) })
		return b
	}
	for base := 0; base < len(d); base += chunkWords {
		words := d[base:min(base+chunkWords, len(d))]
		n := 0
		for _, w := range words {
			n += bits.OnesCount64(w)
		}
		if n == 0 {
			continue
		}
		c := container{key: uint16(base / chunkWords), n: int32(n)}
		if n > arrMax {
			c.bits = make([]uint64, chunkWords)
			copy(c.bits, words)
		} else {
			c.arr = wordsToArray(words, n)
		}
		b.conts = append(b.conts, c)
	}
	return b
}
