//go:build pprof

package main

// Profiling builds only (go build -tags pprof): APPLIANCE_PPROF=127.0.0.1:6060
// serves net/http/pprof there; APPLIANCE_CPUPROFILE=FILE writes a CPU
// profile of the process's first APPLIANCE_CPUPROFILE_FOR (default 30 s),
// its start included, which a profile taken over HTTP cannot catch.
// Release builds have no profiler.

import (
	"net/http"
	_ "net/http/pprof"
	"os"
	"runtime/pprof"
	"time"
)

func init() {
	if addr := os.Getenv("APPLIANCE_PPROF"); addr != "" {
		go func() { _ = http.ListenAndServe(addr, nil) }()
	}
	if path := os.Getenv("APPLIANCE_CPUPROFILE"); path != "" {
		profileStart(path)
	}
}

func profileStart(path string) {
	d, err := time.ParseDuration(os.Getenv("APPLIANCE_CPUPROFILE_FOR"))
	if err != nil || d <= 0 {
		d = 30 * time.Second
	}
	f, err := os.Create(path)
	if err != nil {
		panic(err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		panic(err)
	}
	time.AfterFunc(d, func() {
		pprof.StopCPUProfile()
		f.Close()
	})
}
