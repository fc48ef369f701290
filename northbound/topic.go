package northbound

import (
	"fmt"
	"strings"

	"appliance/fleet"
)

// A consumer may subscribe only to filters inside the events tree:
// "appliance/events/#", "appliance/events/{device}/#",
// "appliance/events/+/{module}" and the like, plain or shared
// ("$share/{group}/{filter}"). Anything else is refused: there is nothing
// else to read on this listener, and a filter such as "#" or
// "appliance/+/x/desired" would read device topics anywhere else.

// subFilter is a parsed subscription filter: its levels after
// "appliance/events/".
type subFilter struct {
	text   string   // as subscribed (without a $share prefix)
	levels []string // after appliance/events
}

const (
	sharePrefix   = "$share/"
	maxFilterLen  = 1024
	maxGroupLen   = 128
	eventsLevels  = 2 // "appliance", "events"
	messageLevels = 2 // device, module
)

// parseSubscription parses one SUBSCRIBE filter: the share group ("" if
// not shared) and the filter. The error says why it is refused.
func parseSubscription(raw string) (group string, f subFilter, err error) {
	if len(raw) > maxFilterLen {
		return "", f, fmt.Errorf("filter longer than %d bytes", maxFilterLen)
	}
	text := raw
	if rest, ok := strings.CutPrefix(raw, sharePrefix); ok {
		g, filter, ok := strings.Cut(rest, "/")
		if !ok || g == "" || len(g) > maxGroupLen || strings.ContainsAny(g, "+#") {
			return "", f, fmt.Errorf("shared subscription %q: write $share/{group}/{filter}, the group without + # /", raw)
		}
		group, text = g, filter
	}
	levels := strings.Split(text, "/")
	if len(levels) < eventsLevels+1 || levels[0] != "appliance" || levels[1] != "events" {
		return "", f, fmt.Errorf("filter %q: a consumer may read only %s... topics", text, fleet.EventsTopicPrefix)
	}
	rest := levels[eventsLevels:]
	for i, l := range rest {
		switch {
		case l == "#" && i != len(rest)-1:
			return "", f, fmt.Errorf("filter %q: # must be the last level", text)
		case l != "#" && l != "+" && strings.ContainsAny(l, "+#"):
			return "", f, fmt.Errorf("filter %q: a wildcard must be a whole level", text)
		}
	}
	if len(rest) > messageLevels && rest[messageLevels-1] != "#" {
		return "", f, fmt.Errorf("filter %q: events topics have two levels after %s ({device}/{module})", text, fleet.EventsTopicPrefix)
	}
	return group, subFilter{text: text, levels: rest}, nil
}

// matches tells whether the filter matches a message of device and module
// (EventsTopic's levels).
func (f subFilter) matches(device, module string) bool {
	topic := [messageLevels]string{device, fleet.ModuleTopicLevel(module)}
	for i, l := range f.levels {
		if l == "#" {
			return true
		}
		if i >= messageLevels {
			return false
		}
		if l != "+" && l != topic[i] {
			return false
		}
	}
	return len(f.levels) == messageLevels
}
