// Package agent is the device runtime: the role of Azure IoT Edge's
// edgeAgent, run by `appliance agent` on each device.
//
// It owns everything that happens on a device:
//   - the MQTT session to the controller (any listed server, failing over
//     with jittered backoff): it receives the device's desired document on
//     fleet.DesiredTopic and publishes its reported document on
//     fleet.ReportedTopic, on every change (coalesced, at most one per
//     Config.ReportInterval) and on every reconnect;
//   - durable local state (bbolt, <DataDir>/agent.db): the last valid
//     desired document and what the agent created for each module, so that
//     a restarted agent, or one that starts while every server is down,
//     runs its last manifest at once;
//   - the reconcile loop: desired modules against what runs, in startup
//     order, honouring status, env, restartPolicy (with edgeAgent's
//     exponential backoff), imagePullPolicy and settings changes; a newer
//     desired version pre-empts a plan in progress; older versions are
//     ignored; an invalid document is refused (400, or 412 for a schema
//     version) without touching what runs;
//   - two runtimes behind one small interface: "docker" (containers of the
//     local Docker Engine, labelled with the device id; containers keep
//     running when the agent stops) and "process" (modules of type
//     "process" run as the agent's children, one process group each; they
//     stop with the agent and are started again by the next run).
//
// The agent links only the vocabulary package fleet, paho, bbolt and the
// Docker client: no raft, no broker, no controller code. DESIGN.md states
// the invariants, the failure modes, what happens offline and the process
// module format.
//
// Use:
//
//	a, err := agent.New(agent.Config{
//		Servers:   []string{"mqtts://node1:1883", "mqtts://node2:1883"},
//		CAFile:    "/etc/appliance/ca.crt",
//		DeviceID:  "press-17",
//		DeviceKey: key,
//		DataDir:   "/var/lib/appliance-agent",
//		Runtime:   agent.RuntimeProcess,
//	})
//	if err != nil { ... }
//	err = a.Run(ctx) // until ctx is cancelled
package agent
