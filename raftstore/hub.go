package raftstore

import (
	"encoding/json"
	"fmt"
	"time"

	"appliance/fleet"
)

// The device hub's state in the replica.
//
// Consumers: the credentials of the factory's applications that read the
// devices' upstream messages from the nodes' northbound listener (package
// northbound). Replicated so that any node admits them; only the key's
// digest is stored.
//
//	consumers  name → fleet.Consumer
//
// The bucket is made by the first command that writes it, so a state file
// of an older release is not touched until it needs it.
var bucketConsumers = []byte("consumers")

// Command types of the device hub work (20-24 reserved for it).
const (
	CmdPutConsumer    CommandType = 22 // create a consumer credential
	CmdDeleteConsumer CommandType = 23 // delete one; its connections end on every node
)

// PutConsumer creates a consumer. Its key's digest travels in the command;
// the key itself never enters the log. An existing consumer is never
// replaced (a new key needs a new consumer): IfNoneMatch is implied.
type PutConsumer struct {
	Consumer fleet.Consumer `json:"consumer"`
	Time     time.Time      `json:"time"`
}

func (PutConsumer) Type() CommandType { return CmdPutConsumer }

// DeleteConsumer removes a consumer: every node ends its connections to
// the northbound listener as it applies the entry (ConsumerDeleted).
type DeleteConsumer struct {
	Precondition
	Name string `json:"name"`
}

func (DeleteConsumer) Type() CommandType { return CmdDeleteConsumer }

func (w *writer) putConsumer(index uint64, c *PutConsumer) *Result {
	con := c.Consumer
	if err := fleet.ValidateConsumerName(con.Name); err != nil || con.KeyHash == "" {
		if err == nil {
			err = fmt.Errorf("consumer %q: a key digest is required: %w", con.Name, fleet.ErrInvalid)
		}
		return &Result{Index: index, Err: err}
	}
	if b := w.tx.Bucket(bucketConsumers); b != nil && b.Get([]byte(con.Name)) != nil {
		return &Result{Index: index, Err: fmt.Errorf("consumer %q: %w", con.Name, fleet.ErrExists)}
	}
	con.Key = ""
	con.CreatedTimeUTC = c.Time
	con.Etag = etagFor(index)
	w.putJSON(bucketConsumers, con.Name, con)
	public := con.Public()
	return &Result{Index: index, Created: true, Consumer: &public}
}

func (w *writer) deleteConsumer(index uint64, c *DeleteConsumer) *Result {
	var old *fleet.Consumer
	if b := w.tx.Bucket(bucketConsumers); b != nil {
		old = mustGet[fleet.Consumer](b, c.Name)
	}
	if old == nil {
		return &Result{Index: index, Err: fmt.Errorf("consumer %q: %w", c.Name, fleet.ErrNotFound)}
	}
	if err := checkPrecondition(c.Precondition, true, old.Etag); err != nil {
		return &Result{Index: index, Err: fmt.Errorf("consumer %q: %w", c.Name, err)}
	}
	w.del(bucketConsumers, []byte(c.Name))
	w.changes = append(w.changes, Change{Index: index, Kind: ConsumerDeleted, ID: c.Name})
	public := old.Public()
	return &Result{Index: index, Consumer: &public}
}

// Consumers calls fn for each consumer in name order (key digests
// included: the caller strips them before showing one).
func (r *Reader) Consumers(fn func(fleet.Consumer) bool) error {
	b := r.tx.Bucket(bucketConsumers)
	if b == nil {
		return nil
	}
	return each(b, "", fn)
}

// Consumer returns one consumer (its key digest included), or
// fleet.ErrNotFound.
func (r *Reader) Consumer(name string) (fleet.Consumer, error) {
	b := r.tx.Bucket(bucketConsumers)
	if b == nil {
		return fleet.Consumer{}, fmt.Errorf("consumer %q: %w", name, fleet.ErrNotFound)
	}
	c, err := getJSON[fleet.Consumer](b, name)
	if err != nil {
		return fleet.Consumer{}, err
	}
	if c == nil {
		return fleet.Consumer{}, fmt.Errorf("consumer %q: %w", name, fleet.ErrNotFound)
	}
	return *c, nil
}

// Reports calls fn for each device's last reported document, in device id
// order.
func (r *Reader) Reports(fn func(deviceID string, rep StoredReport) bool) error {
	c := r.tx.Bucket(bucketReports).Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		var rep StoredReport
		if err := json.Unmarshal(v, &rep); err != nil {
			return fmt.Errorf("decode stored report %q: %w", k, err)
		}
		if !fn(string(k), rep) {
			return nil
		}
	}
	return nil
}
