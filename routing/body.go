package routing

import (
	"bytes"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
)

const bodyPrefix = "$body."

// pathStep is one step of a $body query: a member name, optionally
// followed by one array index.
type pathStep struct {
	name  string
	index int // -1: none
}

// parseBodyPath checks a $body query path against edgeHub's JsonPath.g4:
// name ('[' digits ']')? ('.' name ('[' digits ']')?)*, where a name is one
// or more characters other than ()<>@,;:\"/[]?={}. and white space.
func parseBodyPath(p string) ([]pathStep, error) {
	if p == "" {
		return nil, errors.New("the path after $body. is empty")
	}
	var steps []pathStep
	for _, seg := range strings.Split(p, ".") {
		name, rest, hasIndex := strings.Cut(seg, "[")
		if name == "" || strings.ContainsAny(name, "()<>@,;:\\\"/[]?={} \t\r\n") {
			return nil, errors.New("each step must be a member name, optionally followed by [index]")
		}
		st := pathStep{name: name, index: -1}
		if hasIndex {
			digits, ok := strings.CutSuffix(rest, "]")
			n, err := strconv.Atoi(digits)
			if !ok || err != nil || n < 0 || strings.ContainsAny(digits, "+-") {
				return nil, errors.New("an index must be [digits] at the end of a step")
			}
			st.index = n
		}
		steps = append(steps, st)
	}
	return steps, nil
}

// evalCtx is one message being routed. Its body is decoded at most once,
// on the first $body query of any route.
type evalCtx struct {
	m        *Message
	bodyDone bool
	body     map[string]any // nil: the body is not a UTF-8 JSON object
}

// bodyQuery returns the value at path in a JSON body, as edgeHub's BodyQuery
// does: only for messages whose contentType is application/json and whose
// contentEncoding is utf-8 (else undefined); a missing member is null; an
// object or array is undefined.
func (c *evalCtx) bodyQuery(path []pathStep) value {
	if !c.bodyDone {
		c.bodyDone = true
		c.body = decodeBody(c.m)
	}
	if c.body == nil {
		return undef
	}
	var cur any = c.body
	for _, st := range path {
		obj, ok := cur.(map[string]any)
		if !ok {
			return null
		}
		if cur, ok = obj[st.name]; !ok {
			return null
		}
		if st.index >= 0 {
			arr, ok := cur.([]any)
			if !ok || st.index >= len(arr) {
				return null
			}
			cur = arr[st.index]
		}
	}
	switch v := cur.(type) {
	case nil:
		return null
	case bool:
		return boolVal(v)
	case float64:
		return numVal(v)
	case string:
		return strVal(v)
	}
	return undef // an object or an array
}

func decodeBody(m *Message) map[string]any {
	ct, _ := lookup(m.SystemProperties, "contentType")
	ce, _ := lookup(m.SystemProperties, "contentEncoding")
	if !strings.EqualFold(strings.TrimSpace(ct), "application/json") || !strings.EqualFold(strings.TrimSpace(ce), "utf-8") {
		return nil
	}
	body := bytes.TrimPrefix(m.Body, []byte("\xef\xbb\xbf"))
	var obj map[string]any
	if err := json.Unmarshal(body, &obj); err != nil {
		return nil
	}
	return obj
}
