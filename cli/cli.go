package cli

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"appliance/api"
)

// Env lists the environment variables the CLI reads.
const (
	EnvServer  = "APPLIANCE_SERVER"
	EnvToken   = "APPLIANCE_TOKEN"
	EnvDataDir = "APPLIANCE_DATA_DIR"
	EnvCAFile  = "APPLIANCE_CA_FILE"
)

// DefaultServer is used when neither --server, APPLIANCE_SERVER nor a local
// node's recorded address says otherwise.
const DefaultServer = "https://127.0.0.1:7480"

// app holds what every command shares: streams, environment, global flags.
type app struct {
	stdout, stderr io.Writer
	getenv         func(string) string
	version        string

	server  string
	token   secretFlag
	output  string
	dataDir string
	caFile  string
}

// Execute runs the command line and returns the process exit code. Errors
// are printed as one line on stderr.
func Execute(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string, version string) int {
	a := &app{stdout: stdout, stderr: stderr, getenv: getenv, version: version, token: secretFlag{name: "token", env: EnvToken}}
	root := a.rootCommand()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(stderr, "error: "+oneLine(err.Error()))
		return 1
	}
	return 0
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
}

func (a *app) rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "appliance",
		Short:         "Deploy, update, monitor and roll back software on fleets of edge devices, with no cloud",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			switch a.output {
			case "table", "json":
				return nil
			}
			return fmt.Errorf("flag -o/--output must be table or json; got %q", a.output)
		},
	}
	root.CompletionOptions.DisableDefaultCmd = true
	pf := root.PersistentFlags()
	pf.StringVar(&a.server, "server", "", "controller API URL (env "+EnvServer+"; default: the local node's, else "+DefaultServer+")")
	a.token.register(pf, "admin token", "; default: read from <data-dir>/admin-token")
	pf.StringVarP(&a.output, "output", "o", "table", "output format: table or json")
	pf.StringVar(&a.caFile, "api-ca-file", "", "PEM CA that verifies an https controller (env "+EnvCAFile+"; default: <data-dir>/tls/ca.crt when present)")
	pf.StringVar(&a.dataDir, "data-dir", "", "node data directory (env "+EnvDataDir+"; default "+DefaultDataDir(os.Getenv)+")")

	root.AddCommand(a.versionCommand(), a.serveCommand(), a.agentCommand(), a.deviceCommand(), a.deploymentCommand(), a.enrollmentCommand(), a.simCommand(),
		a.clusterCommand(), a.backupCommand(), a.restoreCommand(), a.consumerCommand(), a.eventsCommand(), a.moduleCommand())
	return root
}

func (a *app) versionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if a.output == "json" {
				return a.printJSON(map[string]string{"version": a.version})
			}
			fmt.Fprintln(a.stdout, "appliance "+a.version)
			return nil
		},
	}
}

// DefaultDataDir is where a node keeps its data unless told otherwise:
// $APPLIANCE_DATA_DIR, else $XDG_DATA_HOME/appliance, else
// ~/.local/share/appliance.
func DefaultDataDir(getenv func(string) string) string {
	if d := getenv(EnvDataDir); d != "" {
		return d
	}
	if d := getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "appliance")
	}
	if h := getenv("HOME"); h != "" {
		return filepath.Join(h, ".local", "share", "appliance")
	}
	return "appliance-data"
}

func (a *app) resolvedDataDir() string {
	if a.dataDir != "" {
		return a.dataDir
	}
	return DefaultDataDir(a.getenv)
}

// client builds an API client from flags, environment and the local data
// directory, in that order.
func (a *app) client() (*api.Client, error) {
	server := a.server
	if server == "" {
		server = a.getenv(EnvServer)
	}
	if server == "" {
		if b, err := os.ReadFile(filepath.Join(a.resolvedDataDir(), "http-url")); err == nil {
			server = strings.TrimSpace(string(b))
		}
	}
	if server == "" {
		server = DefaultServer
	}
	if !strings.Contains(server, "://") {
		server = "https://" + server
	}
	hc, err := a.httpClient(server)
	if err != nil {
		return nil, err
	}
	token, err := a.token.resolve(a.getenv)
	if err != nil {
		return nil, err
	}
	if token == "" {
		path := filepath.Join(a.resolvedDataDir(), "admin-token")
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("no admin token: pass --token-file, set %s, or run on the node (could not read %s: %v)", EnvToken, path, errors.Unwrap(err))
		}
		token = strings.TrimSpace(string(b))
	}
	return &api.Client{BaseURL: server, Token: token, HTTP: hc}, nil
}

// httpClient verifies an https controller with the cluster CA: from
// --api-ca-file, the environment, or the local node's data directory; else
// the system's roots.
func (a *app) httpClient(server string) (*http.Client, error) {
	hc := &http.Client{Timeout: 30 * time.Second}
	if !strings.HasPrefix(server, "https://") {
		return hc, nil
	}
	path, flag := a.caFile, "flag --api-ca-file"
	if path == "" {
		path, flag = a.getenv(EnvCAFile), EnvCAFile
	}
	if path == "" {
		local := filepath.Join(a.resolvedDataDir(), "tls", "ca.crt")
		if _, err := os.Stat(local); err != nil {
			return hc, nil
		}
		path, flag = local, "the local node's CA"
	}
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificate in %s", flag, path)
	}
	hc.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, TLSHandshakeTimeout: 10 * time.Second}
	return hc, nil
}

// printJSONLine prints one compact JSON document per line, for streams.
func (a *app) printJSONLine(v any) error {
	enc := json.NewEncoder(a.stdout)
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

func (a *app) printJSON(v any) error {
	enc := json.NewEncoder(a.stdout)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
