package loadtest

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// allowAll lets every client connect, subscribe and publish.
type allowAll struct{ mqtt.HookBase }

func (allowAll) ID() string { return "allow-all" }
func (allowAll) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}
func (allowAll) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }
func (allowAll) OnACLCheck(*mqtt.Client, string, bool) bool              { return true }

// startMochi runs a plain mochi broker that lets everyone in: the load
// generator's client is checked against an MQTT implementation it does not
// share code with. The driver (load_test.go) runs against the real node.
func startMochi(t *testing.T) string {
	t.Helper()
	srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := srv.AddHook(new(allowAll), nil); err != nil {
		t.Fatal(err)
	}
	ln := listeners.NewTCP(listeners.Config{ID: "t", Address: "127.0.0.1:0"})
	if err := srv.AddListener(ln); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return ln.Address()
}

func TestConn_SubscribePublishAck(t *testing.T) {
	addr := startMochi(t)
	got := make(chan string, 4)
	sub, err := Dial(context.Background(), &net.Dialer{}, addr, ConnectOptions{ClientID: "sub", Username: "sub", Password: "k", Keepalive: time.Minute},
		func(_ *Conn, topic string, payload []byte, _ time.Time) { got <- topic + " " + string(payload) })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if err := sub.Subscribe("a/b", 1, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	pub, err := Dial(context.Background(), &net.Dialer{}, addr, ConnectOptions{ClientID: "pub"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	big := strings.Repeat("x", 3000) // larger than the read buffer
	for _, p := range []string{"hello", big} {
		id, err := pub.Publish("a/b", 1, []byte(p))
		if err != nil {
			t.Fatal(err)
		}
		if ack, err := pub.NextAck(5 * time.Second); err != nil || ack != id {
			t.Fatalf("PUBACK %d, %v; want %d", ack, err, id)
		}
		select {
		case m := <-got:
			if m != "a/b "+p {
				t.Fatalf("received %.40q…; want %.40q…", m, "a/b "+p)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("nothing received")
		}
	}
	if err := sub.Ping(); err != nil {
		t.Fatal(err)
	}
	if err := sub.Subscribe("a/+", 1, 5*time.Second); err != nil { // a SUBACK after a PINGRESP
		t.Fatal(err)
	}
	if sub.Err() != nil {
		t.Fatalf("connection ended: %v", sub.Err())
	}
}

func TestRunShard_WatchCountsEachDeviceOnce(t *testing.T) {
	addr := startMochi(t)
	devs := make([]Device, 20)
	topics := make([]string, len(devs))
	for i := range devs {
		devs[i] = Device{ID: fmt.Sprintf("d-%02d", i), Key: "k"}
		topics[i] = Topic("appliance/devices/{id}/desired", devs[i].ID)
	}
	cmdR, cmdW := io.Pipe()
	evR, evW := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- RunShard(context.Background(), ShardConfig{Addr: addr, SourceIP: "127.0.0.1", Devices: devs, Concurrency: 4}, cmdR, evW)
		evW.Close()
	}()
	events := bufio.NewScanner(evR)
	next := func(want string) Event {
		t.Helper()
		for events.Scan() {
			var e Event
			if err := json.Unmarshal(events.Bytes(), &e); err != nil {
				t.Fatalf("event %q: %v", events.Bytes(), err)
			}
			if e.Event == want {
				return e
			}
			t.Logf("event %+v", e)
		}
		t.Fatalf("no %q event", want)
		return Event{}
	}
	if e := next("connected"); e.Count != 20 || e.Failed != 0 || e.Live != 20 {
		t.Fatalf("connected %+v", e)
	}
	fmt.Fprintln(cmdW, `watch "deploymentId":"v2"`)
	if e := next("watching"); e.Expected != 20 {
		t.Fatalf("watching %+v", e)
	}
	publish := func(payload string) {
		t.Helper()
		if err := RunPublisher(context.Background(), PublisherConfig{Addr: addr, ClientID: "pub", Topics: topics, Payload: []byte(payload), Window: 5}, io.Discard); err != nil {
			t.Fatal(err)
		}
	}
	publish(`{"deploymentId":"v1"}`) // not watched
	publish(`{"deploymentId":"v2"}`)
	publish(`{"deploymentId":"v2"}`) // counted once per device
	e := next("received")
	if e.Count != 20 || e.Expected != 20 || e.Start == 0 || e.End < e.Start {
		t.Fatalf("received %+v", e)
	}
	fmt.Fprintln(cmdW, "quit")
	next("closed")
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
