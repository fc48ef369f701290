package raftstore

import (
	"bytes"
	"encoding/json"
	"unicode/utf8"

	"appliance/internal/jsonscan"
)

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
