//go:build unix

package raftstore

import (
	"errors"
	"os"
	"syscall"
)

// lockFile takes an exclusive lock on path (created if missing) without
// waiting; release drops it. errLocked: another process holds it.
func lockFile(path string) (release func() error, err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, errLocked
		}
		return nil, err
	}
	return f.Close, nil // closing the file releases the lock
}
