package cli

import (
	"context"
	"strconv"

	"github.com/spf13/cobra"

	"appliance/api"
)

// historyCommand is `deployment history ID` or `device history ID`.
func (a *app) historyCommand(what string, read func(c *api.Client, ctx context.Context, id string, limit int) (api.HistoryPage, error)) *cobra.Command {
	var limit int
	cmd := &cobra.Command{
		Use:   "history ID",
		Short: "The " + what + "'s history, newest first (who, when, what)",
		Args:  exactArgs(1, "ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			p, err := read(c, cmd.Context(), args[0], limit)
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(p.Items)
			}
			rows := [][]string{{"TIME", "INDEX", "WHO", "EVENT", "WHAT"}}
			for _, e := range p.Items {
				rows = append(rows, []string{e.Time.Format("2006-01-02T15:04:05.000Z"), strconv.FormatUint(e.Index, 10), orDash(e.Actor), e.Kind, e.What})
			}
			a.table(rows)
			return nil
		},
	}
	cmd.Flags().IntVar(&limit, "limit", 50, "at most this many events")
	return cmd
}
