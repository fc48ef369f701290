// Package api is the operator HTTP API of a controller node (JSON under
// /api/v1, bearer-token auth) and the typed client that the CLI uses.
//
// The handlers only decode, authenticate and encode: they call a Backend,
// which the node implements, and map the fleet package's sentinel errors to
// HTTP status codes. Errors travel as {"error": {"code", "message", "field"}}.
package api
