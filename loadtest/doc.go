// Package loadtest is the node-level MQTT load generator behind issue 4's
// benchmarks (docs/benchmarks.md, "Device connections and desired-state
// fan-out"): connections held by one node and memory per connection,
// connect rate, desired-state fan-out, and tag change → delivery latency,
// each measured against `appliance serve` and, as the baseline, Debian's
// mosquitto in the same run.
//
// It owns three things:
//   - Conn: a minimal MQTT 3.1.1 device client (CONNECT, SUBSCRIBE, QoS 0/1
//     PUBLISH in and out, PUBACK, PINGREQ). It is written here rather than
//     taken from paho because one load process holds up to ~15,000 of them
//     and shares two cores with the broker it measures: a connection costs
//     one goroutine and a 1 KiB read buffer, and a delivery one PUBACK write.
//     The latency probe in the driver uses paho, so an independent client
//     still checks the protocol end to end.
//   - RunShard: one load process's worth of devices, driven over stdin with
//     one command per line and reporting JSON events on stdout, so the
//     driver can hold more connections than one process's 20,000 open files
//     allow by running several shards.
//   - RunPublisher: a publishing client for the mosquitto baseline, which
//     has no deployments: fan-out there is a client publishing one message
//     per device topic, or one message to a topic every device subscribes to.
//
// cmd/mqttload wraps these as a program. The driver is TestLoad in
// load_test.go, behind the build tag loadtest so that `make test` never runs
// it; `make bench` does.
package loadtest
