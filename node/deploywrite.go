package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"appliance/api"
	"appliance/assign"
	"appliance/evaluator"
	"appliance/fleet"
	"appliance/raftstore"
)

// The checks of a deployment write beyond its own validity: the cluster
// can apply what it means (layers, the newer condition functions), and a
// PUT of what a GET returned keeps the stored content. Whether it fits the
// limits is package deploylimits' to say (Node.limits).

// ResetDevice marks a device reset: no deployment targets it, and from
// now on it is sent an empty document (its modules are removed) instead
// of keeping what it last ran. A device a deployment applies to is a
// conflict: its document is that deployment's.
func (b *backend) ResetDevice(ctx context.Context, id string, opts api.WriteOptions) (fleet.Device, error) {
	if err := b.viewBeforeWrite(ctx, func(r *raftstore.Reader) error {
		_, err := r.Device(id)
		return err
	}); err != nil {
		return fleet.Device{}, err
	}
	var applied string
	var layers []string
	b.assign.Read(func(v assign.View) { applied, layers = v.Applied(id), v.Layers(id) })
	if applied != "" {
		return fleet.Device{}, fmt.Errorf("device %s: deployment %s applies to it: a reset is for a device no deployment targets (it removes what the device kept running); change the device's tags or the deployments first: %w",
			id, applied, fleet.ErrConflict)
	}
	_ = layers // a device with layers and no base keeps what it runs too: a reset applies
	res, err := b.apply(ctx, raftstore.ResetDevice{Precondition: precondition(opts), ID: id, Time: now(), Actor: operatorActor})
	if err != nil {
		return fleet.Device{}, err
	}
	return res.Device.Public(), nil
}

// requireSemantics refuses, with 503 upgrade_required, a deployment whose
// meaning some member of the cluster does not know: a layered one (an
// older node would apply it as a base) or a condition with a function of
// evaluator.SemanticsVersion 2 (an older node cannot compile it, and would
// target no device). Both came with raftstore.CmdResetDevice: a node that
// can apply it knows them.
func (b *backend) requireSemantics(ctx context.Context, layered bool, conditions ...string) error {
	need := layered
	for _, c := range conditions {
		if cond, err := evaluator.Compile(c); err == nil && cond.Semantics() > 1 {
			need = true
		}
	}
	if !need || b.store == nil {
		return nil
	}
	if err := b.store.CheckCommand(ctx, raftstore.CmdResetDevice); err != nil {
		if errors.Is(err, raftstore.ErrClusterBehind) {
			return fmt.Errorf("%w: layered deployments and the functions STARTSWITH, ENDSWITH and IS_<type> need every member at this release: %w", api.ErrUpgradeRequired, err)
		}
		return err
	}
	return nil
}

// storedContent is what a PUT's content stands for: a deployment's
// content shown redacted by a GET (a read never shows its secrets) stands
// for the stored content, so that a PUT of what a GET returned keeps it;
// any other content is taken as sent.
func (b *backend) storedContent(id string, content json.RawMessage) json.RawMessage {
	var out json.RawMessage
	_ = b.store.View(func(r *raftstore.Reader) error {
		d, err := r.Deployment(id)
		if err != nil {
			return nil
		}
		if equalJSON(fleet.RedactContent(d.Content), content) {
			out = d.Content
		}
		return nil
	})
	if out != nil {
		return out
	}
	return content
}

// equalJSON compares two JSON values by meaning (key order, spacing).
func equalJSON(a, b json.RawMessage) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	ca, _ := json.Marshal(x)
	cb, _ := json.Marshal(y)
	return string(ca) == string(cb)
}
