//go:build !unix

package raftstore

// lockFile is not implemented here: the state file is then fsynced on
// every commit (statefile.go), which needs no lock to be safe.
func lockFile(string) (func() error, error) { return nil, errLockUnsupported }
