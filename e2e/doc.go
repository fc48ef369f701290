// Package e2e holds the end-to-end tests: they run processes of the built
// appliance binary (APPLIANCE_BIN, or one built on the fly) on loopback
// ports they pick themselves, and talk to them as an operator would, with
// the CLI and over HTTP. They sit behind the e2e build tag; `make e2e` (and
// so `make test` and CI) runs them.
//
// TestCLI_Table (cli_table_test.go) runs every CLI command: a new command
// comes with a row in cliRows, or that test fails naming it.
package e2e
