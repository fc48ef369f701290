// Package fleet is the shared vocabulary of appliance: devices, deployments,
// deployment manifests, reports, MQTT topic names and their validation.
//
// It is nearly a leaf: of this module it imports only routing (the route
// language, itself a leaf), so the agent, the CLI and the controller can
// all speak it without linking raft, bbolt or the broker.
package fleet
