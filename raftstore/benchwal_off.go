//go:build !benchwal

package raftstore

// benchWAL: see benchwal_on.go.
const benchWAL = false
