// Command appliance is one binary for the whole system: `appliance serve`
// runs a controller node, the other subcommands talk to one.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"appliance/cli"
)

// version is stamped at build time: -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		cancel() // first signal: graceful shutdown
		<-sigs
		fmt.Fprintln(os.Stderr, "second signal: exiting now")
		os.Exit(1)
	}()
	code := cli.Execute(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv, version)
	cancel()
	os.Exit(code)
}
