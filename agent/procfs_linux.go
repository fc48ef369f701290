package agent

import (
	"bytes"
	"errors"
	"os"
	"strconv"
	"strings"
	"syscall"
)

func sysProcAttr() *syscall.SysProcAttr {
	// Own process group: the module and everything it starts are signalled
	// together. Pdeathsig: a child dies with the agent even if the agent is
	// killed with SIGKILL.
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// procStat returns a process's group and start time (clock ticks after
// boot) from /proc/<pid>/stat.
func procStat(pid int) (pgrp int, startTicks uint64, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// The command name (field 2) is in parentheses and may hold anything;
	// fields after the last ')' are plain.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, errors.New("malformed stat")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): pgrp is field 5, starttime field 22.
	if len(f) < 20 {
		return 0, 0, errors.New("malformed stat")
	}
	pgrp, err = strconv.Atoi(f[2])
	if err != nil {
		return 0, 0, err
	}
	startTicks, err = strconv.ParseUint(f[19], 10, 64)
	return pgrp, startTicks, err
}

func procStartTicks(pid int) (uint64, error) {
	_, t, err := procStat(pid)
	return t, err
}

func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// killGroupSince SIGKILLs the members of process group pgid that started no
// earlier than its leader did (startTicks): a process in that group that is
// older cannot be one the agent started. It returns how many it signalled.
func killGroupSince(pgid int, startTicks uint64) int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 1 {
			continue
		}
		pg, st, err := procStat(pid)
		if err != nil || pg != pgid || st < startTicks {
			continue
		}
		if syscall.Kill(pid, syscall.SIGKILL) == nil {
			n++
		}
	}
	return n
}
