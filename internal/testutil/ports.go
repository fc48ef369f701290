package testutil

import (
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// A port a test picks for a process to bind later (a node restarted on the
// same address, a server that is down on purpose) must not be one the
// kernel hands out for ":0": between the pick and the bind, any listener
// or outgoing connection asking for a free port may get it. That happened
// in CI: a freed port went to the same node's raft listener (":0"), and its
// broker then failed to bind the port it had been given. So FreeAddr picks
// below the kernel's ephemeral range, where only explicit binds go.

// lowestPick is where FreeAddr starts looking: above the ports services
// usually own.
const lowestPick = 10000

// pickedPorts are the ports FreeAddr has handed out in this test binary,
// each with the lock that keeps it from the test binaries running beside
// this one (go test runs packages at once): package state because every
// test in the binary shares the port space, and two of them must never get
// the same port.
var pickedPorts = struct {
	sync.Mutex
	m map[int]*os.File
}{m: map[int]*os.File{}}

// FreeAddr returns ip:port where nothing listens now, for a process to
// bind later or for a dial that must find nothing. The port is outside the
// kernel's ephemeral range, so no ":0" listener or outgoing connection
// takes it meanwhile, and it is handed out once among the test binaries
// running at once (a lock file per port, held until the binary exits).
func FreeAddr(t testing.TB, ip string) string {
	t.Helper()
	top := ephemeralLow()
	if top-lowestPick < 1000 {
		t.Fatalf("the ephemeral port range starts at %d: no room below it for fixed test ports", top)
	}
	pickedPorts.Lock()
	defer pickedPorts.Unlock()
	span := top - lowestPick
	start := rand.IntN(span)
	for i := range span {
		port := lowestPick + (start+i)%span
		if pickedPorts.m[port] != nil {
			continue
		}
		lock, ok := lockPort(t, port)
		if !ok {
			continue // another test binary has it
		}
		addr := net.JoinHostPort(ip, strconv.Itoa(port))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			lock.Close()
			continue // another process holds it
		}
		ln.Close()
		pickedPorts.m[port] = lock
		return addr
	}
	t.Fatalf("no free port on %s between %d and %d", ip, lowestPick, top)
	return ""
}

// lockPort takes the machine-wide lock of a port for this process: an
// exclusive flock on a file named for it, released when the file is
// closed or the process exits (a crashed test leaves no lock behind).
func lockPort(t testing.TB, port int) (*os.File, bool) {
	t.Helper()
	dir := filepath.Join(os.TempDir(), "appliance-test-ports")
	if err := os.MkdirAll(dir, 0o777); err != nil {
		t.Fatalf("test port locks: %v", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, strconv.Itoa(port)), os.O_CREATE|os.O_RDWR, 0o666)
	if err != nil {
		t.Fatalf("test port locks: %v", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, false
	}
	return f, true
}

// ephemeralLow is the first port of the kernel's ephemeral range (Linux's
// default when it cannot be read).
func ephemeralLow() int {
	const linuxDefault = 32768
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return linuxDefault
	}
	fields := strings.Fields(string(b))
	if len(fields) == 0 {
		return linuxDefault
	}
	low, err := strconv.Atoi(fields[0])
	if err != nil {
		return linuxDefault
	}
	return low
}
