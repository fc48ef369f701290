//go:build !benchboltlog

package raftstore

// benchBoltLog: see benchboltlog_on.go.
const benchBoltLog = false
