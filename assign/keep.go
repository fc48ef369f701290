package assign

import (
	"fmt"
	"strings"

	"appliance/fleet"
)

// A device that no deployment targets any more keeps what it runs, as in
// Azure: it is sent no document, so its agent goes on with its last one,
// until a deployment targets it again or an operator resets it
// (`appliance device reset`). Removing modules is an explicit act: a
// reset, or a deployment without modules.
//
// What it runs is known from its last report, which is replicated: every
// node decides the same. A reset is the raft index it was applied at
// (fleet.Device.ResetIndex); it is pending until the device reports a
// document at least that new, since every document a node builds after
// applying the reset carries a version at least that high (a version is
// the index of the change that moved the device, or the index a node
// restarted at). A device reset and targeted again later is not reset a
// second time when it loses that deployment: it reported newer documents
// since.

// untargeted is what a device no deployment applies to is sent.
type untargeted int

const (
	keepRunning untargeted = iota // no document: it keeps what it runs
	sendEmpty                     // an empty document: it runs nothing
)

// untargetedPolicy decides for a device with no applied deployment, from
// its record, its last report (nil: none), and whether this node saw it
// lose a deployment since it started (held: the device may run what it
// was given before its report says so).
func untargetedPolicy(dev fleet.Device, rep *fleet.ReportedDocument, held bool) untargeted {
	switch {
	case resetPending(dev, rep):
		return sendEmpty
	case held:
		return keepRunning
	case rep == nil || rep.DeploymentID == "":
		// It never reported running anything this cluster gave it, or it
		// runs nothing: the empty document changes nothing and gives a
		// new device its first report.
		return sendEmpty
	}
	return keepRunning
}

// resetPending tells whether a reset has not reached the device yet.
func resetPending(dev fleet.Device, rep *fleet.ReportedDocument) bool {
	return rep == nil && dev.ResetIndex > 0 || rep != nil && resetPendingAt(dev, rep.LastDesiredVersion)
}

// resetPendingAt is resetPending of a report about version.
func resetPendingAt(dev fleet.Device, version uint64) bool {
	return dev.ResetIndex > 0 && version < dev.ResetIndex
}

// KeptOf describes a device no deployment applies to, from its record and
// last report. layered lists the layered deployments that target it (they
// need a base to apply).
func KeptOf(dev fleet.Device, rep *fleet.ReportedDocument, layered []string) fleet.Kept {
	var k fleet.Kept
	why := "no deployment targets this device"
	if len(layered) > 0 {
		why = fmt.Sprintf("no base deployment targets this device (the layered %s %s only merge on a base)",
			plural(len(layered), "deployment", "deployments"), strings.Join(layered, ", "))
	}
	switch {
	case resetPending(dev, rep):
		k.ResetPending = true
		k.Note = why + "; reset: it is sent an empty document and removes its modules"
	case rep == nil:
		k.Note = why + "; it has not reported what it runs"
	case rep.DeploymentID == "":
		k.Note = why + "; it runs nothing"
	default:
		k.Deployment, k.Layers, k.Version = rep.DeploymentID, rep.Layers, rep.LastDesiredVersion
		what := rep.DeploymentID
		if len(rep.Layers) > 0 {
			what += " with " + strings.Join(rep.Layers, ", ")
		}
		k.Note = fmt.Sprintf("%s; keeping %s v%d", why, what, rep.LastDesiredVersion)
	}
	return k
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
