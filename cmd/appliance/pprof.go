//go:build pprof

package main

// Profiling builds only (go build -tags pprof): APPLIANCE_PPROF=127.0.0.1:6060
// serves net/http/pprof there. Release builds have no profiler.

import (
	"net/http"
	_ "net/http/pprof"
	"os"
)

func init() {
	if addr := os.Getenv("APPLIANCE_PPROF"); addr != "" {
		go func() { _ = http.ListenAndServe(addr, nil) }()
	}
}
