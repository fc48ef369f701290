package cli

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"sort"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"appliance/api"
	"appliance/fleet"
)

func (a *app) moduleCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "module", Short: "A device's modules: their twins, and direct methods"}
	cmd.AddCommand(a.moduleShow(), a.moduleInvoke())
	return cmd
}

func (a *app) moduleShow() *cobra.Command {
	var consistent bool
	cmd := &cobra.Command{
		Use:   "show DEVICE MODULE",
		Short: "Show a module: its status, its connection to the device hub, its twin's desired (secrets redacted) and reported properties",
		Args:  exactArgs(2, "DEVICE", "MODULE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			m, err := c.Module(cmd.Context(), args[0], args[1], consistent)
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(m)
			}
			runtime := "-"
			if m.Runtime != nil {
				runtime = m.Runtime.RuntimeStatus
				if m.Runtime.StatusDescription != "" {
					runtime += " (" + m.Runtime.StatusDescription + ")"
				}
			}
			reported := "-"
			if m.ReportedTimeUTC != nil {
				reported = m.ReportedTimeUTC.Format("2006-01-02T15:04:05Z")
			}
			a.keyValues([][]string{
				{"device", m.DeviceID},
				{"module", m.ModuleID},
				{"deployment", orDash(m.Deployment)},
				{"runtime", runtime},
				{"hub connection", m.ConnectionState},
				{"desired properties", compactRaw(m.Properties.Desired)},
				{"reported properties", compactRaw(m.Properties.Reported)},
				{"last report", reported},
			})
			return nil
		},
	}
	cmd.Flags().BoolVar(&consistent, "consistent", false, "read through the leader (never stale)")
	return cmd
}

func (a *app) moduleInvoke() *cobra.Command {
	var payload, payloadFile string
	var timeout, connectTimeout time.Duration
	cmd := &cobra.Command{
		Use:   "invoke DEVICE MODULE METHOD",
		Short: "Call a module's direct method and print its status and payload (404: the device or module is not connected; 504: no answer in time)",
		Args:  exactArgs(3, "DEVICE", "MODULE", "METHOD"),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := api.MethodRequest{}
			if payloadFile != "" {
				if payload != "" {
					return errors.New("give --payload or --payload-file, not both")
				}
				b, err := os.ReadFile(payloadFile)
				if err != nil {
					return fmt.Errorf("flag --payload-file: %w", err)
				}
				payload = string(b)
			}
			if payload != "" {
				if !json.Valid([]byte(payload)) {
					return fmt.Errorf("flag --payload must be JSON (a string needs its quotes: '\"text\"'); got %q", payload)
				}
				req.Payload = json.RawMessage(payload)
			}
			if timeout%time.Second != 0 || connectTimeout%time.Second != 0 {
				return errors.New("flags --timeout and --connect-timeout are whole seconds (e.g. 30s, 2m)")
			}
			req.ResponseTimeoutSeconds = int(timeout / time.Second)
			req.ConnectTimeoutSeconds = int(connectTimeout / time.Second)
			if err := req.Validate(); err != nil {
				return fmt.Errorf("flag --timeout or --connect-timeout: %w", err)
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			res, err := c.InvokeMethod(cmd.Context(), args[0], args[1], args[2], req)
			if err != nil {
				var ae *api.Error
				if errors.As(err, &ae) && (ae.StatusCode == http.StatusNotFound || ae.StatusCode == http.StatusGatewayTimeout) {
					return fmt.Errorf("%s (status %d)", ae.Message, ae.StatusCode)
				}
				return err
			}
			if a.output == "json" {
				return a.printJSON(res)
			}
			body := "(none)"
			if len(res.Payload) > 0 {
				body = compactRaw(res.Payload)
			}
			a.keyValues([][]string{{"status", strconv.Itoa(res.Status)}, {"payload", body}})
			return nil
		},
	}
	cmd.Flags().StringVar(&payload, "payload", "", "the method's payload, a JSON value (e.g. '{\"x\":1}')")
	cmd.Flags().StringVar(&payloadFile, "payload-file", "", "read the payload from this file")
	cmd.Flags().DurationVar(&timeout, "timeout", api.DefaultMethodTimeout, "how long the module has to answer (5s to 5m)")
	cmd.Flags().DurationVar(&connectTimeout, "connect-timeout", 0, "how long the device hub waits for the module to be connected (0 to 5m; 0: it must be connected now)")
	return cmd
}

// printHub prints the device hub's state and the modules' reported
// properties from a device's report, when it has a hub.
func (a *app) printHub(rep fleet.ReportedDocument) {
	if rep.Hub != nil {
		h := rep.Hub
		connected := 0
		for _, c := range h.Clients {
			if c.Status == "connected" {
				connected++
			}
		}
		fmt.Fprintf(a.stdout, "\ndevice hub: %s, %d routes, %d of %d modules connected; messages queued %d (%d bytes), expired %d, dropped %d\n",
			h.Status, h.Routes, connected, len(h.Clients), h.Queued, h.QueuedBytes, h.Expired, h.Dropped)
		if h.Description != "" {
			fmt.Fprintln(a.stdout, "  "+h.Description)
		}
	}
	if len(rep.ModuleTwins) == 0 {
		return
	}
	names := make([]string, 0, len(rep.ModuleTwins))
	for n := range rep.ModuleTwins {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintln(a.stdout)
	rows := [][]string{{"MODULE", "REPORTED PROPERTIES"}}
	for _, n := range names {
		rows = append(rows, []string{n, oneLineBody(compactRaw(rep.ModuleTwins[n]), 200)})
	}
	a.table(rows)
}

// compactRaw is a JSON value on one line, as written without spaces (the
// API indents what it sends).
func compactRaw(v json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, v) != nil {
		return string(v)
	}
	return b.String()
}
