// Package directmethod owns a controller's side of direct methods: a call
// from the operator API on any node goes to the node holding the device's
// session (asked over the cluster port, CallPath), which writes it on the
// session (the broker's PublishMethod) for the device hub to pass to the
// module, and waits for the answer matched by its request id (the
// broker's MethodSink). Nothing goes through raft. It turns what comes
// back into the call's outcome as IoT Hub gives it: the module's status
// and payload, or not connected (404), timeout (504), a refused payload
// (400).
//
// A module restarted through its agent (RestartModule answered 200) is an
// event of the device's history that is not in the raft log: the node
// that relayed the call records it and passes it to the other members
// (EventPath), each tried once.
//
// It reaches the broker, the other members and the history through the
// interfaces it declares; the node implements them.
package directmethod
