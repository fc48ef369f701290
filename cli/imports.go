package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"appliance/api"
)

func (a *app) deviceImport() *cobra.Command {
	var mode string
	var dryRun, atomic bool
	cmd := &cobra.Command{
		Use:   "import FILE",
		Short: "Create, update or delete many devices from a device-identity export file (Azure's format), keeping their keys",
		Long: `Reads a file in the format "az iot hub device-identity export" writes (one JSON
object per line: id, status, authentication.symmetricKey.primaryKey and
secondaryKey, tags; everything else is ignored) and imports it in large raft
entries. Devices keep their keys: only the keys' hashes are stored, so devices
connect with the keys they had. A bad line is reported with its number and the
rest goes on; with --atomic any bad line refuses the whole import and nothing
is stored. An interrupted import is resumed by running it again with
--mode upsert: devices already imported are left as they are (their etags
too). FILE "-" reads standard input.`,
		Args: exactArgs(1, "FILE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if mode != "create" && mode != "upsert" && mode != "delete" {
				return fmt.Errorf("flag --mode must be create, upsert or delete; got %q", mode)
			}
			in, size, err := openImportFile(args[0])
			if err != nil {
				return err
			}
			defer in.Close()
			c, err := a.client()
			if err != nil {
				return err
			}
			prog := newProgress(a.stderr, "import "+args[0], size)
			sum, err := c.ImportDevices(cmd.Context(), prog.reader(in), api.ImportOptions{Mode: mode, DryRun: dryRun, Atomic: atomic})
			prog.done()
			var refused *api.ImportRefusedError
			if err != nil && !errors.As(err, &refused) {
				return err
			}
			if a.output == "json" {
				if perr := a.printJSON(sum); perr != nil {
					return perr
				}
			} else {
				a.importTable(sum)
			}
			if err != nil {
				return err
			}
			if sum.Failed > 0 {
				return fmt.Errorf("%d of %d lines were not imported (listed above with their line numbers); fix them and import the file again with --mode upsert", sum.Failed, sum.Lines)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&mode, "mode", "create", "create (a device that exists is a failed line), upsert (create or replace status, tags and keys) or delete")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "change nothing: check every line and say what would happen")
	cmd.Flags().BoolVar(&atomic, "atomic", false, "all or nothing: any failed line refuses the whole import")
	return cmd
}

// importTable prints an import's summary and its failed lines.
func (a *app) importTable(sum api.ImportSummary) {
	what := "import"
	if sum.DryRun {
		what = "dry run (nothing changed)"
	}
	a.table([][]string{
		{"MODE", "LINES", "CREATED", "UPDATED", "UNCHANGED", "DELETED", "FAILED"},
		{sum.Mode, strconv.Itoa(sum.Lines), strconv.Itoa(sum.Created), strconv.Itoa(sum.Updated), strconv.Itoa(sum.Unchanged), strconv.Itoa(sum.Deleted), strconv.Itoa(sum.Failed)},
	})
	if len(sum.Errors) > 0 {
		fmt.Fprintln(a.stdout)
		rows := [][]string{{"LINE", "DEVICE", "ERROR"}}
		for _, e := range sum.Errors {
			msg := e.Message
			if e.Field != "" {
				msg = e.Field + ": " + msg
			}
			rows = append(rows, []string{strconv.Itoa(e.Line), orDash(e.DeviceID), msg})
		}
		a.table(rows)
		if sum.ErrorsOmitted > 0 {
			fmt.Fprintf(a.stdout, "... and %d more failed lines (-o json lists the first %d)\n", sum.ErrorsOmitted, api.MaxImportErrors)
		}
	}
	if sum.Mode != "delete" {
		fmt.Fprintf(a.stderr, "%s: devices keep the keys the file gave them (only the keys' hashes are stored)", what)
		if sum.WithoutKeys > 0 {
			fmt.Fprintf(a.stderr, "; %d devices had no keys in the file and cannot connect until given keys (device keys regenerate ID --key primary)", sum.WithoutKeys)
		}
		fmt.Fprintln(a.stderr)
	}
}

func openImportFile(name string) (io.ReadCloser, int64, error) {
	if name == "-" {
		return io.NopCloser(os.Stdin), 0, nil
	}
	f, err := os.Open(name)
	if err != nil {
		return nil, 0, fmt.Errorf("import file: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("import file %s: %w", name, err)
	}
	return f, st.Size(), nil
}

func (a *app) deviceExport() *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:   "export --out FILE",
		Short: "Write every device identity to a file in Azure's device-identity export format, without keys",
		Long: `Writes every device (id, eTag, status, tags) in the format "az iot hub
device-identity export" writes, one JSON object per line. The file holds no
keys: they are stored only as hashes and cannot be exported (each line's
symmetricKey keys are null). Importing the file elsewhere gives the same ids,
statuses and tags; those devices get no keys until "device keys regenerate".`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return fmt.Errorf("flag --out is required: the file to write")
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".*")
			if err != nil {
				return fmt.Errorf("flag --out: %w", err)
			}
			defer os.Remove(tmp.Name()) // after the rename, a no-op
			prog := newProgress(a.stderr, "export", 0)
			n, err := c.ExportDevices(cmd.Context(), prog.writer(tmp))
			prog.done()
			if err == nil {
				err = tmp.Sync()
			}
			if cerr := tmp.Close(); err == nil {
				err = cerr
			}
			if err == nil {
				err = os.Rename(tmp.Name(), out)
			}
			if err != nil {
				return fmt.Errorf("export to %s: %w", out, err)
			}
			if a.output == "json" {
				return a.printJSON(map[string]any{"file": out, "devices": n, "keys": false})
			}
			fmt.Fprintf(a.stdout, "exported %d devices to %s\n", n, out)
			fmt.Fprintln(a.stderr, "the file holds no keys: they are stored only as hashes, so an export never holds them; devices imported from it get no keys until given new ones (device keys regenerate)")
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "the file to write (replaced whole once the export is complete)")
	return cmd
}

// progress shows how far a long transfer is: a bar redrawn in place on a
// terminal, otherwise a line every few seconds.
type progress struct {
	out      io.Writer
	what     string
	total    int64 // 0: unknown
	terminal bool

	mu    sync.Mutex
	n     int64
	last  time.Time
	start time.Time
}

func newProgress(out io.Writer, what string, total int64) *progress {
	p := &progress{out: out, what: what, total: total, start: time.Now()}
	if f, ok := out.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			p.terminal = true
		}
	}
	return p
}

func (p *progress) add(n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.n += int64(n)
	every := 5 * time.Second
	if p.terminal {
		every = 200 * time.Millisecond
	}
	if time.Since(p.last) < every {
		return
	}
	p.last = time.Now()
	p.drawLocked()
}

func (p *progress) drawLocked() {
	mb := float64(p.n) / (1 << 20)
	rate := mb / max(time.Since(p.start).Seconds(), 0.001)
	if !p.terminal {
		if p.total > 0 {
			fmt.Fprintf(p.out, "%s: %d%% (%.1f of %.1f MB, %.1f MB/s)\n", p.what, p.n*100/p.total, mb, float64(p.total)/(1<<20), rate)
		} else {
			fmt.Fprintf(p.out, "%s: %.1f MB (%.1f MB/s)\n", p.what, mb, rate)
		}
		return
	}
	if p.total <= 0 {
		fmt.Fprintf(p.out, "\r%s: %.1f MB (%.1f MB/s)   ", p.what, mb, rate)
		return
	}
	const width = 30
	done := int(p.n * width / p.total)
	fmt.Fprintf(p.out, "\r%s [%s%s] %3d%% %.1f/%.1f MB   ", p.what, strings.Repeat("#", done), strings.Repeat(" ", width-min(done, width)),
		p.n*100/p.total, mb, float64(p.total)/(1<<20))
}

// done draws the last state: the bar's end (and its line), or a last
// progress line.
func (p *progress) done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.n == 0 {
		return
	}
	p.drawLocked()
	if p.terminal {
		fmt.Fprintln(p.out)
	}
}

func (p *progress) reader(r io.Reader) io.Reader { return &progressReader{r: r, p: p} }
func (p *progress) writer(w io.Writer) io.Writer { return &progressWriterTo{w: w, p: p} }

type progressReader struct {
	r io.Reader
	p *progress
}

func (r *progressReader) Read(b []byte) (int, error) {
	n, err := r.r.Read(b)
	r.p.add(n)
	return n, err
}

type progressWriterTo struct {
	w io.Writer
	p *progress
}

func (w *progressWriterTo) Write(b []byte) (int, error) {
	n, err := w.w.Write(b)
	w.p.add(n)
	return n, err
}
