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
func (a *app) loadContent(path, envFile string) (json.RawMessage, *api.ManifestConfiguration, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("flag --content: %w", err)
	}
	vars := map[string]string{}
	if envFile != "" {
		envData, err := os.ReadFile(envFile)
		if err != nil {
			return nil, nil, fmt.Errorf("flag --env-file: %w", err)
		}
		vars, err = fleet.ParseEnvFile(envData)
		if err != nil {
			return nil, nil, fmt.Errorf("env file %s: %w", envFile, err)
		}
	}
	expanded, err := fleet.ExpandTemplate(data, func(name string) (string, bool) {
		if v, ok := vars[name]; ok {
			return v, true
		}
		return os.LookupEnv(name)
	})
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	content, err := fleet.ParseContentFile(expanded)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	content, err = fleet.NormalizeCreateOptions(content)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return content, api.ConfigurationOf(expanded), nil
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
		Long: `Creates a deployment from a manifest file: {"modulesContent": ...}, an
iotedgedev template (with --env-file), or a whole IoT Hub configuration object
as "az iot edge deployment show" prints it. A configuration object keeps its own
targetCondition, priority, labels and metrics unless a flag gives them (a
--label or --metric adds to or replaces the file's of that name); the command
says on stderr which came from where. --dry-run changes nothing and shows which
devices would start running it, switch to it (from which), leave, or keep what
they run; -o json lists them all.`,
		Args: exactArgs(1, "ID"),
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
			content, file, err := a.loadContent(contentFile, envFile)
			if err != nil {
				return err
			}
			req := api.DeploymentRequest{
				Labels: lbls, Content: content, TargetCondition: condition, Priority: priority,
				Metrics: fleet.Metrics{Queries: mets}, Layered: layered, Rollout: policy,
			}
			// Which value came from where, said once the command did its
			// work (a failure is one error line).
			notes := mergeConfiguration(&req, file, cmd.Flags().Changed, args[0])
			sayNotes := func() {
				for _, note := range notes {
					fmt.Fprintln(a.stderr, note)
				}
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			if dryRun {
				err := a.printDryRun(func(q api.DryRunQuery) (api.DryRunResult, error) {
					return c.DryRunDeployment(cmd.Context(), args[0], req, q)
				})
				if err == nil {
					sayNotes()
				}
				return err
			}
			d, err := c.PutDeployment(cmd.Context(), args[0], req, api.WriteOptions{IfNoneMatch: "*"})
			if err != nil {
				return err
			}
			sayNotes()
			if strings.TrimSpace(req.TargetCondition) == "" {
				fmt.Fprintln(a.stderr, "note: no --target-condition, so this deployment targets no device (use '*' for all)")
			}
			return a.printDeployment(d)
		},
	}
	f := cmd.Flags()
	f.StringVar(&contentFile, "content", "", "deployment manifest file (JSON; iotedgedev templates and whole IoT Hub configuration objects accepted)")
	f.StringVar(&envFile, "env-file", "", "file of KEY=value lines for the manifest's ${VAR} placeholders")
	f.StringVar(&condition, "target-condition", "", "which devices, e.g. \"tags.environment='prod'\" ('*' for all; default the file's)")
	f.Int64Var(&priority, "priority", 0, "priority; the highest matching deployment applies (default the file's, else 0)")
	f.StringArrayVar(&labels, "label", nil, "label key=value (repeatable; added to the file's)")
	f.StringArrayVar(&metrics, "metric", nil, "custom metric name=query (repeatable; added to the file's)")
	f.BoolVar(&layered, "layered", false, "the content is a layered deployment (properties.desired.<path> keys), merged on each device's base deployment")
	f.BoolVar(&dryRun, "dry-run", false, "change nothing: show which devices would start, switch to, leave or keep it (and each wave's size)")
	rollout.add(f, true)
	return cmd
}

// mergeConfiguration fills a create request with what a whole IoT Hub
// configuration object said, where no flag gave it, and returns one line
// per field saying where its value came from.
func mergeConfiguration(req *api.DeploymentRequest, file *api.ManifestConfiguration, changed func(string) bool, id string) []string {
	if file == nil {
		return nil
	}
	var notes []string
	from := func(field, src string) { notes = append(notes, fmt.Sprintf("%s: %s", field, src)) }
	if file.ID != "" && file.ID != id {
		notes = append(notes, fmt.Sprintf("note: the file's id is %q; the deployment is created as %q", file.ID, id))
	}
	switch {
	case changed("target-condition"):
		from("targetCondition", "from --target-condition")
	case file.TargetCondition != nil:
		req.TargetCondition = *file.TargetCondition
		from("targetCondition", "from the file")
	}
	switch {
	case changed("priority"):
		from("priority", "from --priority")
	case file.Priority != nil:
		req.Priority = *file.Priority
		from("priority", "from the file")
	}
	req.Labels, notes = mergePairs("labels", file.Labels, req.Labels, "--label", notes)
	var fileMetrics map[string]string
	if file.Metrics != nil {
		fileMetrics = file.Metrics.Queries
	}
	req.Metrics.Queries, notes = mergePairs("metrics", fileMetrics, req.Metrics.Queries, "--metric", notes)
	return notes
}

// mergePairs lays the flags' pairs over the file's and says which came
// from where.
func mergePairs(field string, file, flags map[string]string, flag string, notes []string) (map[string]string, []string) {
	if len(file) == 0 {
		if len(flags) > 0 {
			notes = append(notes, fmt.Sprintf("%s: from %s", field, flag))
		}
		return flags, notes
	}
	out := map[string]string{}
	var fromFile, fromFlag []string
	for k, v := range file {
		out[k] = v
	}
	for k, v := range flags {
		out[k] = v
		fromFlag = append(fromFlag, k)
	}
	for k := range file {
		if _, ok := flags[k]; !ok {
			fromFile = append(fromFile, k)
		}
	}
	sort.Strings(fromFile)
	sort.Strings(fromFlag)
	note := fmt.Sprintf("%s: %s from the file", field, strings.Join(fromFile, ", "))
	if len(fromFile) == 0 {
		note = field + ":"
	}
	if len(fromFlag) > 0 {
		note += fmt.Sprintf("; %s from %s", strings.Join(fromFlag, ", "), flag)
	}
	return out, append(notes, note)
}

// printDryRun shows a dry run: a summary table of what would happen to
// how many devices, with a few of each, or with -o json the whole answer
// and every device, fetched page by page.
func (a *app) printDryRun(page func(api.DryRunQuery) (api.DryRunResult, error)) error {
	first, err := page(api.DryRunQuery{Limit: api.MaxPageSize})
	if err != nil {
		return err
	}
	all := first.Devices
	for next := first.Next; next != ""; {
		p, err := page(api.DryRunQuery{After: next, Limit: api.MaxPageSize})
		if err != nil {
			return err
		}
		all = append(all, p.Devices...)
		next = p.Next
	}
	if a.output == "json" {
		first.Devices, first.Next = all, ""
		return a.printJSON(first)
	}
	defer func() {
		if len(first.Waves) > 0 {
			fmt.Fprintln(a.stdout)
			a.printWaves(first.Waves, false)
		}
	}()
	a.keyValues([][]string{
		{"would target", devices(first.TargetedCount)},
		{"would apply to", devices(first.WouldApplyCount)},
	})
	fmt.Fprintln(a.stdout)
	words := map[string]string{
		fleet.PreviewStart:  "start running it",
		fleet.PreviewSwitch: "switch to it from another deployment",
		fleet.PreviewLeave:  "leave it for another deployment",
		fleet.PreviewKeep:   "keep running it, nothing targeting them",
		fleet.PreviewNoBase: "targeted, no base to merge on: unchanged",
	}
	rows := [][]string{{"WOULD", "DEVICES", "EXAMPLES"}}
	for _, cat := range fleet.PreviewCategories {
		var ex []string
		for _, d := range all {
			if d.Category != cat || len(ex) == 5 {
				continue
			}
			switch {
			case cat == fleet.PreviewSwitch:
				ex = append(ex, d.ID+" (from "+d.From+")")
			case cat == fleet.PreviewLeave && d.To != d.From:
				ex = append(ex, d.ID+" (for "+d.To+")")
			default:
				ex = append(ex, d.ID)
			}
		}
		n := first.Changes[cat]
		e := strings.Join(ex, ", ")
		if n > len(ex) {
			e += ", ..."
		}
		rows = append(rows, []string{words[cat], strconv.Itoa(n), e})
	}
	a.table(rows)
	fmt.Fprintln(a.stdout, "\nnothing was changed (dry run); -o json lists every device")
	return nil
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
	for _, w := range d.Warnings {
		fmt.Fprintln(a.stderr, "warning: "+w)
	}
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
		dryRun          bool
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
			if dryRun {
				return a.printDryRun(func(q api.DryRunQuery) (api.DryRunResult, error) {
					return c.DryRunPatchDeployment(cmd.Context(), args[0], p, q)
				})
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
	f.BoolVar(&dryRun, "dry-run", false, "change nothing: show which devices would start, switch to, leave or keep it")
	f.StringVar(&content, "content", "", "not allowed: content is immutable")
	_ = f.MarkHidden("content")
	rollout.add(f, false)
	return cmd
}

func (a *app) deploymentDelete() *cobra.Command {
	var etag string
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "delete ID",
		Short: "Delete a deployment (its devices fall back to the next matching deployment, or keep running it)",
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			if dryRun {
				return a.printDryRun(func(q api.DryRunQuery) (api.DryRunResult, error) {
					return c.DryRunDeleteDeployment(cmd.Context(), args[0], q)
				})
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
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "change nothing: show where its devices would go")
	return cmd
}

func devices(n int) string {
	if n == 1 {
		return "1 device"
	}
	return strconv.Itoa(n) + " devices"
}
