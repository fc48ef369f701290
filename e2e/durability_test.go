//go:build e2e

package e2e

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"appliance/api"
	"appliance/fleet"
)

// TestKill9KeepsAcknowledgedWrites writes from several clients at once,
// SIGKILLs the node while writes are in flight, restarts it on the same data
// directory and checks that every write the node acknowledged is there.
// Writes that got no answer may or may not have landed; both are fine.
func TestKill9KeepsAcknowledgedWrites(t *testing.T) {
	dir := t.TempDir()
	var acked []string
	var mu sync.Mutex
	for round := range 3 {
		s := startServer(t, dir)
		c := s.client()
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; ctx.Err() == nil; i++ {
					id := fmt.Sprintf("r%d-w%d-%04d", round, w, i)
					_, err := c.PutDevice(ctx, id, api.DeviceRequest{Tags: map[string]any{"round": float64(round)}}, api.WriteOptions{})
					if err == nil {
						mu.Lock()
						acked = append(acked, id)
						mu.Unlock()
					}
				}
			}()
		}
		// Let writes flow, then kill the node in the middle of them.
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			mu.Lock()
			n := len(acked)
			mu.Unlock()
			if n >= (round+1)*200 {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		s.kill()
		cancel()
		wg.Wait()
	}
	if len(acked) < 300 {
		t.Fatalf("only %d writes were acknowledged; the test did not exercise much", len(acked))
	}

	s := startServer(t, dir)
	c := s.client()
	for _, id := range acked {
		if _, err := c.Device(context.Background(), id, true); err != nil {
			if errors.Is(err, fleet.ErrNotFound) {
				t.Fatalf("acknowledged write %s lost after kill -9 (of %d acknowledged)", id, len(acked))
			}
			t.Fatal(err)
		}
	}
	t.Logf("%d acknowledged writes over 3 kill -9 rounds, all present", len(acked))
}
