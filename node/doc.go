// Package node is the composition root of a controller: it opens the
// replicated store, hands the store's applied changes to the assignments
// (package assign), the history, the tokens and the broker's sessions,
// serves the operator API (validating every request before it reaches
// raft), and owns lifecycle and ordered shutdown. Who runs what and how it
// is going is decided in package assign, not here.
package node
