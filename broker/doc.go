// Package broker is the MQTT endpoint devices connect to: a mochi-mqtt v2
// broker embedded in every controller node, with our own hook in front of it.
//
// It owns the device side of the protocol and nothing else:
//   - authentication: username = deviceId, password = one of the device's
//     keys, checked by an Authenticator the node supplies; the MQTT client id
//     must equal the device id (as in Azure IoT Hub);
//   - authorisation: a device may subscribe only to its own desired topic and
//     publish only to its own reported topic and telemetry topics
//     (fleet.DesiredTopic, fleet.ReportedTopic, fleet.MessagesTopicPrefix);
//     no other hook is installed, so nothing else can allow more;
//   - desired state: on subscribe to its desired topic a device gets its
//     current desired document from the DesiredSource, and PublishDesired
//     pushes a new one to a connected device at QoS 1;
//   - report intake: a reported document is checked (a JSON object, size
//     capped) and handed to the ReportSink without blocking;
//   - connection state: Connected lists who is connected, since when, and
//     when each last sent anything; Disconnect drops a device at once.
//
// The broker stores nothing: no retained messages, no sessions beyond the
// connection, no reports. It knows nothing of raft; the node plugs it in
// through the three small interfaces declared here.
//
// Every connection is served by our own listener, which recovers a panic in
// mochi's per-connection code and closes only that client (mochi-mqtt v2.7.9
// panics on a truncated MQTT 5 SUBSCRIBE, upstream issue mochi-mqtt/server#501,
// and this process is also a raft voter). It also works around three mochi
// concurrency bugs that stall or lose clients (a recursive read lock on a
// client's inflight map, the same on the client map at shutdown, and a race
// in session takeover). DESIGN.md explains the invariants, the failure modes,
// the workarounds and the limits.
package broker
