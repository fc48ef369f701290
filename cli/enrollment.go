package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"appliance/api"
)

func (a *app) enrollmentCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "enrollment", Short: "Manage enrollment groups: tokens with which new devices register themselves"}
	cmd.AddCommand(a.enrollmentCreate(), a.enrollmentShow(), a.enrollmentList(), a.enrollmentDelete())
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
			fmt.Fprintln(a.stderr, "keep the token now: it is not shown again. Devices use it with: appliance agent --enroll-token TOKEN --device-id ID ...")
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
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete an enrollment group (devices it registered stay)",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			if err := c.DeleteEnrollment(cmd.Context(), args[0], api.WriteOptions{}); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(map[string]string{"deleted": args[0]})
			}
			fmt.Fprintf(a.stdout, "deleted enrollment %s\n", args[0])
			return nil
		},
	}
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
