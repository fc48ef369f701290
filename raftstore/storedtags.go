package raftstore

import (
	"bytes"
	"encoding/json"
	"fmt"
	"unicode/utf8"

	"appliance/internal/jsonscan"
)

// DeviceTags calls fn with each device's id and tags, in id order: what
// the assignments are rebuilt from. tags is the stored JSON of the tags
// (nil when the device has none), valid only during the call: nothing of
// the device is decoded here, and the node's restart over a million
// devices waits for this walk. fn's error stops the walk and is returned.
//
// The walk (the cursor, finding each device's tags) runs on a goroutine of
// its own, a batch ahead of fn, which gets the devices in order on the
// caller's: the rebuild's two halves on two cores. fn must not read
// through r while the walk runs.
func (r *Reader) DeviceTags(fn func(id string, tags json.RawMessage) error) error {
	const batchSize, ahead = 512, 4
	type item struct {
		id   string
		tags json.RawMessage
	}
	type batch struct {
		items []item
		err   error
	}
	full := make(chan *batch, ahead)
	free := make(chan *batch, ahead+2)
	for range ahead + 2 {
		free <- &batch{items: make([]item, 0, batchSize)}
	}
	stop := make(chan struct{})
	c := r.tx.Bucket(bucketDevices).Cursor()
	go func() {
		defer close(full)
		b := <-free
		for k, v := c.First(); k != nil; k, v = c.Next() {
			tags, err := storedTags(v)
			if err != nil {
				b.err = fmt.Errorf("decode stored %q: %w", k, err)
				break
			}
			b.items = append(b.items, item{string(k), tags})
			if len(b.items) < batchSize {
				continue
			}
			full <- b
			select {
			case <-stop: // fn failed: no more
				return
			default:
			}
			select {
			case b = <-free:
			case <-stop:
				return
			}
		}
		full <- b
	}()
	// The walk reads the transaction's pages: it must have ended before
	// this returns (and the transaction closes).
	defer func() {
		close(stop)
		for range full {
		}
	}()
	for b := range full {
		for _, it := range b.items {
			if err := fn(it.id, it.tags); err != nil {
				return err
			}
		}
		if b.err != nil {
			return b.err
		}
		clear(b.items) // views of the file's pages
		b.items = b.items[:0]
		free <- b
	}
	return nil
}

// storedTags finds the tags of a stored device without decoding it: the
// raw value of its member "tags", which the node writes under that exact
// name. A document with an escaped or non-ASCII key, or a key that
// encoding/json would match to the field otherwise (its names match
// without regard to case), is decoded by encoding/json as before, so
// both find the same member.
func storedTags(doc []byte) (json.RawMessage, error) {
	o, err := jsonscan.NewObject(doc)
	if err != nil {
		return decodeTags(doc)
	}
	var tags json.RawMessage
	var m jsonscan.Member
	for o.Next(&m) {
		switch {
		case !m.Plain || !isASCII(m.Key):
			return decodeTags(doc)
		case string(m.Key) == "tags":
			tags = m.Value // a later one wins, as in encoding/json
		case bytes.EqualFold(m.Key, []byte("tags")):
			return decodeTags(doc)
		}
	}
	if o.Err() != nil {
		return decodeTags(doc)
	}
	return tags, nil
}

func decodeTags(doc []byte) (json.RawMessage, error) {
	var d struct {
		Tags json.RawMessage `json:"tags"`
	}
	if err := json.Unmarshal(doc, &d); err != nil {
		return nil, err
	}
	return d.Tags, nil
}

func isASCII(b []byte) bool {
	for _, c := range b {
		if c >= utf8.RuneSelf {
			return false
		}
	}
	return true
}
