package spread_test

import (
	"fmt"
	"math"
	"slices"
	"testing"
	"time"

	"appliance/internal/spread"
)

var threeNodes = []string{"10.0.0.1:8883", "10.0.0.2:8883", "10.0.0.3:8883"}

// ids are device ids as fleets name them: a prefix and a counter.
func ids(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%05d", prefix, i+1)
	}
	return out
}

// TestOrder_Even: over 10,000 devices, each server is preferred by about
// its share, each server's devices fall over evenly to the others, and
// every device's order is a permutation of the list.
func TestOrder_Even(t *testing.T) {
	for _, tc := range []struct {
		name    string
		servers []string
		ids     []string
	}{
		{"three nodes, sequential ids", threeNodes, ids("press", 10000)},
		{"three nodes, sim ids", []string{"127.0.0.1:41883", "127.0.0.1:41884", "127.0.0.1:41885"}, ids("sim-k3x9q2", 10000)},
		{"five nodes", []string{"a:8883", "b:8883", "c:8883", "d:8883", "e:8883"}, ids("line-7", 10000)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := len(tc.servers)
			first := make([]int, n)
			second := make([][]int, n) // second[first][second]
			for i := range second {
				second[i] = make([]int, n)
			}
			for _, id := range tc.ids {
				o := spread.Order(id, tc.servers)
				if got := slices.Sorted(slices.Values(o)); !slices.Equal(got, seq(n)) {
					t.Fatalf("Order(%s) = %v: not a permutation of %d servers", id, o, n)
				}
				if p := spread.Preferred(id, tc.servers); p != o[0] {
					t.Fatalf("Preferred(%s) = %d, Order's first %d", id, p, o[0])
				}
				first[o[0]]++
				second[o[0]][o[1]]++
			}
			// A binomial count's standard deviation is sqrt(N·p·(1-p)):
			// 47 for 10,000 devices over 3 servers. Allow 5 of them.
			checkEven(t, "preferred", first, len(tc.ids))
			for s := range n {
				others := slices.Clone(second[s])
				others = slices.Delete(others, s, s+1)
				if second[s][s] != 0 {
					t.Fatalf("devices preferring %s fall over to it again", tc.servers[s])
				}
				checkEven(t, "falling over from "+tc.servers[s], others, first[s])
			}
		})
	}
}

func checkEven(t *testing.T, what string, counts []int, total int) {
	t.Helper()
	p := 1 / float64(len(counts))
	sd := math.Sqrt(float64(total) * p * (1 - p))
	for i, c := range counts {
		if math.Abs(float64(c)-float64(total)*p) > 5*sd {
			t.Errorf("%s: server %d has %d of %d devices, want %.0f ± %.0f (counts %v)", what, i, c, total, float64(total)*p, 5*sd, counts)
		}
	}
}

func seq(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// TestOrder_Stable: a device's order is the same in every process and
// whatever the order of the list; the scores are those the package
// documents (SHA-256 of "server\ndevice id"), so another implementation
// can compute them.
func TestOrder_Stable(t *testing.T) {
	want := spread.Order("press-17", threeNodes)
	reversed := slices.Clone(threeNodes)
	slices.Reverse(reversed)
	got := spread.Order("press-17", reversed)
	for i := range want {
		if threeNodes[want[i]] != reversed[got[i]] {
			t.Fatalf("order over %v is %v, over the reversed list %v: the servers differ at %d", threeNodes, want, got, i)
		}
	}
	// Golden values: changing the rule would move every device of every
	// fleet on upgrade, so it is pinned here.
	for _, tc := range []struct {
		id, server string
		score      uint64
	}{
		{"press-17", "10.0.0.1:8883", 0xade9cd6a85a35575},
		{"press-17", "10.0.0.2:8883", 0x3e1762602295c38a},
		{"sim-0001", "127.0.0.1:1883", 0x5613047c1b209028},
	} {
		if got := spread.Score(tc.id, tc.server); got != tc.score {
			t.Errorf("Score(%q, %q) = %#x, want %#x", tc.id, tc.server, got, tc.score)
		}
	}
}

// TestOrder_AddingAServerMovesOnlyItsDevices: a fourth server becomes the
// preferred one of about a quarter of the devices; no other device changes
// its preferred server.
func TestOrder_AddingAServerMovesOnlyItsDevices(t *testing.T) {
	four := append(slices.Clone(threeNodes), "10.0.0.4:8883")
	moved, toNew := 0, 0
	devices := ids("cell", 10000)
	for _, id := range devices {
		before, after := spread.Preferred(id, threeNodes), spread.Preferred(id, four)
		if before != after {
			moved++
			if after == 3 {
				toNew++
			}
		}
	}
	if moved != toNew {
		t.Fatalf("%d devices changed their preferred server, only %d of them to the new one", moved, toNew)
	}
	// About a quarter, the new server's share (binomial: ±43 is one
	// standard deviation at 10,000 devices).
	if want, sd := float64(len(devices))/4, math.Sqrt(float64(len(devices))*0.25*0.75); math.Abs(float64(moved)-want) > 5*sd {
		t.Fatalf("%d of %d devices moved to the new server, want %.0f ± %.0f", moved, len(devices), want, 5*sd)
	}
}

// TestBackoff: attempt 0 waits nothing; attempt n waits between half and
// all of lo·2^(n-1), never more than hi.
func TestBackoff(t *testing.T) {
	lo, hi := time.Second, 10*time.Second
	for _, tc := range []struct {
		attempt  int
		min, max time.Duration
	}{
		{0, 0, 0}, {1, 500 * time.Millisecond, time.Second}, {2, time.Second, 2 * time.Second},
		{4, 4 * time.Second, 8 * time.Second}, {5, 5 * time.Second, 10 * time.Second}, {60, 5 * time.Second, 10 * time.Second},
	} {
		for range 200 {
			if d := spread.Backoff(lo, hi, tc.attempt); d < tc.min || d > tc.max {
				t.Fatalf("Backoff(%v, %v, %d) = %v, want %v..%v", lo, hi, tc.attempt, d, tc.min, tc.max)
			}
		}
	}
	if d := spread.Backoff(0, 0, 3); d != 0 {
		t.Fatalf("Backoff(0, 0, 3) = %v", d)
	}
}
