package cli

import (
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"appliance/api"
	"appliance/fleet"
)

func (a *app) deviceCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "device", Short: "Manage devices (identities and tags) and troubleshoot them through their agents"}
	cmd.AddCommand(a.deviceCreate(), a.deviceShow(), a.deviceList(), a.deviceUpdate(), a.deviceDelete(), a.deviceKeys(), a.deviceReset(),
		a.historyCommand("device", (*api.Client).DeviceHistory),
		a.deviceLogs(), a.deviceRestartModule(), a.devicePing(), a.deviceSupportBundle(),
		a.deviceImport(), a.deviceExport())
	return cmd
}

// parseTags builds a tag object from --tags JSON then --tag k=v pairs. A
// dotted key (--tag site.line=3) makes a nested object; values that parse
// as JSON numbers or booleans are stored as such.
func parseTags(tagsJSON string, pairs []string) (map[string]any, error) {
	tags := map[string]any{}
	if tagsJSON != "" {
		if err := json.Unmarshal([]byte(tagsJSON), &tags); err != nil {
			return nil, fmt.Errorf("flag --tags must be a JSON object: %v", err)
		}
	}
	for _, p := range pairs {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("flag --tag must be key=value; got %q", p)
		}
		setPath(tags, strings.Split(k, "."), scalar(v))
	}
	return tags, nil
}

func setPath(m map[string]any, path []string, v any) {
	for _, p := range path[:len(path)-1] {
		next, ok := m[p].(map[string]any)
		if !ok {
			next = map[string]any{}
			m[p] = next
		}
		m = next
	}
	m[path[len(path)-1]] = v
}

// scalar keeps a --tag value a string unless it is plainly a number or a
// boolean, so `--tag building=43` matches `tags.building=43`.
func scalar(s string) any {
	switch s {
	case "true":
		return true
	case "false":
		return false
	}
	var f float64
	if _, err := fmt.Sscan(s, &f); err == nil && fmt.Sprint(f) == s {
		return f
	}
	return s
}

func (a *app) deviceCreate() *cobra.Command {
	var tagPairs []string
	var tagsJSON, status string
	cmd := &cobra.Command{
		Use:   "create ID",
		Short: "Register a device; prints its two keys once",
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			tags, err := parseTags(tagsJSON, tagPairs)
			if err != nil {
				return err
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			d, err := c.PutDevice(cmd.Context(), args[0], api.DeviceRequest{Tags: tags, Status: status}, api.WriteOptions{IfNoneMatch: "*"})
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(d)
			}
			rows := [][]string{
				{"deviceId", d.ID},
				{"status", d.Status},
				{"tags", compactJSON(d.Tags)},
				{"etag", d.Etag},
			}
			if k := d.Authentication.SymmetricKey; k != nil {
				rows = append(rows, []string{"primaryKey", k.PrimaryKey}, []string{"secondaryKey", k.SecondaryKey})
			}
			a.keyValues(rows)
			fmt.Fprintln(a.stderr, "keep the keys now: they are stored only as hashes and are not shown again")
			return nil
		},
	}
	cmd.Flags().StringArrayVar(&tagPairs, "tag", nil, "tag as key=value (repeatable; dotted keys nest: site.line=3)")
	cmd.Flags().StringVar(&tagsJSON, "tags", "", "tags as a JSON object")
	cmd.Flags().StringVar(&status, "status", "", "enabled (default) or disabled")
	return cmd
}

func (a *app) deviceShow() *cobra.Command {
	var consistent bool
	cmd := &cobra.Command{
		Use:   "show ID",
		Short: "Show a device: tags, connection, the deployments that target it and why one applies, its last report",
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			d, err := c.Device(cmd.Context(), args[0], consistent)
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(d)
			}
			conn := d.ConnectionState
			if d.LastActivityTime != nil {
				conn += " (last activity " + d.LastActivityTime.Format("2006-01-02T15:04:05Z") + ")"
			}
			presence := orDash(d.Presence)
			if d.LastContactTime != nil {
				presence += " (last contact " + d.LastContactTime.Format("2006-01-02T15:04:05Z") + ")"
			}
			base, layers := "-", "-"
			if d.Document != nil {
				base = d.Document.Base
				if len(d.Document.Layers) > 0 {
					layers = strings.Join(d.Document.Layers, ", ") + " (merged in this order)"
				}
			}
			if d.Kept != nil {
				base = d.Kept.Note
			}
			a.keyValues([][]string{
				{"deviceId", d.ID},
				{"status", d.Status},
				{"tags", compactJSON(d.Tags)},
				{"connection", conn},
				{"presence", presence},
				{"health", orDash(d.Health)},
				{"applied", appliedOf(d.Configurations)},
				{"base", base},
				{"layers", layers},
				{"desired version", strconv.FormatUint(d.DesiredVersion, 10)},
				{"enrollment", orDash(d.Enrollment)},
				{"created", d.CreatedTimeUTC.Format("2006-01-02T15:04:05Z")},
				{"updated", d.LastUpdatedTimeUTC.Format("2006-01-02T15:04:05Z")},
				{"etag", d.Etag},
			})
			// Why one applies: the deployments that target the device, in
			// precedence order (priority, then the newest), bases first,
			// then the layers merged on the base.
			fmt.Fprintln(a.stdout)
			rows := [][]string{{"DEPLOYMENT", "STATUS", "PRIORITY", "CREATED", "KIND", "WHY"}}
			for _, e := range d.Precedence {
				kind := "base"
				if e.Layered {
					kind = "layer"
				}
				rows = append(rows, []string{e.Deployment, e.Status, strconv.FormatInt(e.Priority, 10), e.CreatedTimeUTC.Format("2006-01-02T15:04:05.000Z"), kind, e.Reason})
			}
			a.table(rows)
			if d.Document != nil {
				// Which deployment gave each module and route.
				fmt.Fprintln(a.stdout)
				parts := [][]string{{"MODULE / ROUTE", "FROM"}}
				for _, name := range sortedKeys(d.Document.Modules) {
					parts = append(parts, []string{"module " + name, strings.Join(d.Document.Modules[name], " < ")})
				}
				for _, name := range sortedKeys(d.Document.Routes) {
					parts = append(parts, []string{"route " + name, d.Document.Routes[name]})
				}
				a.table(parts)
				for _, ig := range d.Document.Ignored {
					fmt.Fprintln(a.stdout, "left out of the merge: "+ig)
				}
			}
			fmt.Fprintln(a.stdout)
			if d.Reported == nil {
				fmt.Fprintln(a.stdout, "no report yet")
				return nil
			}
			var rep fleet.ReportedDocument
			if err := json.Unmarshal(d.Reported.Document, &rep); err != nil {
				fmt.Fprintf(a.stdout, "last report (%s): %s\n", d.Reported.ReceivedTimeUTC.Format("2006-01-02T15:04:05Z"), d.Reported.Document)
				return nil
			}
			fmt.Fprintf(a.stdout, "last report %s: deployment %s, version %d, code %d %s\n",
				d.Reported.ReceivedTimeUTC.Format("2006-01-02T15:04:05Z"), orDash(rep.DeploymentID), rep.LastDesiredVersion,
				rep.LastDesiredStatus.Code, rep.LastDesiredStatus.Description)
			names := make([]string, 0, len(rep.Modules))
			for n := range rep.Modules {
				names = append(names, n)
			}
			sort.Strings(names)
			mods := [][]string{{"MODULE", "RUNTIME STATUS", "EXIT CODE", "RESTARTS", "DESCRIPTION"}}
			for _, n := range names {
				m := rep.Modules[n]
				mods = append(mods, []string{n, m.RuntimeStatus, strconv.Itoa(m.ExitCode), strconv.Itoa(m.RestartCount), m.StatusDescription})
			}
			a.table(mods)
			a.printHub(rep)
			return nil
		},
	}
	cmd.Flags().BoolVar(&consistent, "consistent", false, "read through the leader (never stale)")
	return cmd
}

func (a *app) deviceReset() *cobra.Command {
	var etag string
	cmd := &cobra.Command{
		Use:   "reset ID",
		Short: "Remove the modules of a device no deployment targets (it otherwise keeps what it last ran)",
		Long: `A device that no deployment targets any more keeps running what it last ran,
as in Azure. "device reset" sends it an empty document instead: it removes its
modules. Refused for a device a deployment applies to. A deployment that targets
the device later applies as usual.`,
		Args: exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			d, err := c.ResetDevice(cmd.Context(), args[0], api.WriteOptions{IfMatch: etag})
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(d)
			}
			fmt.Fprintf(a.stdout, "reset device %s: it is sent an empty document and removes its modules\n", d.ID)
			return nil
		},
	}
	cmd.Flags().StringVar(&etag, "etag", "", "only reset if the device's etag is still this")
	return cmd
}

// sortedKeys lists a map's keys, sorted.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func appliedOf(cfg map[string]api.ConfigurationStatus) string {
	for id, s := range cfg {
		if s.Status == api.StatusApplied {
			return id
		}
	}
	return "-"
}

func targetedOf(cfg map[string]api.ConfigurationStatus) string {
	ids := make([]string, 0, len(cfg))
	for id := range cfg {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	if len(ids) == 0 {
		return "-"
	}
	return strings.Join(ids, ", ")
}

func (a *app) deviceList() *cobra.Command {
	var condition string
	var limit int
	var consistent bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List devices, optionally those matching a target condition",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			var all []api.DeviceView
			q := api.DeviceQuery{Condition: condition, Limit: api.MaxPageSize, Consistent: consistent}
			for {
				if limit > 0 && limit-len(all) < q.Limit {
					q.Limit = limit - len(all)
				}
				p, err := c.Devices(cmd.Context(), q)
				if err != nil {
					return err
				}
				all = append(all, p.Items...)
				if p.Next == "" || (limit > 0 && len(all) >= limit) {
					break
				}
				q.After = p.Next
			}
			if a.output == "json" {
				return a.printJSON(all)
			}
			rows := [][]string{{"DEVICE", "STATUS", "APPLIED", "TAGS"}}
			for _, d := range all {
				rows = append(rows, []string{d.ID, d.Status, appliedOf(d.Configurations), compactJSON(d.Tags)})
			}
			a.table(rows)
			return nil
		},
	}
	cmd.Flags().StringVar(&condition, "condition", "", "only devices matching this target condition, e.g. \"tags.environment='prod'\"")
	cmd.Flags().IntVar(&limit, "limit", 0, "at most this many devices (default all)")
	cmd.Flags().BoolVar(&consistent, "consistent", false, "read through the leader (never stale)")
	return cmd
}

func (a *app) deviceUpdate() *cobra.Command {
	var tagPairs, removeTags []string
	var tagsJSON, status, etag string
	cmd := &cobra.Command{
		Use:   "update ID",
		Short: "Change a device's tags (merged) or status",
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			tags, err := parseTags(tagsJSON, tagPairs)
			if err != nil {
				return err
			}
			for _, k := range removeTags {
				setPath(tags, strings.Split(k, "."), nil)
			}
			if len(tags) == 0 && status == "" {
				return fmt.Errorf("nothing to update: give --tag, --tags, --remove-tag or --status")
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			d, err := c.PatchDevice(cmd.Context(), args[0], api.DevicePatch{Tags: tags, Status: status}, api.WriteOptions{IfMatch: etag})
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(d)
			}
			a.keyValues([][]string{{"deviceId", d.ID}, {"status", d.Status}, {"tags", compactJSON(d.Tags)}, {"etag", d.Etag}})
			return nil
		},
	}
	cmd.Flags().StringArrayVar(&tagPairs, "tag", nil, "set a tag, key=value (repeatable)")
	cmd.Flags().StringVar(&tagsJSON, "tags", "", "tags to merge, as a JSON object (null removes a tag)")
	cmd.Flags().StringArrayVar(&removeTags, "remove-tag", nil, "remove a tag (repeatable)")
	cmd.Flags().StringVar(&status, "status", "", "enabled or disabled")
	cmd.Flags().StringVar(&etag, "etag", "", "only update if the device's etag is still this")
	return cmd
}

func (a *app) deviceDelete() *cobra.Command {
	var etag string
	cmd := &cobra.Command{
		Use:   "delete ID",
		Short: "Delete a device",
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			if err := c.DeleteDevice(cmd.Context(), args[0], api.WriteOptions{IfMatch: etag}); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(map[string]string{"deleted": args[0]})
			}
			fmt.Fprintf(a.stdout, "deleted device %s\n", args[0])
			return nil
		},
	}
	cmd.Flags().StringVar(&etag, "etag", "", "only delete if the device's etag is still this")
	return cmd
}
