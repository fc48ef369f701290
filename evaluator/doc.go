// Package evaluator owns target conditions and deployment assignments: the
// condition language (the Azure IoT Hub target-condition syntax), its
// translation to CEL, and the incremental engine that knows, for every
// device, which deployments target it and which one applies.
//
// A condition is compiled once, when a deployment is written (Compile); a
// bad one is a *SyntaxError with a 1-based column. The compiled Condition
// carries its CEL program, the reference semantics, and evaluates without
// CEL on the hot paths through forms that are tested equal to it.
//
// The Engine is fed, on every controller node, by the raft apply path
// (PutDevice, DeleteDevice, PutDeployment, DeleteDeployment) and answers
// from memory. Assignments are derived state: the same sequence of calls
// gives the same answers and the same Change lists on every node, so they
// are never replicated. See DESIGN.md for the invariants.
//
// The package does no I/O and starts no goroutines.
package evaluator

// SemanticsVersion names the meaning of conditions and of precedence this
// package implements. Every node of a cluster must evaluate identically, so
// a change to what an accepted condition matches, or to the precedence
// order, must bump it; a node can then refuse to join, or the leader refuse
// to use a new feature, while versions are mixed (see DESIGN.md).
//
// 2: the functions STARTSWITH, ENDSWITH, IS_STRING, IS_NUMBER, IS_BOOL,
// IS_NULL and IS_OBJECT (additions: every condition of version 1 means
// what it meant).
const SemanticsVersion = 2
