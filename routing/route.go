package routing

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// ErrInvalidRoute matches every error Parse and ParseRoutes return.
var ErrInvalidRoute = errors.New("invalid route")

// SyntaxError is a route the compiler refuses. Column is 1-based and counts
// characters (not bytes) from the start of the route text.
type SyntaxError struct {
	Column int
	Msg    string
}

func (e *SyntaxError) Error() string { return fmt.Sprintf("column %d: %s", e.Column, e.Msg) }

// Is makes every SyntaxError match ErrInvalidRoute.
func (e *SyntaxError) Is(target error) bool { return target == ErrInvalidRoute }

// RouteError is a route of $edgeHub's routes that does not compile or whose
// object form is malformed: Name is the route's name. Err is a *SyntaxError
// for the route text.
type RouteError struct {
	Name string
	Err  error
}

func (e *RouteError) Error() string { return fmt.Sprintf("route %q: %v", e.Name, e.Err) }
func (e *RouteError) Unwrap() error { return e.Err }

// Is makes every RouteError match ErrInvalidRoute.
func (e *RouteError) Is(target error) bool { return target == ErrInvalidRoute }

// SinkKind tells where a route delivers.
type SinkKind uint8

const (
	// SinkUpstream is $upstream: the controller.
	SinkUpstream SinkKind = iota + 1
	// SinkModuleInput is BrokeredEndpoint("/modules/<m>/inputs/<i>").
	SinkModuleInput
)

// Sink is a route's destination.
type Sink struct {
	Kind   SinkKind
	Module string // SinkModuleInput only
	Input  string // SinkModuleInput only
}

// String is the sink as a route writes it.
func (s Sink) String() string {
	if s.Kind == SinkUpstream {
		return "$upstream"
	}
	return fmt.Sprintf("BrokeredEndpoint(%q)", "/modules/"+s.Module+"/inputs/"+s.Input)
}

// DefaultPriority is the priority of a route given as a string: below the
// 0-9 of schema 1.1's route objects (0 is the highest), as in edgeHub.
const DefaultPriority uint32 = 2000000000

// Message is what routes read of a message.
type Message struct {
	// Source is where the message comes from:
	// "/messages/modules/<module>/outputs/<output>" for a module's output,
	// "/messages/modules/<module>" for a module's message without one.
	Source string
	// Properties are the application properties; names are matched
	// ignoring case, as in IoT Hub.
	Properties map[string]string
	// SystemProperties by name without '$' (messageId, correlationId,
	// userId, contentType, contentEncoding, connectionDeviceId,
	// connectionModuleId, outputName, enqueuedTime, ...).
	SystemProperties map[string]string
	// Body is the message as sent. $body queries read it when contentType
	// is application/json and contentEncoding utf-8.
	Body []byte
}

// Route is one compiled route.
type Route struct {
	// Name is the route's key in $edgeHub's routes ("" from Parse).
	Name string
	// Text is the route as written.
	Text string
	// Priority: 0 (highest) to 9, or DefaultPriority.
	Priority uint32
	// TimeToLive is how long a message routed by it is kept for a sink that
	// does not take it; 0 means storeAndForwardConfiguration's.
	TimeToLive time.Duration
	Sink       Sink

	source string // normalised prefix, e.g. "/messages/modules/a/outputs/"
	cond   func(*evalCtx) bool
}

// Parse compiles a route, "[SELECT *] FROM <source> [WHERE <condition>] INTO
// <sink>", with edgeHub's grammar and typing. Errors are *SyntaxError with
// the column of the offending token.
func Parse(text string) (*Route, error) {
	pr, err := parseRoute(text)
	if err != nil {
		return nil, err
	}
	src, err := normaliseSource(pr.path)
	if err != nil {
		return nil, &SyntaxError{Column: pr.source.col, Msg: err.Error()}
	}
	r := &Route{Text: text, Priority: DefaultPriority, Sink: pr.sink, source: src}
	if pr.condition != nil {
		if r.cond, err = compileCondition(pr.condition); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// normaliseSource checks a source path and returns the prefix it matches,
// with a trailing '/': "/*" matches everything, "/messages/*" every
// message, "/messages/modules/<m>/*" a module's messages,
// "/messages/modules/<m>/outputs/*" those sent to any output,
// "/messages/modules/<m>/outputs/<o>" those sent to output o. As in
// edgeHub a trailing "*" or "/" may be left out, and matching ignores case.
// "/messages/events" (leaf devices' telemetry) and "/twinChangeNotifications"
// are accepted, as edgeHub does, and match nothing here: this hub serves
// modules only.
func normaliseSource(path string) (string, error) {
	segs := strings.Split(strings.TrimPrefix(path, "/"), "/")
	if len(segs) > 0 && segs[len(segs)-1] == "*" {
		segs = segs[:len(segs)-1]
	}
	for i, s := range segs {
		if strings.Contains(s, "*") {
			return "", fmt.Errorf("source %s: '*' may only end the path", quote(path))
		}
		if s == "" {
			return "", fmt.Errorf("source %s: empty path segment (segment %d)", quote(path), i+1)
		}
	}
	eq := strings.EqualFold
	ok := false
	switch n := len(segs); {
	case n == 0:
		ok = true
	case !eq(segs[0], "messages"):
		ok = n == 1 && eq(segs[0], "twinChangeNotifications")
	case n == 1:
		ok = true
	case n == 2:
		ok = eq(segs[1], "modules") || eq(segs[1], "events")
	case !eq(segs[1], "modules"):
		ok = false
	case n == 3:
		ok = true
	default:
		ok = eq(segs[3], "outputs") && n <= 5
	}
	if !ok {
		return "", fmt.Errorf("unknown source %s: use /*, /messages/*, /messages/modules/<module>/*, /messages/modules/<module>/outputs/* or /messages/modules/<module>/outputs/<output>", quote(path))
	}
	if len(segs) == 0 {
		return "/", nil
	}
	return "/" + strings.Join(segs, "/") + "/", nil
}

// Matches tells whether the route takes the message: its source matches
// and its condition (if any) is true.
func (r *Route) Matches(m *Message) bool {
	return r.matches(&evalCtx{m: m})
}

func (r *Route) matches(ctx *evalCtx) bool {
	if !sourceMatches(r.source, ctx.m.Source) {
		return false
	}
	return r.cond == nil || r.cond(ctx)
}

// sourceMatches is edgeHub's BaseMessageSource.Match: the message's source,
// with one trailing '/', starts with the route's, ignoring case.
func sourceMatches(prefix, source string) bool {
	s := strings.TrimRight(strings.TrimSpace(source), "/") + "/"
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}

// ParseRoutes compiles $edgeHub's desired "routes" object: route name →
// route string, or (schema 1.1 and later) {"route": "...", "priority":
// 0-9, "timeToLiveSecs": N}. Errors are *RouteError naming the route. The
// routes are returned sorted by name.
func ParseRoutes(raw json.RawMessage) ([]*Route, error) {
	var entries map[string]json.RawMessage
	if len(bytes.TrimSpace(raw)) == 0 || bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
		return nil, nil
	}
	if err := json.Unmarshal(raw, &entries); err != nil {
		return nil, fmt.Errorf("%w: routes must be an object of route name → route: %v", ErrInvalidRoute, err)
	}
	var routes []*Route
	for name, e := range entries {
		r, err := parseEntry(e)
		if err != nil {
			return nil, &RouteError{Name: name, Err: err}
		}
		r.Name = name
		routes = append(routes, r)
	}
	slices.SortFunc(routes, func(a, b *Route) int { return strings.Compare(a.Name, b.Name) })
	return routes, nil
}

func parseEntry(e json.RawMessage) (*Route, error) {
	var text string
	if json.Unmarshal(e, &text) == nil {
		return Parse(text)
	}
	var obj struct {
		Route          *string  `json:"route"`
		Priority       *float64 `json:"priority"`
		TimeToLiveSecs *float64 `json:"timeToLiveSecs"`
	}
	if err := json.Unmarshal(e, &obj); err != nil || obj.Route == nil {
		return nil, fmt.Errorf("%w: must be a string or an object {\"route\": ..., \"priority\": ..., \"timeToLiveSecs\": ...}", ErrInvalidRoute)
	}
	r, err := Parse(*obj.Route)
	if err != nil {
		return nil, err
	}
	if p := obj.Priority; p != nil {
		if *p < 0 || *p > 9 || *p != math.Trunc(*p) {
			return nil, fmt.Errorf("%w: priority must be an integer from 0 to 9", ErrInvalidRoute)
		}
		r.Priority = uint32(*p)
	}
	if t := obj.TimeToLiveSecs; t != nil {
		if *t < 0 || *t > math.MaxUint32 || *t != math.Trunc(*t) {
			return nil, fmt.Errorf("%w: timeToLiveSecs must be an integer from 0 to 4294967295", ErrInvalidRoute)
		}
		r.TimeToLive = time.Duration(*t) * time.Second
	}
	return r, nil
}

// Delivery is one sink a message goes to and the route that sends it there.
type Delivery struct {
	Sink  Sink
	Route *Route
}

// Table routes messages through a set of routes.
type Table struct {
	routes []*Route
}

// NewTable builds a table of compiled routes.
func NewTable(routes []*Route) *Table {
	return &Table{routes: slices.Clone(routes)}
}

// Routes returns the table's routes.
func (t *Table) Routes() []*Route { return slices.Clone(t.routes) }

// Route returns where a message goes: each sink at most once (a message
// matched by several routes to the same sink is delivered once, as in
// edgeHub), by the matching route of highest priority (lowest number; on a
// tie, the first by name). Sinks are in the order of their routes'
// priorities, then names. A message's body is decoded at most once.
func (t *Table) Route(m *Message) []Delivery {
	ctx := &evalCtx{m: m}
	var out []Delivery
	for _, r := range t.routes {
		if !r.matches(ctx) {
			continue
		}
		i := slices.IndexFunc(out, func(d Delivery) bool { return d.Sink == r.Sink })
		switch {
		case i < 0:
			out = append(out, Delivery{Sink: r.Sink, Route: r})
		case r.Priority < out[i].Route.Priority:
			out[i].Route = r
		}
	}
	slices.SortStableFunc(out, func(a, b Delivery) int {
		if a.Route.Priority != b.Route.Priority {
			return cmpInt(int(a.Route.Priority), int(b.Route.Priority))
		}
		return strings.Compare(a.Route.Name, b.Route.Name)
	})
	return out
}
