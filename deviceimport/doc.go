// Package deviceimport owns the bulk import and the export of device
// identities (issue 19): an export file of `az iot hub device-identity
// export` is read line by line (package identityfile parses each line),
// every line validated on its own (a bad line, a device given twice, tags
// over the deployment limits fail that line and the rest goes on),
// checked in batches against the local replica (a create of a device that
// exists or a delete of one that does not fails at once; an upsert that
// would change nothing is counted and never proposed, so running a file
// again changes nothing), and proposed as raftstore.ImportDevices entries,
// a few in flight, the reader waiting for them (the upload waits with
// it). An atomic import stages its batches and commits them in one
// raftstore.FinishImport entry, or drops them. An import that stops part
// way says at which line; running the file again with upsert resumes it.
//
// It reaches the replicated store only through the Store interface it
// declares; the node implements it and maps the answers to the API's
// error classes. The state machine checks every device again: what this
// package checks first is what makes a batch cheap, not what keeps the
// state right.
package deviceimport
