// Package fleet is the shared vocabulary of appliance: devices, deployments,
// deployment manifests, reports, MQTT topic names and their validation.
//
// It is a leaf: it imports nothing else of this module, so the agent, the
// CLI and the controller can all speak it without linking raft, bbolt or the
// broker.
package fleet
