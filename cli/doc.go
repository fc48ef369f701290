// Package cli is the appliance command line: the cobra command tree, flag
// and environment handling, and the table or JSON output. It calls the api
// client for operator commands and node.New / agent.New for the long-running
// modes; cmd/appliance only hands it the process's arguments.
package cli
