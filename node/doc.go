// Package node is the composition root of a controller: it opens the
// replicated store, hands the store's applied changes to the assignments
// (package assign), the history, the tokens and the broker's sessions,
// serves the operator API (validating every request before it reaches
// raft), and owns lifecycle and ordered shutdown. Who runs what and how it
// is going is decided in package assign, not here; the deployment limits
// (deploylimits), admitting devices (deviceauth), bulk device import
// (deviceimport), direct methods (directmethod), the cluster-wide events
// tail (eventtail) and the batching of reports (reportbatch) are those
// packages' too: the node builds each in New and gives it what it needs
// through the small interfaces the package declares.
package node
