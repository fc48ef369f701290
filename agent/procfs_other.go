//go:build unix && !linux

package agent

import (
	"errors"
	"syscall"
)

func sysProcAttr() *syscall.SysProcAttr {
	// Own process group, so that the module and its children are signalled
	// together. There is no parent-death signal here: modules outlive an
	// agent that is killed, and are not cleaned up by the next run.
	return &syscall.SysProcAttr{Setpgid: true}
}

func procStartTicks(int) (uint64, error) { return 0, errors.New("not supported") }

// bootID is unknown here, which disables the cleanup of leftovers: without
// start times the agent cannot tell its processes from others.
func bootID() string { return "" }

func killGroupSince(int, uint64) int { return 0 }
