// Package node is the composition root of a controller: it opens the
// replicated store, feeds the evaluator from the store's applied changes,
// serves the operator API, validates every request before it reaches raft,
// and owns ordered shutdown.
package node
