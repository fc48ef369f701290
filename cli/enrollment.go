package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"appliance/api"
)

func (a *app) enrollmentCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "enrollment", Short: "Manage enrollment groups: tokens with which new devices register themselves"}
	cmd.AddCommand(a.enrollmentCreate(), a.enrollmentShow(), a.enrollmentList(), a.enrollmentDelete(), a.enrollmentRotate())
	return cmd
}

func (a *app) enrollmentCreate() *cobra.Command {
	var tagPairs []string
	var tagsJSON string
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "Create an enrollment group; prints its token once",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			tags, err := parseTags(tagsJSON, tagPairs)
			if err != nil {
				return err
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			e, err := c.PutEnrollment(cmd.Context(), args[0], api.EnrollmentRequest{Tags: tags}, api.WriteOptions{IfNoneMatch: "*"})
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(e)
			}
			a.keyValues([][]string{{"name", e.Name}, {"tags", compactJSON(e.Tags)}, {"token", e.Token}})
			fmt.Fprintln(a.stderr, "keep the token now: it is not shown again. Devices use it from a file only the agent can read: appliance agent --enroll-token-file FILE --device-id ID ...")
			return nil
		},
	}
	cmd.Flags().StringArrayVar(&tagPairs, "tag", nil, "initial tag of enrolled devices, key=value (repeatable)")
	cmd.Flags().StringVar(&tagsJSON, "tags", "", "initial tags as a JSON object")
	return cmd
}

func (a *app) enrollmentShow() *cobra.Command {
	return &cobra.Command{
		Use:   "show NAME",
		Short: "Show an enrollment group (never its token)",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			e, err := c.Enrollment(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(e)
			}
			a.keyValues([][]string{{"name", e.Name}, {"tags", compactJSON(e.Tags)}, {"created", e.CreatedTimeUTC.Format("2006-01-02T15:04:05Z")}, {"etag", e.Etag}})
			return nil
		},
	}
}

func (a *app) enrollmentList() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List enrollment groups",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			items, err := c.Enrollments(cmd.Context())
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(items)
			}
			rows := [][]string{{"NAME", "TAGS", "CREATED"}}
			for _, e := range items {
				rows = append(rows, []string{e.Name, compactJSON(e.Tags), e.CreatedTimeUTC.Format("2006-01-02T15:04:05Z")})
			}
			a.table(rows)
			return nil
		},
	}
}

func (a *app) enrollmentDelete() *cobra.Command {
	var revoke bool
	cmd := &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete an enrollment group: its token enrolls nothing from now on (devices it registered stay, unless --revoke-devices)",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			del, err := c.DeleteEnrollment(cmd.Context(), args[0], revoke, api.WriteOptions{})
			if err != nil {
				return err
			}
			if a.output == "json" {
				if !revoke {
					return a.printJSON(map[string]string{"deleted": args[0]})
				}
				return a.printJSON(del)
			}
			fmt.Fprintf(a.stdout, "deleted enrollment %s\n", args[0])
			if revoke {
				a.printRevoked(del.RevokedDevices)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&revoke, "revoke-devices", false, revokeDevicesHelp)
	return cmd
}

const revokeDevicesHelp = "also revoke the devices the enrollment registered: their keys stop working on every node at once " +
	"(give one keys again with: appliance device keys regenerate ID, or delete it so that it enrolls anew)"

func (a *app) enrollmentRotate() *cobra.Command {
	var revoke bool
	cmd := &cobra.Command{
		Use:   "rotate NAME",
		Short: "Give an enrollment group a new token (printed once); the old token enrolls nothing from now on",
		Long: `Give an enrollment group a new token. The old token stops enrolling devices on
every node as soon as the change is applied; devices already enrolled keep
working (each holds a key of its own, not one the token derives), unless
--revoke-devices is given: their keys are then cleared too, and every session
they hold ends.`,
		Args: exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			rot, err := c.RotateEnrollment(cmd.Context(), args[0], api.RotateEnrollmentRequest{RevokeDevices: revoke}, api.WriteOptions{})
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(rot)
			}
			a.keyValues([][]string{{"name", rot.Name}, {"token", rot.Token}, {"etag", rot.Etag}})
			if revoke {
				a.printRevoked(rot.RevokedDevices)
			}
			fmt.Fprintln(a.stderr, "keep the token now: it is not shown again. The previous token no longer enrolls devices.")
			return nil
		},
	}
	cmd.Flags().BoolVar(&revoke, "revoke-devices", false, revokeDevicesHelp)
	return cmd
}

// printRevoked lists the devices a revocation cut off.
func (a *app) printRevoked(ids []string) {
	fmt.Fprintf(a.stdout, "revoked %d devices\n", len(ids))
	if len(ids) == 0 {
		return
	}
	rows := [][]string{{"DEVICE"}}
	for _, id := range ids {
		rows = append(rows, []string{id})
	}
	a.table(rows)
}

func (a *app) deviceKeys() *cobra.Command {
	cmd := &cobra.Command{Use: "keys", Short: "Rotate a device's keys"}
	var which string
	regen := &cobra.Command{
		Use:   "regenerate ID",
		Short: "Replace one of the device's two keys; prints the new key once",
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if which != "primary" && which != "secondary" {
				return fmt.Errorf("flag --key must be primary or secondary; got %q", which)
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			d, err := c.RegenerateDeviceKey(cmd.Context(), args[0], which)
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(d)
			}
			key := ""
			if k := d.Authentication.SymmetricKey; k != nil {
				key = k.PrimaryKey + k.SecondaryKey
			}
			a.keyValues([][]string{{"deviceId", d.ID}, {which + "Key", key}, {"etag", d.Etag}})
			return nil
		},
	}
	regen.Flags().StringVar(&which, "key", "", "which key to replace: primary or secondary")
	cmd.AddCommand(regen)
	return cmd
}
