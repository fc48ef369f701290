package cli

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"appliance/api"
	"appliance/fleet"
)

func (a *app) deploymentCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "deployment", Short: "Manage automatic deployments"}
	cmd.AddCommand(a.deploymentCreate(), a.deploymentShow(), a.deploymentList(), a.deploymentUpdate(), a.deploymentDelete(), a.deploymentStatus(),
		a.historyCommand("deployment", (*api.Client).DeploymentHistory), a.rolloutCommand())
	return cmd
}

func parsePairs(flag string, pairs []string) (map[string]string, error) {
	if len(pairs) == 0 {
		return nil, nil
	}
	out := map[string]string{}
	for _, p := range pairs {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("flag --%s must be key=value; got %q", flag, p)
		}
		out[k] = v
	}
	return out, nil
}

// loadContent reads a deployment manifest the way Azure users keep them:
// a plain {"modulesContent": ...} file, a whole configuration object, or an
// iotedgedev template whose ${VAR} placeholders come from --env-file and
// then the environment, and whose createOptions may be objects.
func (a *app) loadContent(path, envFile string) (json.RawMessage, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("flag --content: %w", err)
	}
	vars := map[string]string{}
	if envFile != "" {
		envData, err := os.ReadFile(envFile)
		if err != nil {
			return nil, fmt.Errorf("flag --env-file: %w", err)
		}
		vars, err = fleet.ParseEnvFile(envData)
		if err != nil {
			return nil, fmt.Errorf("env file %s: %w", envFile, err)
		}
	}
	expanded, err := fleet.ExpandTemplate(data, func(name string) (string, bool) {
		if v, ok := vars[name]; ok {
			return v, true
		}
		return os.LookupEnv(name)
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	content, err := fleet.ParseContentFile(expanded)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	content, err = fleet.NormalizeCreateOptions(content)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return content, nil
}

func (a *app) deploymentCreate() *cobra.Command {
	var (
		contentFile, envFile, condition string
		priority                        int64
		labels, metrics                 []string
		layered, dryRun                 bool
		rollout                         rolloutFlags
	)
	cmd := &cobra.Command{
		Use:   "create ID",
		Short: "Create a deployment from a manifest (Azure IoT Edge format)",
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if contentFile == "" {
				return fmt.Errorf("flag --content is required: the deployment manifest file")
			}
			lbls, err := parsePairs("label", labels)
			if err != nil {
				return err
			}
			mets, err := parsePairs("metric", metrics)
			if err != nil {
				return err
			}
			policy, err := rollout.policy(cmd)
			if err != nil {
				return err
			}
			content, err := a.loadContent(contentFile, envFile)
			if err != nil {
				return err
			}
			req := api.DeploymentRequest{
				Labels: lbls, Content: content, TargetCondition: condition, Priority: priority,
				Metrics: fleet.Metrics{Queries: mets}, Layered: layered, Rollout: policy,
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			if dryRun {
				r, err := c.DryRunDeployment(cmd.Context(), args[0], req)
				if err != nil {
					return err
				}
				if a.output == "json" {
					return a.printJSON(r)
				}
				a.keyValues([][]string{
					{"would target", devices(r.TargetedCount)},
					{"would apply to", devices(r.WouldApplyCount)},
				})
				if len(r.Waves) > 0 {
					fmt.Fprintln(a.stdout)
					a.printWaves(r.Waves, false)
				}
				return nil
			}
			if strings.TrimSpace(condition) == "" {
				fmt.Fprintln(a.stderr, "note: no --target-condition, so this deployment targets no device (use '*' for all)")
			}
			d, err := c.PutDeployment(cmd.Context(), args[0], req, api.WriteOptions{IfNoneMatch: "*"})
			if err != nil {
				return err
			}
			return a.printDeployment(d)
		},
	}
	f := cmd.Flags()
	f.StringVar(&contentFile, "content", "", "deployment manifest file (JSON; iotedgedev templates accepted)")
	f.StringVar(&envFile, "env-file", "", "file of KEY=value lines for the manifest's ${VAR} placeholders")
	f.StringVar(&condition, "target-condition", "", "which devices, e.g. \"tags.environment='prod'\" ('*' for all)")
	f.Int64Var(&priority, "priority", 0, "priority; the highest matching deployment applies")
	f.StringArrayVar(&labels, "label", nil, "label key=value (repeatable)")
	f.StringArrayVar(&metrics, "metric", nil, "custom metric name=query (repeatable)")
	f.BoolVar(&layered, "layered", false, "the content is a layered deployment (properties.desired.<path> keys)")
	f.BoolVar(&dryRun, "dry-run", false, "only report how many devices would be targeted and switch to it (and each wave's size)")
	rollout.add(f, true)
	return cmd
}

func (a *app) printDeployment(d api.DeploymentView) error {
	if a.output == "json" {
		return a.printJSON(d)
	}
	a.keyValues([][]string{
		{"id", d.ID},
		{"targetCondition", d.TargetCondition},
		{"priority", strconv.FormatInt(d.Priority, 10)},
		{"labels", pairsString(d.Labels)},
		{"metrics", pairsString(d.Metrics.Queries)},
		{"layered", strconv.FormatBool(d.Layered)},
		{"rollout", rolloutSummary(d.Rollout)},
		{"targeted", strconv.Itoa(d.SystemMetrics.Results["targetedCount"])},
		{"applied", strconv.Itoa(d.SystemMetrics.Results["appliedCount"])},
		{"modules", strings.Join(moduleNames(d.Content), ", ")},
		{"created", d.CreatedTimeUTC.Format("2006-01-02T15:04:05Z")},
		{"updated", d.LastUpdatedTimeUTC.Format("2006-01-02T15:04:05Z")},
		{"etag", d.Etag},
	})
	return nil
}

func pairsString(m map[string]string) string {
	if len(m) == 0 {
		return "-"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + m[k]
	}
	return strings.Join(parts, ",")
}

// moduleNames lists the modules of a manifest, for the table view.
func moduleNames(content json.RawMessage) []string {
	var c struct {
		ModulesContent map[string]map[string]json.RawMessage `json:"modulesContent"`
	}
	if json.Unmarshal(content, &c) != nil {
		return nil
	}
	agent := c.ModulesContent["$edgeAgent"]
	var names []string
	var desired struct {
		Modules map[string]json.RawMessage `json:"modules"`
	}
	if json.Unmarshal(agent["properties.desired"], &desired) == nil {
		for n := range desired.Modules {
			names = append(names, n)
		}
	}
	for k := range agent {
		if m, ok := strings.CutPrefix(k, "properties.desired.modules."); ok {
			names = append(names, m)
		}
	}
	sort.Strings(names)
	if len(names) == 0 {
		return []string{"-"}
	}
	return names
}

func (a *app) deploymentShow() *cobra.Command {
	var consistent bool
	cmd := &cobra.Command{
		Use:   "show ID",
		Short: "Show a deployment (secrets redacted)",
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			d, err := c.Deployment(cmd.Context(), args[0], consistent)
			if err != nil {
				return err
			}
			return a.printDeployment(d)
		},
	}
	cmd.Flags().BoolVar(&consistent, "consistent", false, "read through the leader (never stale)")
	return cmd
}

func (a *app) deploymentList() *cobra.Command {
	var labels []string
	var consistent bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List deployments, optionally by label",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			lbls, err := parsePairs("label", labels)
			if err != nil {
				return err
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			var all []api.DeploymentView
			q := api.DeploymentQuery{Labels: lbls, Limit: api.MaxPageSize, Consistent: consistent}
			for {
				p, err := c.Deployments(cmd.Context(), q)
				if err != nil {
					return err
				}
				all = append(all, p.Items...)
				if p.Next == "" {
					break
				}
				q.After = p.Next
			}
			if a.output == "json" {
				return a.printJSON(all)
			}
			rows := [][]string{{"ID", "PRIORITY", "TARGETED", "APPLIED", "TARGET CONDITION", "LABELS", "CREATED"}}
			for _, d := range all {
				rows = append(rows, []string{
					d.ID, strconv.FormatInt(d.Priority, 10),
					strconv.Itoa(d.SystemMetrics.Results["targetedCount"]), strconv.Itoa(d.SystemMetrics.Results["appliedCount"]),
					d.TargetCondition, pairsString(d.Labels), d.CreatedTimeUTC.Format("2006-01-02T15:04:05Z"),
				})
			}
			a.table(rows)
			return nil
		},
	}
	cmd.Flags().StringArrayVar(&labels, "label", nil, "only deployments with this label key=value (repeatable)")
	cmd.Flags().BoolVar(&consistent, "consistent", false, "read through the leader (never stale)")
	return cmd
}

func (a *app) deploymentUpdate() *cobra.Command {
	var (
		condition, etag string
		priority        int64
		labels, metrics []string
		content         string
		rollout         rolloutFlags
	)
	cmd := &cobra.Command{
		Use:   "update ID",
		Short: "Change a deployment's target condition, priority, labels, metrics or rollout thresholds",
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if content != "" {
				return fmt.Errorf("flag --content: a deployment's content cannot change after creation; create a new deployment with a higher priority instead")
			}
			var p api.DeploymentPatch
			if cmd.Flags().Changed("target-condition") {
				p.TargetCondition = &condition
			}
			if cmd.Flags().Changed("priority") {
				p.Priority = &priority
			}
			lbls, err := parsePairs("label", labels)
			if err != nil {
				return err
			}
			p.Labels = lbls
			mets, err := parsePairs("metric", metrics)
			if err != nil {
				return err
			}
			if mets != nil {
				p.Metrics = &fleet.Metrics{Queries: mets}
			}
			if p.Rollout, err = rollout.policy(cmd); err != nil {
				return err
			}
			if p.TargetCondition == nil && p.Priority == nil && p.Labels == nil && p.Metrics == nil && p.Rollout == nil {
				return fmt.Errorf("nothing to update: give --target-condition, --priority, --label, --metric or a rollout flag")
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			d, err := c.PatchDeployment(cmd.Context(), args[0], p, api.WriteOptions{IfMatch: etag})
			if err != nil {
				return err
			}
			return a.printDeployment(d)
		},
	}
	f := cmd.Flags()
	f.StringVar(&condition, "target-condition", "", "new target condition")
	f.Int64Var(&priority, "priority", 0, "new priority")
	f.StringArrayVar(&labels, "label", nil, "set a label key=value; key= removes it (repeatable)")
	f.StringArrayVar(&metrics, "metric", nil, "set a metric name=query; name= removes it (repeatable)")
	f.StringVar(&etag, "etag", "", "only update if the deployment's etag is still this")
	f.StringVar(&content, "content", "", "not allowed: content is immutable")
	_ = f.MarkHidden("content")
	rollout.add(f, false)
	return cmd
}

func (a *app) deploymentDelete() *cobra.Command {
	var etag string
	cmd := &cobra.Command{
		Use:   "delete ID",
		Short: "Delete a deployment (its devices fall back to the next matching deployment)",
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			if err := c.DeleteDeployment(cmd.Context(), args[0], api.WriteOptions{IfMatch: etag}); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(map[string]string{"deleted": args[0]})
			}
			fmt.Fprintf(a.stdout, "deleted deployment %s\n", args[0])
			return nil
		},
	}
	cmd.Flags().StringVar(&etag, "etag", "", "only delete if the deployment's etag is still this")
	return cmd
}

func devices(n int) string {
	if n == 1 {
		return "1 device"
	}
	return strconv.Itoa(n) + " devices"
}
