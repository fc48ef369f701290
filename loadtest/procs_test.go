//go:build loadtest

package loadtest_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"appliance/internal/testutil"
	"appliance/loadtest"
)

// proc is a child process of the driver: a node, mosquitto, a load shard
// or a publisher. It dies with the test binary (Pdeathsig) and is stopped
// by t.Cleanup otherwise.
type proc struct {
	t      *testing.T
	name   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	events chan loadtest.Event // JSON lines from stdout (shards, publishers)
	log    string              // file holding stderr (and stdout if not events)
	exited chan struct{}
	// stopping is closed by stop: events nobody will read are dropped
	// then, so that the end of stdout (and so Wait) is reached.
	stopping     chan struct{}
	stoppingOnce sync.Once
}

// startProc starts bin. With events, stdout is read as loadtest.Event JSON
// lines and stdin is a pipe for commands; otherwise both outputs go to the
// log file.
func startProc(t *testing.T, logDir, name, bin string, args, env []string, events bool) *proc {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logPath := filepath.Join(logDir, name+".log")
	lf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{t: t, name: name, cmd: cmd, log: logPath, exited: make(chan struct{}), stopping: make(chan struct{})}
	cmd.Stderr = lf
	// stdout is a pipe of our own, not StdoutPipe: Wait closes that one
	// when the process exits, perhaps before its last lines are read (a
	// publisher that printed its result and exited lost it). Ours is read
	// to its end whatever Wait does.
	var stdout, stdoutW *os.File
	if events {
		if p.stdin, err = cmd.StdinPipe(); err != nil {
			t.Fatal(err)
		}
		if stdout, stdoutW, err = os.Pipe(); err != nil {
			t.Fatal(err)
		}
		cmd.Stdout = stdoutW
		p.events = make(chan loadtest.Event, 256)
	} else {
		cmd.Stdout = lf
	}
	if err := spawn(cmd); err != nil {
		lf.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	var readers sync.WaitGroup // the log file is closed when both are done
	if events {
		stdoutW.Close() // the child has its own copy
		readers.Add(1)
		go func() {
			defer readers.Done()
			defer stdout.Close()
			defer close(p.events)
			sc := bufio.NewScanner(stdout)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			for sc.Scan() {
				var e loadtest.Event
				if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
					fmt.Fprintf(lf, "driver: not an event: %s\n", sc.Bytes())
					continue
				}
				select {
				case p.events <- e:
				case <-p.stopping: // nobody reads any more
				}
			}
		}()
	}
	readers.Add(1)
	go func() {
		defer readers.Done()
		err := cmd.Wait()
		fmt.Fprintf(lf, "driver: %s exited: %v\n", name, err)
		close(p.exited)
	}()
	go func() {
		readers.Wait()
		lf.Close()
	}()
	t.Cleanup(func() { p.stop(10 * time.Second) })
	return p
}

// spawn starts cmd from one OS thread that lives as long as the test
// binary: Linux sends Pdeathsig when the *thread* that forked the child
// exits, not the process (golang/go#27505), and the Go runtime may end a
// thread while the test still needs the child.
func spawn(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnCh = make(chan func())
		go func() {
			runtime.LockOSThread() // never unlocked: the thread never exits
			for f := range spawnCh {
				f()
			}
		}()
	})
	errc := make(chan error)
	spawnCh <- func() { errc <- cmd.Start() }
	return <-errc
}

var (
	spawnOnce sync.Once
	spawnCh   chan func()
)

func (p *proc) pid() int { return p.cmd.Process.Pid }

// send writes one command line to the process's stdin.
func (p *proc) send(line string) {
	if _, err := io.WriteString(p.stdin, line+"\n"); err != nil {
		p.t.Logf("%s: command %q: %v", p.name, line, err)
	}
}

// wait returns the next event named name, logging any other; ok is false
// after timeout or if the process ended.
func (p *proc) wait(name string, timeout time.Duration) (loadtest.Event, bool) {
	deadline := time.After(timeout)
	for {
		select {
		case e, ok := <-p.events:
			if !ok {
				p.t.Logf("%s ended while waiting for %q; its log:\n%s", p.name, name, p.tail())
				return loadtest.Event{}, false
			}
			if e.Event == name {
				return e, true
			}
			p.t.Logf("%s: event %+v while waiting for %q", p.name, e, name)
		case <-deadline:
			return loadtest.Event{}, false
		}
	}
}

// stop ends the process: "quit" or SIGTERM, then SIGKILL after grace.
func (p *proc) stop(grace time.Duration) {
	p.stoppingOnce.Do(func() { close(p.stopping) })
	select {
	case <-p.exited:
		return
	default:
	}
	if p.stdin != nil {
		_, _ = io.WriteString(p.stdin, "quit\n") // fails if it is exiting already
		p.stdin.Close()
	} else {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-p.exited:
	case <-time.After(grace):
		p.t.Logf("%s did not stop within %v; killing it", p.name, grace)
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// cpu is the process's user+system CPU time so far, or after it exited.
func (p *proc) cpu() time.Duration {
	select {
	case <-p.exited:
		return p.cmd.ProcessState.UserTime() + p.cmd.ProcessState.SystemTime()
	default:
	}
	d, err := cpuTime(p.pid())
	if err != nil {
		p.t.Logf("%s: %v", p.name, err)
	}
	return d
}

// tail is the end of the process's log.
func (p *proc) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// rss is a process's resident set (VmRSS) in bytes.
func rss(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// clockTick is USER_HZ, the unit of /proc/<pid>/stat times (100 on Linux).
const clockTick = 10 * time.Millisecond

// cpuTime is a running process's utime+stime from /proc/<pid>/stat.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name may hold spaces; the fields after it don't. utime
	// and stime are fields 14 and 15, the 12th and 13th after the name.
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: utime %q stime %q", pid, f[11], f[12])
	}
	return time.Duration(u+s) * clockTick, nil
}

// machineBusy is the CPU time all processes have used (every CPU's
// non-idle time from /proc/stat); with the measured processes' own CPU it
// shows how much other work shared the machine.
func machineBusy() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0]) // cpu user nice system idle iowait irq softirq steal ...
	var busy int64
	for i, v := range f[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		if i != 3 && i != 4 && i < 8 { // not idle, not iowait, not guest time (already in user)
			busy += n
		}
	}
	return time.Duration(busy) * clockTick
}

// openFiles counts a process's open file descriptors.
func openFiles(pid int) int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents)
}

// shards is a group of `mqttload connect` processes sharing one devices
// file, each connecting from its own loopback address.
type shards struct {
	t     *testing.T
	procs []*proc
}

// nextSourceIP numbers the loopback addresses shards connect from, so that
// no two shards of a run (or of consecutive phases, or runs) share one
// address's ephemeral ports, some of which the previous phase leaves in
// TIME_WAIT; it starts at a place that depends on the process id.
var nextSourceIP = 11 + os.Getpid()%200

func startShards(t *testing.T, k knobs, env *binaries, logDir, phase, addr, devicesFile string, total int, topic string) *shards {
	t.Helper()
	n := (total + k.perShard - 1) / k.perShard
	s := &shards{t: t}
	for i := range n {
		from, count := i*total/n, (i+1)*total/n-i*total/n
		ip := fmt.Sprintf("127.0.0.%d", nextSourceIP)
		nextSourceIP = 11 + (nextSourceIP-11+1)%200
		args := []string{"connect", "--addr", addr, "--devices-file", devicesFile,
			"--from", strconv.Itoa(from), "--count", strconv.Itoa(count), "--source-ip", ip,
			"--topic", topic, "--concurrency", strconv.Itoa(k.concurrency)}
		s.procs = append(s.procs, startProc(t, logDir, fmt.Sprintf("%s-shard%d", phase, i), env.mqttload, args,
			[]string{"GOMAXPROCS=2"}, true))
	}
	return s
}

// all sends cmd to every shard (if not empty) and collects each one's next
// event named name; missing ones are zero Events with ok false.
func (s *shards) all(cmd, name string, timeout time.Duration) ([]loadtest.Event, bool) {
	if cmd != "" {
		for _, p := range s.procs {
			p.send(cmd)
		}
	}
	out := make([]loadtest.Event, len(s.procs))
	okAll := true
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i, p := range s.procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e, ok := p.wait(name, timeout)
			mu.Lock()
			defer mu.Unlock()
			out[i] = e
			okAll = okAll && ok
		}()
	}
	wg.Wait()
	return out, okAll
}

func (s *shards) cpu() time.Duration {
	var d time.Duration
	for _, p := range s.procs {
		d += p.cpu()
	}
	return d
}

func (s *shards) rss() int64 {
	var total int64
	for _, p := range s.procs {
		r, _ := rss(p.pid())
		total += r
	}
	return total
}

func (s *shards) stop() {
	var wg sync.WaitGroup
	for _, p := range s.procs {
		wg.Add(1)
		go func() { defer wg.Done(); p.stop(30 * time.Second) }()
	}
	wg.Wait()
}

// freePort returns a loopback port nothing listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	_, port, _ := net.SplitHostPort(testutil.FreeAddr(t, "127.0.0.1"))
	n, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// waitListening waits until addr accepts TCP connections.
func waitListening(t *testing.T, p *proc, addr string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-p.exited:
			t.Fatalf("%s exited; log:\n%s", p.name, p.tail())
		default:
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s not listening on %s after %v; log:\n%s", p.name, addr, timeout, p.tail())
}

// startPerf profiles a process with `perf record` while the returned
// function is not called, if LOADTEST_PERF names a directory; the report's
// top lines go to the test log and the whole of it to that directory.
func startPerf(t *testing.T, k knobs, p *proc, name string) (stop func()) {
	t.Helper()
	if k.perf == "" {
		return func() {}
	}
	must(t, os.MkdirAll(k.perf, 0o755))
	data := filepath.Join(k.perf, name+".data")
	rec := exec.Command("perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", strconv.Itoa(p.pid()), "-o", data)
	var out bytes.Buffer
	rec.Stdout, rec.Stderr = &out, &out
	if err := rec.Start(); err != nil {
		t.Logf("perf record: %v (LOADTEST_PERF needs the perf tool)", err)
		return func() {}
	}
	time.Sleep(200 * time.Millisecond) // perf attaches
	return func() {
		_ = rec.Process.Signal(syscall.SIGINT)
		_ = rec.Wait()
		rep, err := exec.Command("perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
			"--sort", "symbol", "--percent-limit", "0.7").CombinedOutput()
		if err != nil {
			t.Logf("perf report: %v\n%s\n%s", err, out.String(), rep)
			return
		}
		txt := filepath.Join(k.perf, name+".txt")
		_ = os.WriteFile(txt, rep, 0o644)
		lines := strings.Split(string(rep), "\n")
		t.Logf("profile of %s during %s (%s):\n%s", p.name, name, txt, strings.Join(lines[:min(len(lines), 70)], "\n"))
	}
}
