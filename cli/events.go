package cli

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"appliance/api"
	"appliance/fleet"
)

func (a *app) eventsCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "events", Short: "The devices' upstream messages (what their hubs route INTO $upstream)"}
	cmd.AddCommand(a.eventsTail())
	return cmd
}

// errStop ends a tail after --count messages.
var errStop = fmt.Errorf("enough")

func (a *app) eventsTail() *cobra.Command {
	var f api.EventFilter
	var count int
	cmd := &cobra.Command{
		Use:   "tail",
		Short: "Show the upstream messages every node of the cluster receives from now on, as they come (Ctrl-C ends it)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if f.Device != "" {
				if err := fleet.ValidateDeviceID(f.Device); err != nil {
					return fmt.Errorf("flag --device: %v", err)
				}
			}
			if count < 0 {
				return fmt.Errorf("flag --count: %d is negative", count)
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			if a.output == "table" {
				fmt.Fprintf(a.stdout, "%-24s  %-8s  %-20s  %-16s  %-10s  %8s  %s\n", "RECEIVED", "NODE", "DEVICE", "MODULE", "OUTPUT", "SEQ", "BODY")
			}
			seen := 0
			err = c.TailEvents(cmd.Context(), f, func(ev api.EventView) error {
				if a.output == "json" {
					if err := a.printJSONLine(ev); err != nil {
						return err
					}
				} else {
					body := ev.Body
					if ev.BodyEncoding != "" {
						body = ev.BodyEncoding + ":" + body
					}
					fmt.Fprintf(a.stdout, "%-24s  %-8s  %-20s  %-16s  %-10s  %8s  %s\n", ev.ReceivedTimeUTC.Format("2006-01-02T15:04:05.000Z"),
						ev.Node, ev.DeviceID, ev.ModuleID, orDash(ev.OutputName), strconv.FormatUint(ev.SequenceNumber, 10), oneLineBody(body, 100))
				}
				seen++
				if count > 0 && seen >= count {
					return errStop
				}
				return nil
			})
			if err == errStop {
				return nil
			}
			return err
		},
	}
	cmd.Flags().StringVar(&f.Device, "device", "", "only this device's messages")
	cmd.Flags().StringVar(&f.Module, "module", "", "only this module's messages")
	cmd.Flags().IntVar(&count, "count", 0, "stop after this many messages (0: until Ctrl-C)")
	return cmd
}

// oneLineBody shows a body on one line, cut at n characters.
func oneLineBody(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if r := []rune(s); len(r) > n {
		return string(r[:n]) + "..."
	}
	return s
}
