package cli

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"appliance/api"
)

func (a *app) deploymentStatus() *cobra.Command {
	var (
		soak, interval time.Duration
		watch          bool
		category       string
		consistent     bool
	)
	cmd := &cobra.Command{
		Use:   "status ID",
		Short: "Where a deployment stands: targeted, applied, healthy, unhealthy, unknown",
		Long: `Shows a deployment's devices by category. Healthy means what an operator means:
the agent applied the deployment (code 200) and every module that should run has
been running for the soak time (--soak, default 30s). Azure's plain code-200
count is shown too, as reportedSuccessfulCount. With --watch a progress bar
follows the rollout until Ctrl-C.`,
		Args: exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			q := api.StatusQuery{Soak: soak, Category: category, Consistent: consistent}
			for {
				st, err := c.DeploymentStatus(cmd.Context(), args[0], q)
				if err != nil {
					if watch && cmd.Context().Err() != nil {
						return nil
					}
					return err
				}
				switch {
				case watch && a.output == "json":
					if err := a.printJSONLine(st); err != nil {
						return err
					}
				case watch:
					fmt.Fprintln(a.stdout, progressLine(st, 30))
				case a.output == "json":
					return a.printJSON(st)
				default:
					a.printStatus(st)
					return nil
				}
				select {
				case <-cmd.Context().Done():
					return nil
				case <-time.After(interval):
				}
			}
		},
	}
	f := cmd.Flags()
	f.DurationVar(&soak, "soak", 0, "how long modules must have run to count as healthy (default 30s)")
	f.BoolVar(&watch, "watch", false, "follow the rollout live with a progress bar, until Ctrl-C")
	f.DurationVar(&interval, "interval", time.Second, "with --watch: how often to refresh")
	f.StringVar(&category, "category", "", "list only this category's devices: "+strings.Join(api.Categories, ", "))
	f.BoolVar(&consistent, "consistent", false, "read through the leader (never stale)")
	return cmd
}

func (a *app) printStatus(st api.DeploymentStatus) {
	c := st.Counts
	rows := [][]string{{"CATEGORY", "DEVICES", "EXAMPLES"}}
	for _, cat := range api.Categories {
		n := map[string]int{
			api.CategoryTargeted: c.Targeted, api.CategoryApplied: c.Applied, api.CategoryHealthy: c.Healthy,
			api.CategoryUnhealthy: c.Unhealthy, api.CategorySoaking: c.Soaking, api.CategoryUnknown: c.Unknown,
			api.CategoryOffline: c.Offline, api.CategoryKept: c.Kept,
		}[cat]
		ids := st.Devices[cat]
		ex := strings.Join(ids[:min(len(ids), 5)], ", ")
		if n > len(ids[:min(len(ids), 5)]) {
			ex += ", ..."
		}
		rows = append(rows, []string{cat, strconv.Itoa(n), ex})
	}
	a.table(rows)
	// Why devices are where they are, when it is not obvious.
	for _, cat := range api.Categories {
		reasons := st.Reasons[cat]
		for _, why := range sortedKeys(reasons) {
			fmt.Fprintf(a.stdout, "%s: %d %s: %s\n", cat, reasons[why], plural(reasons[why], "device", "devices"), why)
		}
	}
	if st.Layered {
		fmt.Fprintln(a.stdout, "layered: its devices are those it is merged on; its own modules decide their health")
	}
	fmt.Fprintf(a.stdout, "\nAzure metrics: targetedCount=%d appliedCount=%d reportedSuccessfulCount=%d reportedFailedCount=%d (soak %gs)\n",
		st.SystemMetrics["targetedCount"], st.SystemMetrics["appliedCount"],
		st.SystemMetrics["reportedSuccessfulCount"], st.SystemMetrics["reportedFailedCount"], st.SoakSeconds)
	if len(st.Metrics) > 0 {
		names := make([]string, 0, len(st.Metrics))
		for n := range st.Metrics {
			names = append(names, n)
		}
		sort.Strings(names)
		parts := make([]string, len(names))
		for i, n := range names {
			parts[i] = fmt.Sprintf("%s=%d", n, st.Metrics[n])
		}
		fmt.Fprintf(a.stdout, "Custom metrics: %s\n", strings.Join(parts, " "))
	}
	fmt.Fprintln(a.stdout, progressLine(st, 30))
}

// progressLine draws the applied devices as a bar: healthy (#), soaking
// (+), unhealthy (!), unknown (.).
func progressLine(st api.DeploymentStatus, width int) string {
	c := st.Counts
	bar := strings.Repeat(".", width)
	if c.Applied > 0 {
		cells := func(n int) int { return n * width / c.Applied }
		h, s, u := cells(c.Healthy), cells(c.Soaking), cells(c.Unhealthy)
		bar = strings.Repeat("#", h) + strings.Repeat("+", s) + strings.Repeat("!", u)
		bar += strings.Repeat(".", max(0, width-len(bar)))
	}
	extra := ""
	if c.Offline > 0 {
		extra += fmt.Sprintf(", %d offline", c.Offline)
	}
	if c.Kept > 0 {
		extra += fmt.Sprintf(", %d kept", c.Kept)
	}
	return fmt.Sprintf("%s [%s] %d/%d healthy, %d soaking, %d unhealthy, %d unknown (targeted %d%s)",
		time.Now().Format("15:04:05"), bar, c.Healthy, c.Applied, c.Soaking, c.Unhealthy, c.Unknown, c.Targeted, extra)
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
