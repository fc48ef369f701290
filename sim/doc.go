// Package sim is the fleet simulator behind `appliance sim`: many simulated
// devices in one process, each with its own MQTT session to a controller,
// for demos and load tests.
//
// It owns the simulated device and nothing of the controller. Every device
// speaks the real device protocol, as the agent does:
//   - it enrolls with an enrollment's token as the agent does: it connects
//     with username = client id = device id and password =
//     fleet.EnrollmentKey(the key the token derives for it, its own key);
//     the controller registers it with its own key and the enrollment's
//     tags on its first connection. (Unlike the agent's, a simulated
//     device's own key is computed from the token, so that a restarted
//     simulator finds its devices: see simOwnKey.) A device cannot choose its
//     tags, so the simulator has none to give: they belong on the
//     enrollment;
//   - it subscribes to its desired topic, applies every desired document
//     newer than the one it runs with a fake module runtime (no processes:
//     the modules of modulesContent.$edgeAgent["properties.desired"] are
//     "started" at once) and publishes a fleet.ReportedDocument at QoS 1,
//     shaped like the agent's: lastDesiredVersion, lastDesiredStatus 200,
//     deploymentId, per-module runtimeStatus running with lastStartTimeUtc
//     and restartCount 0, runtime.platform, version "sim";
//   - a chosen share of devices (Config.FailShare, picked by index, so runs
//     repeat) have every module that should run fail: runtimeStatus failed,
//     exitCode FailExitCode, lastDesiredStatus 500;
//   - it reports again after every reconnection, pings when idle, and
//     reconnects with jittered exponential backoff, moving to the next
//     server of its order;
//   - with several servers it follows the agent's rule (internal/spread):
//     it prefers the server a hash of its id picks, falls over in the
//     order of the next scores, and, connected elsewhere, checks its
//     preferred server after a jittered doubling wait (Config.ReturnMin,
//     ReturnMax), moving back once a new connection there is up (the old
//     one is left after: make before break). These connections take the
//     pacer's slots like any other.
//
// A device is one goroutine, one socket and a 512-byte read buffer: the
// client is a minimal MQTT 3.1.1 one written here (CONNECT, SUBSCRIBE,
// PUBLISH and PUBACK at QoS 1, PINGREQ, DISCONNECT), which the broker
// accepts like any other and which costs far less per connection than a
// general client library. Connections are opened at a bounded rate
// (Config.ConnectRate) with bounded concurrency, so that a large fleet
// does not arrive at a controller as one burst of registrations.
//
// Stats counts, per deployment, the devices whose last acknowledged report
// is for it: that is how a run sees a deployment converge without asking
// the controller.
//
// Use:
//
//	s, err := sim.New(sim.Config{
//		Servers:     []string{"mqtt://127.0.0.1:1883"},
//		Devices:     5000,
//		EnrollToken: token,
//		Progress:    os.Stderr,
//	})
//	if err != nil { ... }
//	err = s.Run(ctx) // until ctx ends or Config.Duration elapses
//	fmt.Println(s.Stats())
package sim
