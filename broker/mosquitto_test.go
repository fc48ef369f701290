package broker

import (
	"context"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"appliance/fleet"
	"appliance/internal/testenv"
)

// TestBroker_MosquittoClients is issue 4's first acceptance test, with the
// real Debian clients (package mosquitto-clients), an MQTT implementation
// independent of both mochi and paho.
func TestBroker_MosquittoClients(t *testing.T) {
	sub := testenv.LookPath(t, "mosquitto_sub", "install the Debian package mosquitto-clients to run this acceptance test")
	pub := testenv.LookPath(t, "mosquitto_pub", "install the Debian package mosquitto-clients to run this acceptance test")
	f := newTestFleet("press-01", "press-02")
	b := startBroker(t, f)
	host, port, _ := net.SplitHostPort(b.Addr())
	run := func(t *testing.T, bin, id, key string, args ...string) (string, error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		all := append([]string{"-h", host, "-p", port, "-i", id, "-u", id, "-P", key}, args...)
		out, err := exec.CommandContext(ctx, bin, all...).CombinedOutput()
		t.Logf("%s %s → %v\n%s", bin, strings.Join(all, " "), err, out)
		return string(out), err
	}

	for _, version := range []string{"mqttv311", "mqttv5"} {
		t.Run("device with its key receives its desired state/"+version, func(t *testing.T) {
			out, err := run(t, sub, "press-01", "key-press-01", "-V", version, "-q", "1", "-C", "1", "-W", "10",
				"-t", fleet.DesiredTopic("press-01"))
			if err != nil || out != `{"deviceId":"press-01","version":1}`+"\n" {
				t.Fatalf("mosquitto_sub: %v, output %q", err, out)
			}
		})
		t.Run("wrong key is refused/"+version, func(t *testing.T) {
			out, err := run(t, sub, "press-01", "not-the-key", "-V", version, "-q", "1", "-C", "1", "-W", "10",
				"-t", fleet.DesiredTopic("press-01"))
			// 3.1.1 says "not authorised" (0x05), MQTT 5 "bad user name or password" (0x86).
			lower := strings.ToLower(out)
			if err == nil || !strings.Contains(lower, "connection") ||
				!(strings.Contains(lower, "not authorised") || strings.Contains(lower, "bad user name or password")) {
				t.Fatalf("mosquitto_sub with a wrong key: %v, output %q; want the connection refused", err, out)
			}
		})
	}

	t.Run("other device's desired topic and appliance/# yield nothing of it", func(t *testing.T) {
		mustConnectSubscribed(t, b.Addr(), "press-02")
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() { // keep press-02's desired state changing while the spy listens
			defer close(done)
			for {
				select {
				case <-stop:
					return
				case <-time.After(50 * time.Millisecond):
					_ = b.PublishDesired("press-02", []byte(`{"deviceId":"press-02","secret":"registry-password"}`))
				}
			}
		}()
		// Its own topic too, so the run proves the spy was connected and subscribed.
		out, _ := run(t, sub, "press-01", "key-press-01", "-v", "-q", "1", "-C", "2", "-W", "2",
			"-t", fleet.DesiredTopic("press-02"), "-t", "appliance/#", "-t", "#", "-t", "appliance/devices/+/desired",
			"-t", fleet.DesiredTopic("press-01"))
		close(stop)
		<-done
		if strings.Contains(out, "press-02") || strings.Contains(out, "secret") {
			t.Fatalf("spy saw another device's messages: %q", out)
		}
		if !strings.Contains(out, fleet.DesiredTopic("press-01")+` {"deviceId":"press-01","version":1}`) {
			t.Fatalf("spy did not get its own desired state, so the test proves nothing: %q", out)
		}
	})

	t.Run("a disabled device is dropped at once and cannot come back", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, sub, "-h", host, "-p", port, "-i", "press-01", "-u", "press-01", "-P", "key-press-01",
			"-V", "mqttv311", "-q", "1", "-t", fleet.DesiredTopic("press-01"))
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		waitFor(t, "mosquitto_sub connected", func() bool { _, ok := b.Connection("press-01"); return ok })
		// The node disables the device, then tells the broker.
		f.mu.Lock()
		key := f.keys["press-01"]
		delete(f.keys, "press-01")
		f.mu.Unlock()
		defer func() { f.mu.Lock(); f.keys["press-01"] = key; f.mu.Unlock() }()
		b.Disconnect("press-01")
		// mosquitto_sub reconnects after losing its connection; refused, it exits.
		select {
		case err := <-exited:
			if err == nil {
				t.Fatal("mosquitto_sub exited cleanly; want an error")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("mosquitto_sub still running 10s after Disconnect")
		}
		if _, ok := b.Connection("press-01"); ok {
			t.Fatal("press-01 still connected")
		}
	})

	t.Run("publishing to another device's reported topic changes nothing", func(t *testing.T) {
		for _, version := range []string{"mqttv311", "mqttv5"} {
			_, _ = run(t, pub, "press-01", "key-press-01", "-V", version, "-q", "1",
				"-t", fleet.ReportedTopic("press-02"), "-m", `{"lastDesiredVersion":99}`)
		}
		if _, err := run(t, pub, "press-01", "key-press-01", "-q", "1",
			"-t", fleet.ReportedTopic("press-01"), "-m", `{"lastDesiredVersion":1}`); err != nil {
			t.Fatalf("own report: %v", err)
		}
		select {
		case r := <-f.reports:
			if r.deviceID != "press-01" || r.doc != `{"lastDesiredVersion":1}` {
				t.Fatalf("sink got %+v; want only press-01's own report", r)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("own report never reached the sink")
		}
		select {
		case r := <-f.reports:
			t.Fatalf("sink got a second report %+v", r)
		case <-time.After(100 * time.Millisecond):
		}
	})
}
