// Package workload is the device's identity service for modules, the part
// of Azure IoT Edge's security daemon (aziot-edged) that modules written
// with the Azure IoT SDKs talk to:
//
//   - a device CA, created on first use and kept in the agent's data
//     directory, and the device hub's TLS server certificate issued from it
//     for every host name and address modules are given
//     (IOTEDGE_GATEWAYHOSTNAME);
//   - an identity per module of the running deployment: a generation id and
//     a 256-bit key, created when the module first appears and dropped when
//     it leaves (a module that comes back gets a new generation and key);
//   - the workload API, HTTP on one unix socket per module
//     (IOTEDGE_WORKLOADURI): GET /trust-bundle returns the device CA, and
//     POST /modules/{m}/genid/{g}/sign signs data with the module's key, the
//     requests azure-iot-device's edge_hsm.py makes. A socket signs only for
//     its own module and current generation; a container sees only its own
//     socket (its directory is mounted at /var/run/iotedge).
//   - VerifySAS and Service.Authenticate, which the device hub uses to admit
//     a module: a SAS token for exactly {hub}/devices/{device}/modules/{m},
//     unexpired, signed with that module's current key.
//
// Process modules run as the agent's user, so the socket's file mode cannot
// keep one process module from another's socket; what separates them is
// the path each is given (see agent/DESIGN.md).
package workload
