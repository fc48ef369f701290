package cli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"appliance/api"
	"appliance/backup"
	"appliance/node"
)

func (a *app) clusterCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "cluster", Short: "Inspect and change the controller cluster's membership"}
	cmd.AddCommand(a.clusterMembers(), a.clusterRemove(), a.clusterJoinToken(), a.clusterRotateAdminToken(), a.clusterRotateJoinToken())
	return cmd
}

func (a *app) clusterMembers() *cobra.Command {
	return &cobra.Command{
		Use:   "members",
		Short: "List the cluster's members and its leader, as the node asked sees them, with the devices connected to each",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			v, err := c.Cluster(cmd.Context())
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(v)
			}
			rows := [][]string{{"ID", "ADDRESS", "ROLE", "VOTER", "STATUS", "LAST CONTACT", "DEVICES", "VERSION"}}
			versions := map[string]bool{}
			for _, m := range v.Members {
				id := m.ID
				if m.ID == v.Self {
					id += " (answered)"
				}
				voter := "yes"
				if !m.Voter {
					voter = "no"
				}
				version := m.Version
				switch {
				case m.Legacy:
					version += " (or older)"
				case version == "":
					version = "?"
				}
				if m.Version != "" {
					versions[version] = true
				}
				devices := "-"
				if m.ConnectedDevices != nil {
					devices = fmt.Sprint(*m.ConnectedDevices)
				}
				rows = append(rows, []string{id, m.Address, memberRole(m), voter, orDash(m.Status), lastContact(m.LastContactSeconds), devices, version})
			}
			a.table(rows)
			if v.Leader == "" {
				fmt.Fprintln(a.stderr, "no leader is known to "+v.Self+": the cluster has no quorum, or is electing one")
			}
			for _, m := range v.Members {
				if m.Status == api.MemberDown {
					fmt.Fprintf(a.stderr, "%s is down: %s\n", m.ID, m.Error)
				}
			}
			if len(versions) > 1 {
				fmt.Fprintln(a.stderr, "the members run different versions (an upgrade in progress?): features that need a newer release stay off until every member runs it")
			}
			return nil
		},
	}
}

// memberRole is a member's raft role as it answered; a member that is
// down has none that anyone can vouch for.
func memberRole(m api.ClusterMember) string {
	switch {
	case m.Status == api.MemberDown:
		return "-"
	case m.Leader:
		return "leader"
	case m.State != "":
		return strings.ToLower(m.State)
	}
	return "follower"
}

// lastContact formats seconds for the table: "35ms", "12.4s", "3m20s".
func lastContact(s *float64) string {
	if s == nil {
		return "-"
	}
	d := time.Duration(*s * float64(time.Second))
	switch {
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}

func (a *app) clusterRemove() *cobra.Command {
	return &cobra.Command{
		Use:   "remove NODE",
		Short: "Remove a node from the cluster for good: its certificate, join token and admin token stop working everywhere",
		Long: `Remove a node from the cluster for good. The node's certificate is revoked on
every node (its connections are closed, its handshakes refused, even while it
keeps running), and the admin token and the join token are rotated, since the
removed node holds copies of both: the new ones are printed, and every
remaining node's admin-token and join-token files hold them. Run it against
another node than the one removed. To bring the machine back, wipe its data
directory and join it with the new join token.`,
		Args: exactArgs(1, "NODE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			out, err := c.RemoveClusterMember(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(out)
			}
			revoked := "no"
			if out.CertificateRevoked {
				revoked = "yes (" + shortID(out.Fingerprint) + ")"
			}
			a.keyValues([][]string{{"removed", out.Removed}, {"certificateRevoked", revoked},
				{"adminToken", out.AdminToken}, {"joinToken", out.JoinToken}})
			if out.Warning != "" {
				fmt.Fprintln(a.stderr, "warning: "+out.Warning)
			}
			fmt.Fprintf(a.stderr, "removed %s: stop its process; the tokens above replace the old ones (every remaining node's <data-dir>/%s and %s hold them)\n",
				out.Removed, node.TokenFile, node.JoinTokenFile)
			return nil
		},
	}
}

func shortID(s string) string {
	if len(s) > 16 {
		return s[:16]
	}
	return s
}

func (a *app) clusterRotateAdminToken() *cobra.Command {
	return a.clusterRotate("rotate-admin-token", "the operator API's admin token", node.TokenFile,
		(*api.Client).RotateAdminToken, func(t string) any { return api.AdminTokenReply{AdminToken: t} })
}

func (a *app) clusterRotateJoinToken() *cobra.Command {
	return a.clusterRotate("rotate-join-token", "the token new nodes join with", node.JoinTokenFile,
		(*api.Client).RotateJoinToken, func(t string) any { return api.JoinTokenReply{JoinToken: t} })
}

// clusterRotate is a command that rotates a cluster-wide token and prints
// the new one (a table run also says where every node keeps it).
func (a *app) clusterRotate(use, what, file string, rotate func(*api.Client, context.Context) (string, error), reply func(string) any) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: "Replace " + what + " on every node (the old one stops working); prints the new one",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := a.client()
			if err != nil {
				return err
			}
			t, err := rotate(c, cmd.Context())
			if err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(reply(t))
			}
			fmt.Fprintln(a.stdout, t)
			fmt.Fprintf(a.stderr, "rotated: every node's <data-dir>/%s now holds the token above, and the old one no longer works\n", file)
			return nil
		},
	}
}

func (a *app) clusterJoinToken() *cobra.Command {
	return &cobra.Command{
		Use:   "join-token",
		Short: "Print this node's join token (read from <data-dir>/join-token; it is a secret)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			path := filepath.Join(a.resolvedDataDir(), node.JoinTokenFile)
			b, err := os.ReadFile(path)
			if err != nil {
				return fmt.Errorf("read the join token: %w (run this on a node of the cluster, or pass --data-dir)", err)
			}
			tok := strings.TrimSpace(string(b))
			if a.output == "json" {
				return a.printJSON(map[string]string{"joinToken": tok})
			}
			fmt.Fprintln(a.stdout, tok)
			return nil
		},
	}
}

func (a *app) backupCommand() *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:   "backup --out FILE",
		Short: "Write a consistent online backup of the cluster (state and credentials: keep it secret)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return fmt.Errorf("flag --out is required: the file to write the backup to")
			}
			c, err := a.client()
			if err != nil {
				return err
			}
			tmp := out + ".part"
			f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
			if err != nil {
				return fmt.Errorf("flag --out: %w", err)
			}
			fmt.Fprintf(a.stderr, "backing up from %s ...\n", c.BaseURL)
			start := time.Now()
			n, err := c.Backup(cmd.Context(), &progressWriter{w: f, out: a.stderr, every: 8 << 20})
			if err == nil {
				err = f.Sync()
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				os.Remove(tmp)
				return err
			}
			arch, err := backup.Open(tmp)
			if err != nil {
				os.Remove(tmp)
				return fmt.Errorf("the backup received does not check out: %w", err)
			}
			m := arch.Manifest
			arch.Close()
			if err := os.Rename(tmp, out); err != nil {
				return err
			}
			if a.output == "json" {
				return a.printJSON(map[string]any{"file": out, "bytes": n, "appliedIndex": m.AppliedIndex, "node": m.NodeID, "createdAt": m.CreatedAt})
			}
			fmt.Fprintf(a.stdout, "wrote %s: %d bytes, state at raft index %d from node %s, in %s\n", out, n, m.AppliedIndex, m.NodeID, time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "file to write (mode 0600)")
	return cmd
}

func (a *app) restoreCommand() *cobra.Command {
	var nodeID, raftAddr string
	cmd := &cobra.Command{
		Use:   "restore FILE",
		Short: "Turn a backup into the data directory of a new single-node cluster (disaster recovery)",
		Long: `restore writes the backup into an empty data directory (--data-dir) as a new
cluster of one node, holding exactly the backed-up state and the same CA, join
token and admin token, so that agents and operators go on working. Start it
with appliance serve (same --data-dir, --node-id and --raft-addr), then join
the other nodes to it with fresh data directories.`,
		Args: exactArgs(1, "FILE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if nodeID == "" {
				return fmt.Errorf("flag --node-id is required: the id the restored node will have")
			}
			if raftAddr == "" {
				return fmt.Errorf("flag --raft-addr is required: the fixed address (host:port) the restored node's peers will dial")
			}
			arch, err := backup.Open(args[0])
			if err != nil {
				return err
			}
			defer arch.Close()
			dir := a.resolvedDataDir()
			if err := arch.Restore(dir, node.RestoreLayout(), nodeID, raftAddr); err != nil {
				return err
			}
			m := arch.Manifest
			if a.output == "json" {
				return a.printJSON(map[string]any{"dataDir": dir, "appliedIndex": m.AppliedIndex, "nodeId": nodeID})
			}
			fmt.Fprintf(a.stdout, "restored the state at raft index %d (backed up %s from node %s) into %s\nstart it with: appliance serve --data-dir %s --node-id %s --raft-addr %s\n",
				m.AppliedIndex, m.CreatedAt.Format(time.RFC3339), m.NodeID, dir, dir, nodeID, raftAddr)
			return nil
		},
	}
	cmd.Flags().StringVar(&nodeID, "node-id", "", "id of the restored node")
	cmd.Flags().StringVar(&raftAddr, "raft-addr", "", "raft address of the restored node, host:port (as it will be passed to serve)")
	return cmd
}

// progressWriter reports every few megabytes of a long transfer.
type progressWriter struct {
	w      interface{ Write([]byte) (int, error) }
	out    interface{ Write([]byte) (int, error) }
	every  int64
	n      int64
	marked int64
}

func (p *progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.n += int64(n)
	if p.n-p.marked >= p.every {
		p.marked = p.n
		fmt.Fprintf(p.out, "  %d MiB\n", p.n>>20)
	}
	return n, err
}
