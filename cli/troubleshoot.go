package cli

import (
	"archive/zip"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"appliance/api"
	"appliance/fleet"
)

// Remote troubleshooting through the device's agent: thin commands over
// the agent's direct methods (api/troubleshoot.go), which reach the device
// over its session with the cluster, never through raft.

// followInterval is how often `device logs --follow` asks for new lines.
const followInterval = time.Second

// troubleshootError turns a method call's failure into one line that
// says what happened: a device that is not connected (404) or did not
// answer (504), or the agent's own refusal.
func troubleshootError(err error) error {
	var ae *api.Error
	if errors.As(err, &ae) && (ae.StatusCode == http.StatusNotFound && ae.Code == "not_connected" || ae.StatusCode == http.StatusGatewayTimeout) {
		return fmt.Errorf("%s (status %d)", ae.Message, ae.StatusCode)
	}
	return err
}

func (a *app) deviceLogs() *cobra.Command {
	var since, until string
	var tail int
	var follow, timestamps bool
	cmd := &cobra.Command{
		Use:   "logs DEVICE MODULE",
		Short: "Print a module's recent output (edgeAgent: the agent's own log), read from the device through its agent; --follow prints new lines as they come",
		Long: `logs asks the device's agent for a module's output (GetModuleLogs), over the
device's connection to the cluster: the lines a process module wrote on stdout
and stderr, kept by the agent in bounded, rotated files on the device, or a
docker module's container logs; MODULE edgeAgent is the agent's own log. The
deployment's secrets and anything that looks secret are shown as <redacted>.
One answer holds at most 127 KB: without --tail or --since the newest lines that
fit are printed (and a note says older ones were left out).

--follow then asks every second for the lines written since the last one
printed (direct methods cannot stream; this is polling with a time cursor),
until Ctrl-C.`,
		Args: exactArgs(2, "DEVICE", "MODULE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			device, module := args[0], args[1]
			now := time.Now()
			if _, err := fleet.ParseLogTime(since, now); err != nil {
				return fmt.Errorf("flag --since: %w", err)
			}
			if _, err := fleet.ParseLogTime(until, now); err != nil {
				return fmt.Errorf("flag --until: %w", err)
			}
			if tail < 0 {
				return fmt.Errorf("flag --tail must not be negative; got %d", tail)
			}
			if follow && until != "" {
				return errors.New("flags --follow and --until do not go together")
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			f := fleet.ModuleLogFilter{Since: since, Until: until}
			if tail > 0 {
				f.Tail = &tail
			}
			lines, truncated, err := c.ModuleLogs(ctx, device, module, f)
			if err != nil {
				return troubleshootError(err)
			}
			if truncated {
				if f.Tail == nil && since != "" {
					fmt.Fprintln(a.stderr, "(more lines since then than one answer holds: the oldest are printed; narrow with --until or --tail)")
				} else {
					fmt.Fprintln(a.stderr, "(older lines left out: one answer holds at most 127 KB; narrow with --since or --tail)")
				}
			}
			var cur logCursor
			if err := a.printLogLines(lines, &cur, timestamps); err != nil {
				return err
			}
			if !follow {
				return nil
			}
			return a.followLogs(ctx, c, device, module, since, &cur, timestamps)
		},
	}
	f := cmd.Flags()
	f.StringVar(&since, "since", "", "only lines since this: a duration back (10m, 1h, 1d), an RFC 3339 time or a Unix time")
	f.StringVar(&until, "until", "", "only lines before this (same forms as --since)")
	f.IntVar(&tail, "tail", 0, "only the last N lines (of those since --since); 0: as many as one answer holds")
	f.BoolVarP(&follow, "follow", "f", false, "keep printing new lines (every second) until Ctrl-C")
	f.BoolVar(&timestamps, "timestamps", false, "prefix each line with its time and stream (stdout, stderr; agent for edgeAgent)")
	return cmd
}

// logCursor is where a follow reads on from: the time of the last line
// printed, and how many printed lines had that very time (the agent's
// since is inclusive: those come again and are skipped).
type logCursor struct {
	at   time.Time
	seen int
}

func (a *app) printLogLines(lines []fleet.ModuleLogMessage, cur *logCursor, timestamps bool) error {
	skip := 0
	for _, l := range lines {
		if !cur.at.IsZero() && l.Timestamp.Equal(cur.at) && skip < cur.seen {
			skip++
			continue
		}
		var err error
		switch {
		case a.output == "json":
			err = a.printJSONLine(l)
		case timestamps:
			_, err = fmt.Fprintf(a.stdout, "%s %s %s\n", l.Timestamp.UTC().Format(time.RFC3339Nano), l.Stream, l.Text)
		default:
			_, err = fmt.Fprintln(a.stdout, l.Text)
		}
		if err != nil {
			return err
		}
		if l.Timestamp.Equal(cur.at) {
			cur.seen++
		} else if l.Timestamp.After(cur.at) {
			cur.at, cur.seen = l.Timestamp, 1
		}
	}
	return nil
}

// followLogs polls for the lines after the cursor until ctx ends. A device
// that drops off (404 not connected, 504) is waited for, said once on
// stderr; anything else ends it.
func (a *app) followLogs(ctx context.Context, c *api.Client, device, module, since string, cur *logCursor, timestamps bool) error {
	waiting := false
	for {
		f := fleet.ModuleLogFilter{Since: since}
		if !cur.at.IsZero() {
			f.Since = cur.at.UTC().Format(time.RFC3339Nano)
		}
		lines, truncated, err := c.ModuleLogs(ctx, device, module, f)
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil && isUnreachable(err):
			if !waiting {
				fmt.Fprintf(a.stderr, "(%v; waiting for the device)\n", troubleshootError(err))
				waiting = true
			}
		case err != nil:
			return troubleshootError(err)
		default:
			if waiting {
				fmt.Fprintln(a.stderr, "(the device answers again)")
				waiting = false
			}
			if err := a.printLogLines(lines, cur, timestamps); err != nil {
				return err
			}
			if truncated {
				continue // more waiting already: no pause
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(followInterval):
		}
	}
}

// isUnreachable: the device is not connected now, or did not answer.
func isUnreachable(err error) bool {
	var ae *api.Error
	return errors.As(err, &ae) && (ae.Code == "not_connected" || ae.StatusCode == http.StatusGatewayTimeout || ae.StatusCode == http.StatusServiceUnavailable)
}

func (a *app) deviceRestartModule() *cobra.Command {
	return &cobra.Command{
		Use:   "restart-module DEVICE MODULE",
		Short: "Restart one of a device's modules through its agent (a new process or container start; recorded in the device's history)",
		Args:  exactArgs(2, "DEVICE", "MODULE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			if err := c.RestartModule(cmd.Context(), args[0], args[1]); err != nil {
				return troubleshootError(err)
			}
			if a.output == "json" {
				return a.printJSON(map[string]any{"device": args[0], "module": args[1], "restarted": true})
			}
			fmt.Fprintf(a.stdout, "module %s of device %s restarted\n", args[1], args[0])
			return nil
		},
	}
}

func (a *app) devicePing() *cobra.Command {
	return &cobra.Command{
		Use:   "ping DEVICE",
		Short: "Check that a device's agent answers over its connection (fails at once, 404, when the device is not connected)",
		Args:  exactArgs(1, "DEVICE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			d, err := c.PingDevice(cmd.Context(), args[0])
			if err != nil {
				return troubleshootError(err)
			}
			if a.output == "json" {
				return a.printJSON(map[string]any{"device": args[0], "answered": true, "roundTripMs": d.Milliseconds()})
			}
			fmt.Fprintf(a.stdout, "device %s answered in %s\n", args[0], d.Round(time.Millisecond))
			return nil
		},
	}
}

func (a *app) deviceSupportBundle() *cobra.Command {
	var out, since string
	cmd := &cobra.Command{
		Use:   "support-bundle DEVICE --out FILE",
		Short: "Fetch a support bundle from a device's agent: a zip of its log, its modules' logs, its last report and desired document, secrets redacted",
		Long: `support-bundle has the device's agent make a zip (device.json, reported.json,
desired.json, logs/edgeAgent.log, logs/<module>.log) and fetches it in chunks
over the device's connection, checking its digest. Every secret of the running
deployment, and anything that looks secret, is replaced by <redacted> on the
device before it leaves. The file is written with mode 0600.`,
		Args: exactArgs(1, "DEVICE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return errors.New("flag --out is required: the file to write the bundle to (a .zip)")
			}
			if _, err := fleet.ParseLogTime(since, time.Now()); err != nil {
				return fmt.Errorf("flag --since: %w", err)
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			tmp := out + ".part"
			f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
			if err != nil {
				return fmt.Errorf("flag --out: %w", err)
			}
			last := time.Now()
			size, sum, err := c.SupportBundle(cmd.Context(), args[0], since, f, func(done, total int64) {
				if done == total || time.Since(last) > 2*time.Second {
					last = time.Now()
					fmt.Fprintf(a.stderr, "support bundle of %s: %d of %d KiB\n", args[0], done>>10, (total+1023)>>10)
				}
			})
			if err == nil {
				err = f.Sync()
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err == nil {
				err = checkZip(tmp)
			}
			if err != nil {
				os.Remove(tmp)
				return troubleshootError(err)
			}
			if err := os.Rename(tmp, out); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(map[string]any{"device": args[0], "file": out, "bytes": size, "sha256": sum})
			}
			fmt.Fprintf(a.stdout, "wrote %s: %d bytes, sha256 %s\n", out, size, sum)
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "file to write (a zip, mode 0600)")
	cmd.Flags().StringVar(&since, "since", "", "only log lines since this (10m, 1d, an RFC 3339 or Unix time); default: all the device keeps")
	return cmd
}

// checkZip opens a received bundle as a zip.
func checkZip(path string) error {
	zr, err := zip.OpenReader(path)
	if err != nil {
		return fmt.Errorf("the support bundle received is not a zip: %w", err)
	}
	names := make([]string, 0, len(zr.File))
	for _, f := range zr.File {
		names = append(names, f.Name)
	}
	zr.Close()
	if !strings.Contains(strings.Join(names, " "), "device.json") {
		return fmt.Errorf("the support bundle received lacks device.json (it holds %s)", strings.Join(names, ", "))
	}
	return nil
}
