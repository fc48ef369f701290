package hub

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/mochi-mqtt/server/v2/packets"
	bolt "go.etcd.io/bbolt"

	"appliance/fleet"
	"appliance/internal/mqttconn"
)

// twinState is a module's twin: the desired properties the deployment
// gives it and the reported properties it patched, each with a $version
// that rises with every change and survives restarts (hub.db).
type twinState struct {
	Desired         json.RawMessage `json:"desired"`
	DesiredVersion  int64           `json:"desiredVersion"`
	Reported        json.RawMessage `json:"reported"`
	ReportedVersion int64           `json:"reportedVersion"`
}

// Twin status codes on $iothub/twin/res/{status}, as IoT Hub uses them.
const (
	twinOK        = 200
	twinNoContent = 204
	twinBad       = 400
	twinTooLarge  = 413
	twinServerErr = 500
)

// decodeObject decodes a JSON object keeping numbers as written.
func decodeObject(raw []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var obj map[string]any
	if err := dec.Decode(&obj); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, errors.New("data after the object")
	}
	if obj == nil {
		return nil, errors.New("not a JSON object")
	}
	return obj, nil
}

// mergePatch applies a JSON merge patch (RFC 7386) to target: null removes
// a property, objects merge, anything else replaces.
func mergePatch(target, patch map[string]any) {
	for k, v := range patch {
		switch pv := v.(type) {
		case nil:
			delete(target, k)
		case map[string]any:
			t, ok := target[k].(map[string]any)
			if !ok {
				t = map[string]any{}
			}
			mergePatch(t, pv)
			target[k] = t
		default:
			target[k] = v
		}
	}
}

// mergeDiff is the merge patch that turns from into to: what changed, and
// null for what was removed.
func mergeDiff(from, to map[string]any) map[string]any {
	out := map[string]any{}
	for k, tv := range to {
		fv, had := from[k]
		fo, fIsObj := fv.(map[string]any)
		to, tIsObj := tv.(map[string]any)
		switch {
		case had && fIsObj && tIsObj:
			if d := mergeDiff(fo, to); len(d) > 0 {
				out[k] = d
			}
		case !had || !reflect.DeepEqual(fv, tv):
			out[k] = tv
		}
	}
	for k := range from {
		if _, ok := to[k]; !ok {
			out[k] = nil
		}
	}
	return out
}

// withVersion renders an object with "$version" added.
func withVersion(obj map[string]any, version int64) []byte {
	c := make(map[string]any, len(obj)+1)
	for k, v := range obj {
		c[k] = v
	}
	c["$version"] = version
	b, _ := json.Marshal(c)
	return b
}

// setDesired takes the deployment's desired properties for the module.
// When they differ from the twin's, the version rises, the new twin is
// stored, and a connected module subscribed to patches gets the merge
// patch from the old properties to the new ones, with the new $version.
func (m *module) setDesired(raw json.RawMessage) {
	next, err := decodeObject(raw)
	if err != nil {
		m.h.log.Error("module twin's desired properties are not a JSON object; ignored", "module", m.name, "error", err)
		return
	}
	canonical, _ := json.Marshal(next)
	m.mu.Lock()
	if m.twin.DesiredVersion > 0 && bytes.Equal(canonical, m.twin.Desired) {
		m.mu.Unlock()
		return
	}
	prev, _ := decodeObject(m.twin.Desired)
	m.twin.Desired = canonical
	m.twin.DesiredVersion++
	version := m.twin.DesiredVersion
	state, _ := json.Marshal(m.twin)
	m.mu.Unlock()
	patch := withVersion(mergeDiff(prev, next), version)
	name := []byte(m.name)
	m.h.store.do(func(tx *bolt.Tx) error { return tx.Bucket(bucketTwins).Put(name, state) }, func(err error) {
		if err != nil {
			m.h.log.Error("store module twin", "module", m.name, "error", err)
			return
		}
		m.mu.Lock()
		c, subs := m.conn, m.subs
		current := m.twin.DesiredVersion == version
		m.mu.Unlock()
		if c != nil && subs.TwinPatch && current {
			m.h.stats.desiredPatches.Add(1)
			_ = c.publish(desiredPatchTopic(version), patch, 1, nil)
		}
	})
}

// reportedDoc is the module's reported properties with $version, and the
// version (0: never reported).
func (m *module) reportedDoc() (json.RawMessage, int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.twin.ReportedVersion == 0 {
		return nil, 0
	}
	obj, _ := decodeObject(m.twin.Reported)
	return withVersion(obj, m.twin.ReportedVersion), m.twin.ReportedVersion
}

// twinResponse answers a twin request if the module subscribed to
// responses (MQTT delivers nothing to a topic nobody subscribed to).
func (c *conn) twinResponse(status int, rid string, version int64, body []byte) {
	if subs, _ := c.mod.subscriptions(c); !subs.TwinRes {
		c.h.log.Debug("twin response dropped: the module is not subscribed to $iothub/twin/res/#", "module", c.mod.name, "rid", rid)
		return
	}
	_ = c.publish(twinResponseTopic(status, rid, version), body, 1, nil)
}

func twinQuery(topic, prefix string) (rid string, ok bool) {
	_, query, found := strings.Cut(strings.TrimPrefix(topic, prefix), "?")
	if !found {
		return "", false
	}
	return requestID(query)
}

// twinGet answers $iothub/twin/GET/?$rid=N with the whole twin:
// {"desired": {..., "$version": v}, "reported": {..., "$version": v}}.
func (c *conn) twinGet(pk packets.Packet) {
	c.h.stats.twinGets.Add(1)
	rid, ok := twinQuery(pk.TopicName, topicTwinGet)
	if !ok {
		c.h.log.Info("twin request without $rid ignored", "module", c.mod.name, "topic", mqttconn.Truncate(pk.TopicName, 200))
		return
	}
	m := c.mod
	m.mu.Lock()
	desired, _ := decodeObject(m.twin.Desired)
	reported, _ := decodeObject(m.twin.Reported)
	dv, rv := m.twin.DesiredVersion, max(m.twin.ReportedVersion, 1)
	m.mu.Unlock()
	body := fmt.Sprintf(`{"desired":%s,"reported":%s}`, withVersion(desired, max(dv, 1)), withVersion(reported, rv))
	c.twinResponse(twinOK, rid, 0, []byte(body))
}

// twinReported applies $iothub/twin/PATCH/properties/reported/?$rid=N: a
// JSON object merged into the reported properties (null removes a
// property). It is answered 204 with the new $version once stored, 400 if
// it is not a JSON object, names a property starting with '$' or nests
// deeper than fleet.MaxModuleTwinDepth, 413 if
// the properties would exceed fleet.MaxModuleTwinReported.
func (c *conn) twinReported(pk packets.Packet) {
	c.h.stats.twinReportedPatch.Add(1)
	rid, ok := twinQuery(pk.TopicName, topicTwinReported)
	if !ok {
		c.h.log.Info("twin patch without $rid ignored", "module", c.mod.name, "topic", mqttconn.Truncate(pk.TopicName, 200))
		return
	}
	patch, err := decodeObject(pk.Payload)
	if err == nil {
		err = checkPropertyNames(patch)
	}
	if err == nil && fleet.NestingDepth(pk.Payload)-1 > fleet.MaxModuleTwinDepth {
		// A merge nests no deeper than the patch, so the twin stays within.
		err = fmt.Errorf("reported properties nest deeper than %d levels", fleet.MaxModuleTwinDepth)
	}
	if err != nil {
		c.h.log.Info("reported properties patch refused", "module", c.mod.name, "error", err)
		c.twinResponse(twinBad, rid, 0, nil)
		return
	}
	m := c.mod
	m.mu.Lock()
	reported, _ := decodeObject(m.twin.Reported)
	if reported == nil {
		reported = map[string]any{}
	}
	mergePatch(reported, patch)
	next, _ := json.Marshal(reported)
	if len(next) > fleet.MaxModuleTwinReported {
		m.mu.Unlock()
		c.h.log.Info("reported properties patch refused: too large", "module", m.name, "bytes", len(next), "limit", fleet.MaxModuleTwinReported)
		c.twinResponse(twinTooLarge, rid, 0, nil)
		return
	}
	m.twin.Reported = next
	m.twin.ReportedVersion = max(m.twin.ReportedVersion, 1) + 1
	version := m.twin.ReportedVersion
	state, _ := json.Marshal(m.twin)
	m.mu.Unlock()
	name := []byte(m.name)
	c.h.store.do(func(tx *bolt.Tx) error { return tx.Bucket(bucketTwins).Put(name, state) }, func(err error) {
		if err != nil {
			c.twinResponse(twinServerErr, rid, 0, nil)
			return
		}
		c.twinResponse(twinNoContent, rid, version, nil)
		c.h.changed()
	})
}

// checkPropertyNames refuses names IoT Hub reserves ('$' first) and
// empty ones, at any depth.
func checkPropertyNames(obj map[string]any) error {
	for k, v := range obj {
		if k == "" || strings.HasPrefix(k, "$") || strings.ContainsAny(k, ". ") {
			return fmt.Errorf("property name %q: must not be empty, start with '$' or hold '.' or ' '", k)
		}
		if sub, ok := v.(map[string]any); ok {
			if err := checkPropertyNames(sub); err != nil {
				return err
			}
		}
	}
	return nil
}
