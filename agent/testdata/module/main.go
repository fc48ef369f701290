// Command module is the test workload of the agent's tests: a static
// program that runs as a process module or, copied into an image FROM
// scratch, as a docker module. Environment:
//
//	MODULE_OUT         directory to write <module>.pid, <module>.starts (one
//	                   line per start: "<pid> <unix nanoseconds> <GREETING>")
//	                   and <module>.term (when it gets SIGTERM)
//	MODULE_EXIT_AFTER  a duration after which it exits (default: never)
//	MODULE_EXIT_CODE   the exit code it then exits with (default 0)
//	MODULE_GRANDCHILD  "1": start a copy of itself that sleeps forever and
//	                   writes <module>.child.pid
//
// IOTEDGE_MODULEID (set by the agent) names the files.
package main

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

func main() {
	name := os.Getenv("IOTEDGE_MODULEID")
	if name == "" {
		name = "module"
	}
	out := os.Getenv("MODULE_OUT")
	write := func(suffix, text string, appendTo bool) {
		if out == "" {
			return
		}
		flags := os.O_CREATE | os.O_WRONLY | os.O_TRUNC
		if appendTo {
			flags = os.O_CREATE | os.O_WRONLY | os.O_APPEND
		}
		f, err := os.OpenFile(filepath.Join(out, name+suffix), flags, 0o644)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(90)
		}
		fmt.Fprint(f, text)
		f.Close()
	}
	if os.Getenv("MODULE_IS_CHILD") == "1" {
		write(".child.pid", strconv.Itoa(os.Getpid()), false)
		for {
			time.Sleep(time.Hour)
		}
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	pid := os.Getpid()
	// The start line first: once the pid file names this process, its
	// start is recorded.
	write(".starts", fmt.Sprintf("%d %d %s\n", pid, time.Now().UnixNano(), os.Getenv("GREETING")), true)
	write(".pid", strconv.Itoa(pid), false)
	fmt.Printf("module %s started, pid %d\n", name, pid)
	fmt.Fprintf(os.Stderr, "module %s writes to stderr too\n", name)

	if os.Getenv("MODULE_GRANDCHILD") == "1" {
		self, _ := os.Executable()
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), "MODULE_IS_CHILD=1")
		if err := cmd.Start(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(91)
		}
	}

	var exit <-chan time.Time
	if d, err := time.ParseDuration(os.Getenv("MODULE_EXIT_AFTER")); err == nil {
		exit = time.After(d)
	}
	select {
	case <-sigs:
		write(".term", "term", false)
		fmt.Println("SIGTERM: exiting")
		os.Exit(0)
	case <-exit:
		code, _ := strconv.Atoi(os.Getenv("MODULE_EXIT_CODE"))
		fmt.Printf("exiting with code %d\n", code)
		os.Exit(code)
	}
}
