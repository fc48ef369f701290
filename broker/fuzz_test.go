package broker

import (
	"io"
	"log/slog"
	"net"
	"testing"
)

// FuzzPackets sends arbitrary bytes after a valid MQTT 5 CONNECT and asserts
// that the broker still serves: the connection is closed once we stop
// sending, and a new client connects. A panic anywhere in mochi's handling of
// a connection would end the whole test binary, so the fuzzer finds any the
// guard does not catch. The seed corpus is in testdata/fuzz/FuzzPackets
// (issue 501's truncated SUBSCRIBE among them); run the fuzzer with
//
//	go test -run '^$' -fuzz FuzzPackets -fuzztime 60s ./broker/
func FuzzPackets(f *testing.F) {
	f.Add(issue501)
	fl := newTestFleet("fuzz-dev", "probe")
	// Discard logs: testing.F may not be used from inside the fuzz target,
	// and mochi's goroutines log while it runs.
	b := startBroker(f, fl, func(c *Config) { c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil)) })
	go func() { // keep the report sink from filling up
		for range fl.reports {
		}
	}()

	f.Fuzz(func(t *testing.T, junk []byte) {
		c, err := rawConnect(b.Addr(), "fuzz-dev", "key-fuzz-dev")
		if err != nil {
			t.Fatalf("connect before sending junk: %v", err)
		}
		defer c.Close()
		_, _ = c.Write(junk) // the broker may close first
		_ = c.(*net.TCPConn).CloseWrite()
		if err := drain(c); err != nil {
			t.Fatalf("broker did not close the connection after junk % .64x and EOF: %v", junk, err)
		}
		p, err := rawConnect(b.Addr(), "probe", "key-probe")
		if err != nil {
			t.Fatalf("broker stopped serving after junk % .64x: %v", junk, err)
		}
		p.Close()
	})
}
