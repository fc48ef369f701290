package netlimit

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// listen wraps a real loopback listener and accepts in the background,
// handing over what Accept returns.
func listen(t *testing.T, maxPerSource int) (*Listener, chan net.Conn, *atomic.Int64) {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var refusals atomic.Int64
	ln := Wrap(raw, maxPerSource, func(net.Addr) { refusals.Add(1) })
	t.Cleanup(func() { ln.Close() })
	accepted := make(chan net.Conn, 100)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	return ln, accepted, &refusals
}

// dialFrom connects from a given loopback address (any 127.0.0.x is local
// on Linux).
func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial from %s: %v", src, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// closedByServer tells whether the server has closed c (EOF or reset).
func closedByServer(t *testing.T, c net.Conn) bool {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return false
	}
	return err != nil
}

// refused dials from src and tells whether the server closed the
// connection at once (the reset may even reach the dial).
func refused(t *testing.T, src, addr string) bool {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return errors.Is(err, syscall.ECONNRESET)
	}
	defer c.Close()
	return closedByServer(t, c)
}

func receive(t *testing.T, ch chan net.Conn) net.Conn {
	t.Helper()
	select {
	case c := <-ch:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("no connection accepted")
		return nil
	}
}

func TestListener_CapsEachSourceSeparately(t *testing.T) {
	ln, accepted, refusals := listen(t, 2)
	addr := ln.Addr().String()
	a1, a2 := dialFrom(t, "127.0.0.2", addr), dialFrom(t, "127.0.0.2", addr)
	s1, s2 := receive(t, accepted), receive(t, accepted)
	if !refused(t, "127.0.0.2", addr) { // a third from the same source
		t.Fatal("a third connection from 127.0.0.2 was not closed")
	}
	// Another source is not affected.
	b1 := dialFrom(t, "127.0.0.3", addr)
	sb := receive(t, accepted)
	if got := sb.RemoteAddr().(*net.TCPAddr).IP.String(); got != "127.0.0.3" {
		t.Fatalf("accepted %s, want the connection from 127.0.0.3", got)
	}
	if st := ln.Stats(); st.Refused != 1 || st.Open != 3 || refusals.Load() != 1 {
		t.Fatalf("stats %+v, refusal callbacks %d; want 1 refused, 3 open, 1 callback", st, refusals.Load())
	}
	// The accepted ones work.
	if _, err := a1.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(s1, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	_ = a2
	_ = b1

	// Closing one frees a slot for its source.
	s2.Close()
	again := dialFrom(t, "127.0.0.2", addr)
	s3 := receive(t, accepted)
	if _, err := again.Write([]byte("y")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(s3, make([]byte, 1)); err != nil {
		t.Fatalf("the connection that took the freed slot: %v", err)
	}
	s2.Close() // a second Close must not free a second slot
	if !refused(t, "127.0.0.2", addr) {
		t.Fatal("a double Close freed two slots")
	}
}

func TestListener_ReleaseFreesTheSlotThroughTLS(t *testing.T) {
	ln, accepted, _ := listen(t, 1)
	addr := ln.Addr().String()
	dialFrom(t, "127.0.0.4", addr)
	c := receive(t, accepted)
	// A server wraps the connection (TLS here) before it knows who the
	// client is; Release finds the slot through the wrapper.
	Release(tls.Server(c, &tls.Config{}))
	dialFrom(t, "127.0.0.4", addr)
	second := receive(t, accepted)
	if ln.Stats().Refused != 0 {
		t.Fatal("the released slot was not free")
	}
	// Closing a released connection does not free another slot.
	c.Close()
	if !refused(t, "127.0.0.4", addr) {
		t.Fatal("closing a released connection freed a second slot")
	}
	second.Close()
	if st := ln.Stats(); st.Open != 0 {
		t.Fatalf("%d connections still counted open", st.Open)
	}
}

func TestListener_NoCapOnlyCounts(t *testing.T) {
	ln, accepted, _ := listen(t, 0)
	for range 20 {
		dialFrom(t, "127.0.0.5", ln.Addr().String())
		receive(t, accepted)
	}
	if st := ln.Stats(); st.Refused != 0 || st.Open != 20 {
		t.Fatalf("stats %+v, want 20 open and none refused", st)
	}
}

func TestConn_ExposesTheSocket(t *testing.T) {
	ln, accepted, _ := listen(t, 1)
	dialFrom(t, "127.0.0.6", ln.Addr().String())
	c := receive(t, accepted)
	if _, ok := c.(syscall.Conn); !ok {
		t.Fatal("the wrapped connection hides its socket")
	}
	if _, err := c.(syscall.Conn).SyscallConn(); err != nil {
		t.Fatal(err)
	}
}

func TestSourceOf(t *testing.T) {
	for _, tc := range []struct {
		ip   string
		want string
	}{
		{"192.0.2.7", "192.0.2.7/32"},
		{"::ffff:192.0.2.7", "192.0.2.7/32"},
		{"2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"},
	} {
		got, ok := sourceOf(&net.TCPAddr{IP: net.ParseIP(tc.ip), Port: 1})
		if !ok || got != netip.MustParsePrefix(tc.want) {
			t.Errorf("sourceOf(%s) = %v %v, want %s", tc.ip, got, ok, tc.want)
		}
	}
	if _, ok := sourceOf(&net.UnixAddr{Name: "x", Net: "unix"}); ok {
		t.Error("a unix address was counted")
	}
}
