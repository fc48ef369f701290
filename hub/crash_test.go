package hub

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"appliance/fleet"
)

// crashChildEnv makes TestHub_KilledKeepsAcknowledged the hub process
// that is killed: it serves the directory named by it.
const crashChildEnv = "APPLIANCE_HUB_CRASH_CHILD"

var crashRoutes = map[string]string{
	"toB": `FROM /messages/modules/a/* INTO BrokeredEndpoint("/modules/b/inputs/in1")`,
	"toC": `FROM /messages/modules/a/* INTO BrokeredEndpoint("/modules/c/inputs/in1")`,
	"up":  `FROM /messages/modules/a/* INTO $upstream`,
}

// Every message acknowledged to its sender is delivered after the hub's
// process is SIGKILLed while module A sends as fast as it can: module C's
// input gets it (C's queue took each message before it was in the
// write-ahead log, as a connected module's does; the sender's PUBACK
// waited for the log), and so does $upstream (the controller is away).
// Module B, connected and acknowledging while A sends, has its messages
// taken off the store before they reach hub.db. Messages not acknowledged
// may arrive too (QoS 1: the sender would send them again).
func TestHub_KilledKeepsAcknowledged(t *testing.T) {
	if dir := os.Getenv(crashChildEnv); dir != "" {
		crashChild(t, dir)
		return
	}
	dir := t.TempDir()
	acked := map[int]bool{}
	// Each round a child hub on the same directory (which first applies
	// what the last one left in its log) is killed at a moment of its own.
	for round := range 3 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHub_KilledKeepsAcknowledged$")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+dir, fmt.Sprintf("%s_FROM=%d", crashChildEnv, round*1_000_000))
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		n := 0
		readDone := make(chan struct{})
		go func() {
			defer close(readDone)
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				if s, ok := strings.CutPrefix(sc.Text(), "acked "); ok {
					i, _ := strconv.Atoi(s)
					mu.Lock()
					acked[i] = true
					n++
					mu.Unlock()
				}
			}
		}()
		waitFor(t, 30*time.Second, "the child hub to acknowledge 2,000 messages", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return n >= 2000+round*500
		})
		cmd.Process.Kill()
		cmd.Wait()
		<-readDone
	}
	t.Logf("killed 3 times; %d acknowledged messages", len(acked))

	th := startHub(t, dir)
	th.configure(crashRoutes, "a", "b", "c")
	c := th.connect("c")
	received := make(chan int, 1<<20)
	go func() { // read while subscribing: what C has queued comes at once
		for msg := range c.Messages() {
			if in, ok := c.ParseInput(msg); ok {
				received <- int(binary.BigEndian.Uint64(in.Body))
			}
		}
	}()
	if err := c.SubscribeInputs(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	got := map[int]bool{}
	deadline := time.After(30 * time.Second)
	for missing := len(acked); missing > 0; {
		select {
		case n := <-received:
			if acked[n] && !got[n] {
				missing--
			}
			got[n] = true
		case <-deadline:
			t.Fatalf("module c got %d of the %d acknowledged messages after the restart", len(acked)-missing, len(acked))
		}
	}
	var missing []int
	deadline = time.After(30 * time.Second)
	for {
		up := map[int]bool{}
		for _, m := range th.up.messages() {
			up[int(binary.BigEndian.Uint64(m.Body))] = true
		}
		missing = missing[:0]
		for n := range acked {
			if !up[n] {
				missing = append(missing, n)
			}
		}
		if len(missing) == 0 {
			break
		}
		select {
		case <-deadline:
			slices.Sort(missing)
			t.Fatalf("%d of the %d acknowledged messages did not reach $upstream after the restart, among them %v", len(missing), len(acked), missing[:min(len(missing), 10)])
		case <-time.After(50 * time.Millisecond):
		}
	}
	// Segments wholly applied to hub.db are deleted: the current one and
	// the one made ready ahead remain.
	waitFor(t, 10*time.Second, "the applied segments of the log to be deleted", func() bool {
		segs, _ := listWAL(filepath.Join(dir, walDirName))
		return len(segs) <= 2
	})
}

// crashChild runs a hub on dir with module B connected, C not, and the
// controller away, and module A sending without pause; each message's
// number is printed once its PUBACK arrived. It runs until it is killed.
func crashChild(t *testing.T, dir string) {
	// The controller is away from the start: what the last round queued
	// for $upstream stays queued.
	th := startHub(t, dir, func(c *Config) { c.Upstream = &recordingUpstream{offline: true} })
	th.configure(crashRoutes, "a", "b", "c")
	b := th.connect("b")
	if err := b.SubscribeInputs(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	go func() { // B reads and acknowledges what it gets
		for range b.Messages() {
		}
	}()
	a := th.connect("a")
	topic := a.EventsTopic("out1", nil)
	w := bufio.NewWriter(os.Stdout)
	var mu sync.Mutex
	from, _ := strconv.Atoi(os.Getenv(crashChildEnv + "_FROM"))
	for n := from; ; n++ {
		// 2 KiB: each round fills several segments of the log.
		body := binary.BigEndian.AppendUint64(make([]byte, 0, 2048), uint64(n))
		body = body[:2048]
		err := a.PublishAsync(topic, body, func(err error) {
			if err != nil {
				return
			}
			mu.Lock()
			fmt.Fprintf(w, "acked %d\n", n)
			w.Flush()
			mu.Unlock()
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// A write cut short at the end of the log (a crash during a write that
// was never acknowledged) is dropped; a damaged frame with frames after it
// in a later segment is counted as lost; whole frames before either are
// applied at open.
func TestWAL_TornTailAndDamage(t *testing.T) {
	q := &queue{name: "q/input/b/in1/0"}
	frame := func(seq uint64) []byte {
		return appendFrame(nil, []*entry{{q: q, seq: seq, val: encodeEntry(0, &fleet.UpstreamMessage{Module: "a", Body: []byte(fmt.Sprint(seq))})}})
	}
	write := func(dir string, num uint64, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, walSegmentName(num)), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	torn := func(b []byte) []byte { return b[:len(b)-3] }
	damaged := func(b []byte) []byte { b = append([]byte(nil), b...); b[len(b)-1] ^= 0xff; return b }
	cat := func(bs ...[]byte) (out []byte) {
		for _, b := range bs {
			out = append(out, b...)
		}
		return append(out, make([]byte, 64)...) // the segment's unwritten rest reads as zeros
	}
	for _, tc := range []struct {
		name          string
		segs          [][]byte
		want          []uint64
		torn, corrupt int
	}{
		{"whole", [][]byte{cat(frame(1), frame(2)), cat(frame(3))}, []uint64{1, 2, 3}, 0, 0},
		{"torn tail", [][]byte{cat(frame(1), frame(2)), cat(frame(3), torn(frame(4)))}, []uint64{1, 2, 3}, 1, 0},
		{"checksum at the tail", [][]byte{cat(frame(1), damaged(frame(2)))}, []uint64{1}, 1, 0},
		{"damage before a later segment", [][]byte{cat(frame(1), damaged(frame(2)), frame(3)), cat(frame(4))}, []uint64{1, 4}, 0, 1},
		{"empty segment after the tail", [][]byte{cat(frame(1), torn(frame(2))), cat()}, []uint64{1}, 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for i, s := range tc.segs {
				write(dir, uint64(i+1), s)
			}
			sc, err := readWAL(dir, 0)
			if err != nil {
				t.Fatal(err)
			}
			var seqs []uint64
			for _, r := range sc.records {
				seqs = append(seqs, r.seq)
				if r.queue != q.name {
					t.Errorf("record %d of queue %q", r.seq, r.queue)
				}
			}
			if fmt.Sprint(seqs) != fmt.Sprint(tc.want) || sc.torn != tc.torn || sc.corrupt != tc.corrupt {
				t.Fatalf("records %v torn %d corrupt %d; want %v, %d, %d", seqs, sc.torn, sc.corrupt, tc.want, tc.torn, tc.corrupt)
			}
			// Records already applied are not returned again.
			if sc, _ := readWAL(dir, tc.want[len(tc.want)-1]); len(sc.records) != 0 {
				t.Errorf("%d records past the last applied", len(sc.records))
			}
		})
	}
}
