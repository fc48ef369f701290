// Package assign decides who runs what, and how it is going: it keeps the
// evaluator's assignments and every device's desired version under one
// lock, fed in log order from the state machine's applied changes; it
// builds the desired documents and pushes them to the devices a node
// holds; and it holds the status rules (a device's category under a
// deployment, a deployment's state, a deployment's status breakdown).
//
// Everything here is derived from the replicated state: every node computes
// the same answers at the same applied index, and a restarted node rebuilds
// them from its state file. The package does no network I/O of its own: it
// reads the replica through the store and sends documents through a
// Publisher the node gives it.
package assign
