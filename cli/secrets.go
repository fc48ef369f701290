package cli

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/pflag"
)

// Secrets (the admin token, a device key, an enrollment or join token) can
// be given four ways, so that none has to appear on a command line, where
// every user of the machine can read it (ps, /proc/PID/cmdline, shell
// history): --NAME VALUE, --NAME-file PATH, the environment variable ENV,
// or ENV_FILE naming a file. The first one given wins in that order; a
// file's content is taken with surrounding whitespace trimmed.

// secretFlag is one secret's flag pair and environment variables.
type secretFlag struct {
	name  string // the flag, without dashes: "token", "device-key"
	env   string // its environment variable: "APPLIANCE_TOKEN"
	value string // --NAME
	file  string // --NAME-file
}

// register adds --NAME and --NAME-file to fs; what names the secret, more
// says where it comes from by default.
func (s *secretFlag) register(fs *pflag.FlagSet, what, more string) {
	fs.StringVar(&s.value, s.name, "", what+" (env "+s.env+more+"; a flag's value is visible in the process list: prefer --"+s.name+"-file)")
	fs.StringVar(&s.file, s.name+"-file", "", "file holding the "+what+" (env "+s.env+"_FILE)")
}

// resolve returns the secret, or "" if none of the four ways gives one.
// getenv reads the environment.
func (s *secretFlag) resolve(getenv func(string) string) (string, error) {
	switch {
	case s.value != "" && s.file != "":
		return "", fmt.Errorf("give --%s or --%s-file, not both", s.name, s.name)
	case s.value != "":
		return s.value, nil
	case s.file != "":
		return readSecretFile("flag --"+s.name+"-file", s.file)
	case getenv(s.env) != "":
		return getenv(s.env), nil
	case getenv(s.env+"_FILE") != "":
		return readSecretFile(s.env+"_FILE", getenv(s.env+"_FILE"))
	}
	return "", nil
}

// readSecretFile reads a secret from a file; what names where it came from.
func readSecretFile(what, path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", what, err)
	}
	v := strings.TrimSpace(string(b))
	if v == "" {
		return "", fmt.Errorf("%s: %s is empty", what, path)
	}
	return v, nil
}
