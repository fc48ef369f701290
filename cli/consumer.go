package cli

import (
	"fmt"

	"github.com/spf13/cobra"

	"appliance/api"
)

func (a *app) consumerCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "consumer", Short: "Manage consumers: credentials with which the factory's applications read the devices' upstream messages over MQTT"}
	cmd.AddCommand(a.consumerCreate(), a.consumerShow(), a.consumerList(), a.consumerDelete())
	return cmd
}

func (a *app) consumerCreate() *cobra.Command {
	return &cobra.Command{
		Use:   "create NAME",
		Short: "Create a consumer; prints its key once (MQTT username: the name, password: the key)",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			con, err := c.CreateConsumer(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(con)
			}
			a.keyValues([][]string{{"name", con.Name}, {"key", con.Key}, {"created", con.CreatedTimeUTC.Format("2006-01-02T15:04:05Z")}})
			fmt.Fprintln(a.stderr, "keep the key now: it is stored only as a hash and is not shown again. Read with: mosquitto_sub -h NODE -p 1884 --cafile ca.crt -u "+con.Name+" -P KEY -t 'appliance/events/#' -V mqttv5")
			return nil
		},
	}
}

func (a *app) consumerShow() *cobra.Command {
	return &cobra.Command{
		Use:   "show NAME",
		Short: "Show a consumer (never its key)",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			con, err := c.Consumer(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(con)
			}
			a.keyValues([][]string{{"name", con.Name}, {"created", con.CreatedTimeUTC.Format("2006-01-02T15:04:05Z")}, {"etag", con.Etag}})
			return nil
		},
	}
}

func (a *app) consumerList() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List consumers",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			items, err := c.Consumers(cmd.Context())
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(api.ConsumerPage{Items: items})
			}
			rows := [][]string{{"NAME", "CREATED"}}
			for _, con := range items {
				rows = append(rows, []string{con.Name, con.CreatedTimeUTC.Format("2006-01-02T15:04:05Z")})
			}
			a.table(rows)
			return nil
		},
	}
}

func (a *app) consumerDelete() *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a consumer: its connections end on every node, its key opens nothing from then on",
		Args:  exactArgs(1, "NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			if err := c.DeleteConsumer(cmd.Context(), args[0], api.WriteOptions{}); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(map[string]string{"deleted": args[0]})
			}
			fmt.Fprintf(a.stdout, "consumer %s deleted\n", args[0])
			return nil
		},
	}
}
