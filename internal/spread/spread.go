// Package spread decides which controller node a device talks to, so that
// the devices of a fleet given the same list of nodes spread evenly over
// them, and come back to an even spread after a node returns. The agent
// and the simulator both follow it; it imports nothing of ours.
//
// The rule (rendezvous, or highest-random-weight, hashing):
//   - every server of the list gets a score for the device: the first 8
//     bytes, big-endian, of SHA-256(server "\n" device id), where server is
//     its host:port (the default port filled in, the scheme left out);
//   - the device tries the servers from the highest score down (Order):
//     the first is its preferred server, the others are where it falls
//     over, in that order;
//   - once connected elsewhere, it checks now and then whether its
//     preferred server answers again, waiting Backoff(min, max, n) before
//     the n-th check of a run that finds it still away, and moves back
//     when it does.
//
// What follows from it: each server is preferred by a third of the devices
// of a three-node list (up to chance: ±1 % over 57,000 devices); a device's
// order does not depend on the order of the list, so devices configured
// with the nodes listed differently still agree; the devices of a server
// that fails fall over evenly to the others (each device's second choice
// is any of the remaining servers with equal chance), not all onto the
// next one; and adding or removing a server moves only the devices that
// prefer it. Devices that name one node differently (an IP address here, a
// host name there) score it differently: give every device the same names.
package spread

import (
	"crypto/sha256"
	"encoding/binary"
	"math/rand/v2"
	"slices"
	"time"
)

// Score is server's weight for the device: the highest-scoring server of
// a list is the device's preferred one.
func Score(deviceID, server string) uint64 {
	h := sha256.New()
	h.Write([]byte(server))
	h.Write([]byte{'\n'})
	h.Write([]byte(deviceID))
	var sum [sha256.Size]byte
	return binary.BigEndian.Uint64(h.Sum(sum[:0]))
}

// Order returns the indexes of servers (host:port each) in the order the
// device tries them: its preferred server first. Equal scores, which need
// a SHA-256 prefix collision, go by list order.
func Order(deviceID string, servers []string) []int {
	scores := make([]uint64, len(servers))
	order := make([]int, len(servers))
	for i, s := range servers {
		scores[i], order[i] = Score(deviceID, s), i
	}
	slices.SortStableFunc(order, func(a, b int) int {
		switch {
		case scores[a] > scores[b]:
			return -1
		case scores[a] < scores[b]:
			return 1
		}
		return 0
	})
	return order
}

// Preferred is the index of the device's preferred server: Order's first.
func Preferred(deviceID string, servers []string) int {
	best, bestScore := -1, uint64(0)
	for i, s := range servers {
		if sc := Score(deviceID, s); best < 0 || sc > bestScore {
			best, bestScore = i, sc
		}
	}
	return best
}

// Backoff is a random time between half and all of lo·2^(attempt-1),
// capped at hi; zero for attempt 0 or less. The randomness spreads a fleet
// that lost its server at one moment over the whole interval, so that the
// server it comes back to is not met by every device at once.
func Backoff(lo, hi time.Duration, attempt int) time.Duration {
	if attempt <= 0 {
		return 0
	}
	d := lo
	for i := 1; i < attempt && d < hi; i++ {
		d *= 2
	}
	d = min(d, hi)
	if d <= 0 {
		return 0
	}
	return d/2 + rand.N(d/2+1)
}
