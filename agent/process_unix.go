//go:build unix

package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"appliance/fleet"
	"appliance/linelog"
)

// processDriver runs process modules as children of the agent. Each
// module instance is one process group: the program is its leader, and
// stopping or removing the module signals the whole group. Children die
// with the agent (SIGKILL via the parent-death signal on Linux, and an
// explicit stop on a graceful shutdown); a restarted agent starts them
// again from its stored desired state. A pid record per running process in
// <DataDir>/process lets a restarted agent kill what an agent killed with
// SIGKILL left behind (grandchildren keep running when only the leader
// dies), checking the processes' start times so that nothing it did not
// start is touched.
type processDriver struct {
	log      *slog.Logger
	cfg      Config
	deviceID string
	dataDir  string
	runDir   string
	runID    string
	notify   func()

	spawnMu sync.RWMutex      // held (read) while sending on spawn; Close closes it under the write lock
	spawn   chan spawnRequest // served by one goroutine locked to its thread

	mu     sync.Mutex
	seq    uint64
	procs  map[string]*procInstance
	pipes  map[*os.File]bool // output pipes being read
	closed bool
	wg     sync.WaitGroup // wait and output goroutines
	// outputs keep each module's stdout and stderr, by module name, across
	// its instances (a restart appends to the same log).
	outputs map[string]*linelog.Writer
}

type spawnRequest struct {
	cmd    *exec.Cmd
	result chan error
}

// procInstance is one module instance: the spec it runs and its current
// or last process. Fields below spec are guarded by processDriver.mu.
type procInstance struct {
	handle string
	name   string
	argv   []string
	env    []string
	dir    string

	running    bool
	starting   bool
	pid        int
	done       chan struct{} // closed when the current process has exited
	exitCode   int
	startedAt  time.Time
	finishedAt time.Time
	startErr   string
}

// pidRecord is written while a process runs, so that a restarted agent can
// clean up after one that was killed.
type pidRecord struct {
	Module     string `json:"module"`
	PID        int    `json:"pid"`
	StartTicks uint64 `json:"startTicks"`
	BootID     string `json:"bootId"`
}

func newProcessDriver(cfg Config, notify func()) (driver, error) {
	runDir := filepath.Join(cfg.DataDir, "process")
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return nil, fmt.Errorf("create process run dir: %w", err)
	}
	var id [4]byte
	_, _ = rand.Read(id[:])
	d := &processDriver{
		log:      cfg.Logger,
		cfg:      cfg,
		deviceID: cfg.DeviceID,
		dataDir:  cfg.DataDir,
		runDir:   runDir,
		runID:    hex.EncodeToString(id[:]),
		notify:   notify,
		spawn:    make(chan spawnRequest),
		procs:    map[string]*procInstance{},
		pipes:    map[*os.File]bool{},
		outputs:  map[string]*linelog.Writer{},
	}
	d.cleanupLeftovers()
	go d.spawner(d.spawn)
	return d, nil
}

// spawner starts every child from one OS thread that lives as long as the
// driver: Linux delivers the parent-death signal when the thread that
// forked a child exits, not the process, and the Go runtime may retire
// other threads.
func (d *processDriver) spawner(requests <-chan spawnRequest) {
	runtime.LockOSThread()
	// Never unlocked: when this goroutine returns, its thread exits.
	for req := range requests {
		req.result <- req.cmd.Start()
	}
}

func (d *processDriver) Name() string { return RuntimeProcess }

func (d *processDriver) Supports(moduleType string) bool {
	return moduleType == fleet.ModuleTypeProcess
}

func (d *processDriver) Create(ctx context.Context, spec *moduleSpec, _ []registryCredential) (string, error) {
	dir := spec.WorkingDir
	if dir == "" {
		dir = filepath.Join(d.dataDir, "modules", spec.Name)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return "", fmt.Errorf("create working dir: %w", err)
		}
	}
	env := envList(d.deviceID, spec)
	env = append([]string{"PATH=" + modulePath()}, env...)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return "", errors.New("process runtime closed")
	}
	d.seq++
	h := fmt.Sprintf("%s.%s.%d", spec.Name, d.runID, d.seq)
	d.procs[h] = &procInstance{handle: h, name: spec.Name, argv: spec.Command, env: env, dir: dir}
	return h, nil
}

// modulePath is the PATH a module gets: the agent's, or a usual default.
// Nothing else of the agent's environment is passed on, so that its own
// settings (the device key among them) never reach a module.
func modulePath() string {
	if p := os.Getenv("PATH"); p != "" {
		return p
	}
	return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
}

func (d *processDriver) instance(h string) (*procInstance, error) {
	p, ok := d.procs[h]
	if !ok {
		return nil, errGone
	}
	return p, nil
}

func (d *processDriver) Start(ctx context.Context, h string) error {
	d.mu.Lock()
	p, err := d.instance(h)
	if err != nil || p.running || p.starting || d.closed {
		d.mu.Unlock()
		if d.closed {
			return errors.New("process runtime closed")
		}
		return err
	}
	p.starting = true
	d.mu.Unlock()

	err = d.startProcess(p)

	d.mu.Lock()
	p.starting = false
	if err != nil {
		p.startErr = err.Error()
	}
	d.mu.Unlock()
	return err
}

func (d *processDriver) startProcess(p *procInstance) error {
	cmd := exec.Command(p.argv[0], p.argv[1:]...)
	cmd.Env = p.env
	cmd.Dir = p.dir
	cmd.SysProcAttr = sysProcAttr()
	outR, outW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("stdout pipe: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return fmt.Errorf("stderr pipe: %w", err)
	}
	// *os.File outputs: Wait returns when the process exits, even if a
	// grandchild still holds the pipes.
	cmd.Stdout, cmd.Stderr = outW, errW
	output, err := d.output(p.name)
	if err != nil {
		outR.Close()
		outW.Close()
		errR.Close()
		errW.Close()
		return err
	}

	res := make(chan error, 1)
	d.spawnMu.RLock()
	if d.spawn == nil {
		err = errors.New("process runtime closed")
	} else {
		d.spawn <- spawnRequest{cmd: cmd, result: res}
		err = <-res
	}
	d.spawnMu.RUnlock()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return fmt.Errorf("start %s: %w", p.argv[0], err)
	}
	pid := cmd.Process.Pid
	rec := pidRecord{Module: p.name, PID: pid, BootID: bootID()}
	rec.StartTicks, _ = procStartTicks(pid)
	d.writeRecord(p.handle, rec)

	done := make(chan struct{})
	d.mu.Lock()
	p.running = true
	p.pid = pid
	p.done = done
	p.startedAt = time.Now()
	p.finishedAt = time.Time{}
	p.exitCode = 0
	p.startErr = ""
	d.mu.Unlock()
	d.log.Info("module process started", "module", p.name, "pid", pid)

	d.mu.Lock()
	d.pipes[outR], d.pipes[errR] = true, true
	d.mu.Unlock()
	d.wg.Add(3)
	go d.keepLines(output, "stdout", outR)
	go d.keepLines(output, "stderr", errR)
	go func() {
		defer d.wg.Done()
		_ = cmd.Wait()
		code := exitCode(cmd.ProcessState)
		// The module is its process group: what it leaves behind goes too.
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		d.removeRecord(p.handle)
		d.mu.Lock()
		p.running = false
		p.exitCode = code
		p.finishedAt = time.Now()
		close(done)
		d.mu.Unlock()
		d.log.Info("module process exited", "module", p.name, "pid", pid, "exitCode", code)
		d.notify()
	}()
	return nil
}

// exitCode renders a process's end the way docker does: its exit status,
// or 128 + the signal that killed it.
func exitCode(ps *os.ProcessState) int {
	if ps == nil {
		return -1
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ps.ExitCode()
}

// maxOutputLine caps one kept line; longer lines are kept in pieces.
const maxOutputLine = 4096

// output is the log of a module's stdout and stderr, opened on its first
// start.
func (d *processDriver) output(module string) (*linelog.Writer, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if w := d.outputs[module]; w != nil {
		return w, nil
	}
	w, err := linelog.Open(d.cfg.moduleLogPath(module), d.cfg.Logs)
	if err != nil {
		return nil, fmt.Errorf("module output log: %w", err)
	}
	d.outputs[module] = w
	return w, nil
}

// keepLines copies what a module writes on one stream into its log, line
// by line: never into the agent's own log.
func (d *processDriver) keepLines(output *linelog.Writer, stream string, r *os.File) {
	defer d.wg.Done()
	defer func() {
		d.mu.Lock()
		delete(d.pipes, r)
		d.mu.Unlock()
		r.Close()
	}()
	br := bufio.NewReaderSize(r, maxOutputLine)
	failed := false
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			if werr := output.WriteLine(stream, bytes.TrimRight(line, "\r\n")); werr != nil && !failed && !errors.Is(werr, linelog.ErrClosed) {
				failed = true // once per stream and start: a full disk would otherwise log every line
				d.log.Warn("module output not kept", "file", output.Path(), "err", werr)
			}
		}
		if err == bufio.ErrBufferFull {
			continue
		}
		if err != nil {
			return
		}
	}
}

// moduleLogs reads a module's kept output (any instance, running or not).
func (d *processDriver) moduleLogs(_ context.Context, module, _ string, f linelog.Filter) (linelog.Result, error) {
	return linelog.Read(d.cfg.moduleLogPath(module), f)
}

// forgetModule deletes the output of a module no longer in the plan.
func (d *processDriver) forgetModule(module string) {
	d.mu.Lock()
	w := d.outputs[module]
	delete(d.outputs, module)
	d.mu.Unlock()
	if w != nil {
		w.Close()
	}
	if err := linelog.Remove(d.cfg.moduleLogPath(module)); err != nil {
		d.log.Warn("remove a removed module's output log", "module", module, "err", err)
	}
}

func (d *processDriver) Stop(ctx context.Context, h string, timeout time.Duration) error {
	d.mu.Lock()
	p, err := d.instance(h)
	if err != nil {
		d.mu.Unlock()
		return err
	}
	running, pid, done := p.running, p.pid, p.done
	d.mu.Unlock()
	if !running {
		return nil
	}
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
		return nil
	case <-t.C:
	case <-ctx.Done():
	}
	d.log.Warn("module did not exit after SIGTERM; killing it", "module", p.name, "pid", pid)
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	select {
	case <-done:
		return nil
	case <-time.After(5 * time.Second):
		return fmt.Errorf("process %d did not exit after SIGKILL", pid)
	}
}

func (d *processDriver) Remove(ctx context.Context, h string) error {
	if err := d.Stop(ctx, h, 0); err != nil && !errors.Is(err, errGone) {
		return err
	}
	d.mu.Lock()
	delete(d.procs, h)
	d.mu.Unlock()
	return nil
}

func (d *processDriver) Inspect(ctx context.Context, h string) (instanceState, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, err := d.instance(h)
	if err != nil {
		return instanceState{}, err
	}
	return instanceState{
		Running:    p.running || p.starting,
		ExitCode:   p.exitCode,
		StartedAt:  p.startedAt,
		FinishedAt: p.finishedAt,
		Error:      p.startErr,
	}, nil
}

func (d *processDriver) Owned(context.Context) ([]ownedInstance, error) { return nil, nil }

// Close kills whatever still runs (the agent stops its modules before) and
// retires the spawning thread.
func (d *processDriver) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	var pids []int
	for _, p := range d.procs {
		if p.running {
			pids = append(pids, p.pid)
		}
	}
	d.mu.Unlock()
	d.spawnMu.Lock()
	close(d.spawn)
	d.spawn = nil
	d.spawnMu.Unlock()
	for _, pid := range pids {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
	done := make(chan struct{})
	go func() { d.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		// A process that left its group (setsid) still holds an output
		// pipe: stop reading it.
		d.mu.Lock()
		for f := range d.pipes {
			f.Close()
		}
		d.mu.Unlock()
		<-done
	}
	d.mu.Lock()
	for _, w := range d.outputs {
		w.Close()
	}
	d.mu.Unlock()
	return nil
}

func (d *processDriver) recordPath(h string) string {
	return filepath.Join(d.runDir, h+".json")
}

func (d *processDriver) writeRecord(h string, rec pidRecord) {
	b, _ := json.Marshal(rec)
	if err := os.WriteFile(d.recordPath(h), b, 0o600); err != nil {
		d.log.Warn("write pid record", "module", rec.Module, "err", err)
	}
}

func (d *processDriver) removeRecord(h string) {
	if err := os.Remove(d.recordPath(h)); err != nil && !errors.Is(err, os.ErrNotExist) {
		d.log.Warn("remove pid record", "err", err)
	}
}

// cleanupLeftovers kills the process groups of an earlier agent run that
// are still alive (the agent was killed and grandchildren survived their
// leader), then forgets their records.
func (d *processDriver) cleanupLeftovers() {
	entries, err := os.ReadDir(d.runDir)
	if err != nil {
		return
	}
	boot := bootID()
	for _, e := range entries {
		path := filepath.Join(d.runDir, e.Name())
		b, err := os.ReadFile(path)
		var rec pidRecord
		if err == nil && json.Unmarshal(b, &rec) == nil && rec.PID > 0 && rec.BootID != "" && rec.BootID == boot {
			if n := killGroupSince(rec.PID, rec.StartTicks); n > 0 {
				d.log.Warn("killed processes left by an earlier agent run", "module", rec.Module, "pgid", rec.PID, "processes", n)
			}
		}
		_ = os.Remove(path)
	}
}

// checkPeer tells whether pid belongs to the running process module
// module: it must be in the module's process group (the module's own
// process or one it started). The workload API asks, so that one process
// module cannot have another's tokens signed.
func (d *processDriver) checkPeer(module string, pid int) error {
	d.mu.Lock()
	pgid := 0
	for _, p := range d.procs {
		if p.name == module && p.running {
			pgid = p.pid
		}
	}
	d.mu.Unlock()
	if pgid == 0 {
		return fmt.Errorf("module %q is not running", module)
	}
	if pid <= 0 {
		return errors.New("the calling process is unknown")
	}
	g, err := syscall.Getpgid(pid)
	if err != nil || g != pgid {
		return fmt.Errorf("process %d is not module %q's (its process group is %d)", pid, module, pgid)
	}
	return nil
}
