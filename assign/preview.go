package assign

import (
	"slices"
	"strings"

	"appliance/evaluator"
	"appliance/fleet"
)

// Dry runs: what a write of a deployment would do to every device, from
// the assignments as they are, changing nothing.

// PreviewDevice is one device a write would concern: its applied
// deployment now (From) and after (To), "" for none.
type PreviewDevice = fleet.PreviewDevice

// The categories of a preview (fleet's words).
const (
	PreviewStart  = fleet.PreviewStart
	PreviewSwitch = fleet.PreviewSwitch
	PreviewLeave  = fleet.PreviewLeave
	PreviewKeep   = fleet.PreviewKeep
	PreviewNoBase = fleet.PreviewNoBase
)

// PreviewPut lists, sorted by device id, the devices whose document
// putting d (created, or replacing the deployment of that id) would
// change, and those it would leave to keep what they run. It reads the
// assignments call by call without the Assigner's lock (each answer
// consistent on its own): a large fleet's preview never holds up the
// apply path.
func (a *Assigner) PreviewPut(d evaluator.Deployment) ([]PreviewDevice, error) {
	e := a.engine
	targeted, would, err := e.DryRunDevices(d)
	if err != nil {
		return nil, err
	}
	if d.Layered {
		return a.previewLayer(d, targeted, would), nil
	}
	var out []PreviewDevice
	for _, dev := range would {
		from := e.Applied(dev)
		switch {
		case from == d.ID:
		case from == "":
			out = append(out, PreviewDevice{ID: dev, Category: PreviewStart, To: d.ID})
		default:
			out = append(out, PreviewDevice{ID: dev, Category: PreviewSwitch, From: from, To: d.ID})
		}
	}
	for _, dev := range e.AppliedDevices(d.ID) {
		if _, stays := slices.BinarySearch(would, dev); !stays {
			out = append(out, a.leaving(dev, d.ID))
		}
	}
	sortPreview(out)
	return out, nil
}

// previewLayer is PreviewPut for a layered deployment: the devices with a
// base it would start or stop targeting, and those it would target that
// have no base.
func (a *Assigner) previewLayer(d evaluator.Deployment, targeted, withBase []string) []PreviewDevice {
	e := a.engine
	now := e.TargetedDevices(d.ID)
	var out []PreviewDevice
	for _, dev := range targeted {
		if _, ok := slices.BinarySearch(now, dev); ok {
			continue
		}
		if _, ok := slices.BinarySearch(withBase, dev); ok {
			base := e.Applied(dev)
			out = append(out, PreviewDevice{ID: dev, Category: PreviewStart, From: base, To: base})
		} else {
			out = append(out, PreviewDevice{ID: dev, Category: PreviewNoBase})
		}
	}
	for _, dev := range now {
		if _, ok := slices.BinarySearch(targeted, dev); ok {
			continue
		}
		if base := e.Applied(dev); base != "" {
			out = append(out, PreviewDevice{ID: dev, Category: PreviewLeave, From: base, To: base})
		}
	}
	sortPreview(out)
	return out
}

// PreviewDelete lists what deleting a deployment would do: each device it
// applies to falls back to the next deployment that targets it, or keeps
// running it when there is none; a layer leaves the documents it is
// merged in.
func (a *Assigner) PreviewDelete(id string) []PreviewDevice {
	e := a.engine
	var out []PreviewDevice
	if e.IsLayered(id) {
		for _, dev := range e.AppliedDevices(id) {
			base := e.Applied(dev)
			out = append(out, PreviewDevice{ID: dev, Category: PreviewLeave, From: base, To: base})
		}
		return out
	}
	for _, dev := range e.AppliedDevices(id) {
		out = append(out, a.leaving(dev, id))
	}
	return out
}

// leaving says where a device that deployment id applies to goes without
// it: the next deployment that targets it (not a layer), or nowhere (it
// keeps running id).
func (a *Assigner) leaving(dev, id string) PreviewDevice {
	for _, other := range a.engine.Targeting(dev) {
		if other != id && !a.engine.IsLayered(other) {
			return PreviewDevice{ID: dev, Category: PreviewLeave, From: id, To: other}
		}
	}
	return PreviewDevice{ID: dev, Category: PreviewKeep, From: id}
}

func sortPreview(p []PreviewDevice) {
	slices.SortFunc(p, func(x, y PreviewDevice) int { return strings.Compare(x.ID, y.ID) })
}
