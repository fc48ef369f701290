//go:build !linux

package workload

import "net"

// peerPid is 0 where SO_PEERCRED is not available.
func peerPid(net.Conn) int { return 0 }
