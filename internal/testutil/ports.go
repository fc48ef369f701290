package testutil

import (
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
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

// pickedPorts are the ports FreeAddr has handed out in this test binary:
// package state because every test in the binary shares the port space,
// and two of them must never get the same port.
var pickedPorts = struct {
	sync.Mutex
	m map[int]bool
}{m: map[int]bool{}}

// FreeAddr returns ip:port where nothing listens now, for a process to
// bind later or for a dial that must find nothing. The port is outside the
// kernel's ephemeral range, so no ":0" listener or outgoing connection
// takes it meanwhile, and it is never handed out twice in one test binary.
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
		if pickedPorts.m[port] {
			continue
		}
		addr := net.JoinHostPort(ip, strconv.Itoa(port))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			continue // another process holds it
		}
		ln.Close()
		pickedPorts.m[port] = true
		return addr
	}
	t.Fatalf("no free port on %s between %d and %d", ip, lowestPick, top)
	return ""
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
