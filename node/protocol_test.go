package node

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"appliance/api"
	"appliance/fleet"
	"appliance/internal/testutil"
	"appliance/raftstore"
)

// mqttDevice is a real MQTT 5 client (Eclipse Paho) playing a device.
type mqttDevice struct {
	id   string
	c    *paho.Client
	msgs chan *paho.Publish
}

func connectDevice(t *testing.T, addr, id, key string) (*mqttDevice, error) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	d := &mqttDevice{id: id, msgs: make(chan *paho.Publish, 16)}
	d.c = paho.NewClient(paho.ClientConfig{
		Conn: conn,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			select {
			case d.msgs <- pr.Packet:
			default:
			}
			return true, nil
		}},
		PacketTimeout: 10 * time.Second,
	})
	receiveMax := uint16(16)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := d.c.Connect(ctx, &paho.Connect{
		ClientID: id, Username: id, UsernameFlag: true, Password: []byte(key), PasswordFlag: true,
		KeepAlive: 60, CleanStart: true, Properties: &paho.ConnectProperties{ReceiveMaximum: &receiveMax},
	}); err != nil {
		conn.Close()
		return nil, err
	}
	t.Cleanup(func() { d.c.Disconnect(&paho.Disconnect{}) })
	return d, nil
}

func (d *mqttDevice) subscribeDesired(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.WaitTimeout)
	defer cancel()
	if _, err := d.c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: fleet.DesiredTopic(d.id), QoS: 1}}}); err != nil {
		t.Fatal(err)
	}
}

func (d *mqttDevice) nextDesired(t *testing.T) fleet.DesiredDocument {
	t.Helper()
	select {
	case m := <-d.msgs:
		var doc fleet.DesiredDocument
		if err := json.Unmarshal(m.Payload, &doc); err != nil {
			t.Fatalf("%s: desired document %s: %v", d.id, m.Payload, err)
		}
		return doc
	case <-time.After(testutil.WaitTimeout):
		t.Fatalf("%s: no desired document within %s", d.id, testutil.WaitTimeout)
		return fleet.DesiredDocument{}
	}
}

func createDevice(t *testing.T, c *api.Client, id string, tags map[string]any) string {
	t.Helper()
	d, err := c.PutDevice(context.Background(), id, api.DeviceRequest{Tags: tags}, api.WriteOptions{IfNoneMatch: "*"})
	if err != nil {
		t.Fatal(err)
	}
	return d.Authentication.SymmetricKey.PrimaryKey
}

// TestDeviceProtocol follows one device through the node's broker: it
// authenticates with its key, gets an explicit empty desired state, gets
// the deployment that starts to apply to it without reconnecting, and its
// report reaches the replicated state.
func TestDeviceProtocol(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	key := createDevice(t, c, "press-01", map[string]any{"environment": "test"})

	if _, err := connectDevice(t, n.MQTTAddr(), "press-01", "wrong-key"); err == nil {
		t.Fatal("a wrong key was accepted")
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "ghost", key); err == nil {
		t.Fatal("an unknown device was accepted")
	}

	dev, err := connectDevice(t, n.MQTTAddr(), "press-01", key)
	if err != nil {
		t.Fatal(err)
	}
	dev.subscribeDesired(t)
	if doc := dev.nextDesired(t); doc.DeploymentID != "" || len(doc.ModulesContent) != 0 || doc.SchemaVersion != fleet.DocumentSchema {
		t.Fatalf("a device with no deployment got %+v", doc)
	}
	if _, err := c.PutDeployment(ctx, "prod", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.environment='prod'", Priority: 5}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	// A tag change makes the deployment apply; the connected device gets it.
	if _, err := c.PatchDevice(ctx, "press-01", api.DevicePatch{Tags: map[string]any{"environment": "prod"}}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	doc := dev.nextDesired(t)
	if doc.DeploymentID != "prod" || doc.Version == 0 || len(doc.ModulesContent) == 0 {
		t.Fatalf("desired after the tag change: %+v", doc)
	}
	// The device gets its registry credentials: it needs them to pull.
	if !json.Valid(doc.ModulesContent) || !strings.Contains(string(doc.ModulesContent), "hunter2-secret") {
		t.Fatalf("desired document lacks the registry credentials the agent needs: %s", doc.ModulesContent)
	}
	first := doc.Version

	// A higher-priority deployment takes over: a newer version arrives.
	if _, err := c.PutDeployment(ctx, "prod-canary", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.environment='prod'", Priority: 9}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if doc := dev.nextDesired(t); doc.DeploymentID != "prod-canary" || doc.Version <= first {
		t.Fatalf("desired after a higher priority deployment: %+v (first version %d)", doc, first)
	}

	report := fmt.Sprintf(`{"lastDesiredVersion":%d,"lastDesiredStatus":{"code":200},"modules":{}}`, first)
	if _, err := dev.c.Publish(ctx, &paho.Publish{Topic: fleet.ReportedTopic("press-01"), QoS: 1, Payload: []byte(report)}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		v, err := c.Device(ctx, "press-01", false)
		if err != nil {
			t.Fatal(err)
		}
		if v.Reported != nil && sameJSON(v.Reported.Document, report) {
			if v.ConnectionState != api.Connected || v.LastActivityTime == nil {
				t.Fatalf("connection state %q, last activity %v", v.ConnectionState, v.LastActivityTime)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("report never reached the state; device view %+v", v)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// Disabling the device disconnects it at once.
	if _, err := c.PatchDevice(ctx, "press-01", api.DevicePatch{Status: fleet.DeviceDisabled}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		v, _ := c.Device(ctx, "press-01", false)
		if v.ConnectionState == api.Disconnected {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a disabled device stayed connected")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "press-01", key); err == nil {
		t.Fatal("a disabled device could connect")
	}
}

// TestReportsAreBatched has 500 devices publish a report at the same
// moment and checks that they reach the replicated state as one raft
// entry, not 500. The batcher's timer is set far away so that the test
// decides when the batch goes (it counts entries, never time): the batch
// is flushed once all 500 are waiting.
func TestReportsAreBatched(t *testing.T) {
	if testing.Short() {
		t.Skip("500 MQTT connections: not in -short")
	}
	n := startNodeWith(t, t.TempDir(), func(c *Config) { c.ReportFlushInterval = time.Hour })
	c := clientFor(n)
	const count = 500
	devs := make([]*mqttDevice, count)
	for i := range devs {
		id := fmt.Sprintf("dev-%03d", i)
		key := createDevice(t, c, id, nil)
		d, err := connectDevice(t, n.MQTTAddr(), id, key)
		if err != nil {
			t.Fatal(err)
		}
		devs[i] = d
	}
	before := n.reports.Stats().Batches
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, d := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			payload := fmt.Sprintf(`{"lastDesiredVersion":%d,"lastDesiredStatus":{"code":200},"modules":{}}`, i)
			if _, err := d.c.Publish(context.Background(), &paho.Publish{Topic: fleet.ReportedTopic(d.id), QoS: 1, Payload: []byte(payload)}); err != nil {
				t.Errorf("%s publish: %v", d.id, err)
			}
		}()
	}
	close(start)
	wg.Wait()
	waitFor(t, "all 500 reports waiting for the batch", func() bool { return n.reports.Stats().Pending == count })
	n.reports.Flush()
	waitFor(t, "the batch committed", func() bool { return n.reports.Stats().Committed == count })
	if got := n.reports.Stats().Batches - before; got != 1 {
		t.Fatalf("%d reports went to raft in %d entries, want 1", count, got)
	}
	// Every device's own report is what the state holds.
	for i := 0; i < count; i += 97 {
		v, err := c.Device(context.Background(), fmt.Sprintf("dev-%03d", i), false)
		want := fmt.Sprintf(`{"lastDesiredVersion":%d,"lastDesiredStatus":{"code":200},"modules":{}}`, i)
		if err != nil || v.Reported == nil || !sameJSON(v.Reported.Document, want) {
			t.Fatalf("device %d reported %+v err %v", i, v.Reported, err)
		}
	}
}

// TestReportNestedTooDeep: a report nested 9,990 deep is valid JSON on its
// own, but not inside what carries it further (encoding/json's limit is
// 10,000 levels): before the broker refused it, it was stored, and the
// device's page could no longer be read (the API's answer nests it deeper).
// Now it is dropped at intake and counted, and the other devices' reports
// go through.
func TestReportNestedTooDeep(t *testing.T) {
	n := startNodeWith(t, t.TempDir(), func(c *Config) { c.ReportFlushInterval = time.Hour })
	c := clientFor(n)
	publish := func(id, doc string) {
		t.Helper()
		d, err := connectDevice(t, n.MQTTAddr(), id, createDevice(t, c, id, nil))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.c.Publish(context.Background(), &paho.Publish{Topic: fleet.ReportedTopic(id), QoS: 1, Payload: []byte(doc)}); err != nil {
			t.Fatalf("%s publish: %v", id, err)
		}
	}
	publish("deep", strings.Repeat(`{"a":`, 9990)+`{}`+strings.Repeat(`}`, 9990))
	calm := `{"lastDesiredVersion":1,"lastDesiredStatus":{"code":200},"modules":{}}`
	publish("calm", calm)
	waitFor(t, "calm's report committed", func() bool {
		n.reports.Flush()
		v, err := c.Device(context.Background(), "calm", false)
		return err == nil && v.Reported != nil && sameJSON(v.Reported.Document, calm)
	})
	if v, err := c.Device(context.Background(), "deep", false); err != nil || v.Reported != nil {
		t.Fatalf("the deep report was stored (%v)", err)
	}
	if got := n.broker.Stats().ReportsDropped; got != 1 {
		t.Fatalf("reports dropped: %d, want 1", got)
	}
}

// sameJSON compares two JSON texts by value.
func sameJSON(a json.RawMessage, b string) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal([]byte(b), &y) != nil {
		return false
	}
	return mustJSON(x) == mustJSON(y)
}

// TestEnrollment has a new device register itself with an enrollment's
// token: it proves it holds the token with the key the token derives for
// its id and brings a key of its own, gets the enrollment's tags, and the
// deployment for those tags applies at once. It is registered with its own
// key only: the derived key, which every holder of the token can compute,
// opens it no more, so a sibling cannot impersonate it.
func TestEnrollment(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	e, err := c.PutEnrollment(ctx, "line-3", api.EnrollmentRequest{Tags: map[string]any{"environment": "prod", "line": 3}}, api.WriteOptions{IfNoneMatch: "*"})
	if err != nil || e.Token == "" {
		t.Fatalf("create enrollment: %+v %v", e, err)
	}
	if got, _ := c.Enrollment(ctx, "line-3"); got.Token != "" || got.DerivationKey != "" {
		t.Fatalf("a read shows the enrollment's secret: %+v", got)
	}
	if _, err := c.PutDeployment(ctx, "prod", api.DeploymentRequest{Content: json.RawMessage(manifest), TargetCondition: "tags.environment='prod'"}, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	own := testutil.NewKey(t)

	// A key derived for another device id, or from another token, fails.
	other, _ := fleet.DeriveDeviceKey(e.Token, "someone-else")
	if _, err := connectDevice(t, n.MQTTAddr(), "new-press", fleet.EnrollmentKey(other, own)); err == nil {
		t.Fatal("a key derived for another device enrolled this one")
	}
	// The derived key alone (an agent of an older release) enrolls nothing.
	derived, err := fleet.DeriveDeviceKey(e.Token, "new-press")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "new-press", derived); err == nil {
		t.Fatal("the derived key alone enrolled the device")
	}
	// Nor does a weak own key.
	if _, err := connectDevice(t, n.MQTTAddr(), "new-press", fleet.EnrollmentKey(derived, "short")); err == nil {
		t.Fatal("a device enrolled with a weak own key")
	}
	if _, err := c.Device(ctx, "new-press", false); err == nil {
		t.Fatal("a refused enrollment registered the device")
	}

	dev, err := connectDevice(t, n.MQTTAddr(), "new-press", fleet.EnrollmentKey(derived, own))
	if err != nil {
		t.Fatalf("enroll: %v", err)
	}
	dev.subscribeDesired(t)
	if doc := dev.nextDesired(t); doc.DeploymentID != "prod" {
		t.Fatalf("enrolled device got %+v", doc)
	}
	v, err := c.Device(ctx, "new-press", true)
	if err != nil || v.Tags["line"] != 3.0 || v.Configurations["prod"].Status != api.StatusApplied || v.Enrollment != "line-3" {
		t.Fatalf("enrolled device %+v %v", v, err)
	}
	dev.c.Disconnect(&paho.Disconnect{})

	// A sibling holds the same token, so it computes new-press's derived
	// key; with that and any key of its own it is refused, alone too.
	if _, err := connectDevice(t, n.MQTTAddr(), "new-press", fleet.EnrollmentKey(derived, testutil.NewKey(t))); err == nil {
		t.Fatal("a sibling with the token impersonated the enrolled device")
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "new-press", derived); err == nil {
		t.Fatal("the derived key opens the enrolled device")
	}
	// The device itself reconnects with its own key, alone or with the
	// proof (an agent sends both every time).
	for _, key := range []string{own, fleet.EnrollmentKey(derived, own)} {
		d, err := connectDevice(t, n.MQTTAddr(), "new-press", key)
		if err != nil {
			t.Fatalf("the enrolled device reconnects: %v", err)
		}
		d.c.Disconnect(&paho.Disconnect{})
	}

	// Rotating the primary key: the device's own key stops working.
	rot, err := c.RegenerateDeviceKey(ctx, "new-press", "primary")
	if err != nil || rot.Authentication.SymmetricKey == nil || rot.Authentication.SymmetricKey.PrimaryKey == "" {
		t.Fatalf("regenerate: %+v %v", rot, err)
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "new-press", fleet.EnrollmentKey(derived, own)); err == nil {
		t.Fatal("the replaced key still works")
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "new-press", rot.Authentication.SymmetricKey.PrimaryKey); err != nil {
		t.Fatalf("the new key: %v", err)
	}
}

// TestEnrollment_RotateAndDeleteRevokeTheToken: rotating an enrollment
// stops its old token enrolling at once while its devices go on; with
// --revoke-devices their sessions end and their keys stop working; a
// deleted enrollment's token enrolls nothing, and deleting with
// --revoke-devices cuts its devices off too.
func TestEnrollment_RotateAndDeleteRevokeTheToken(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	e, err := c.PutEnrollment(ctx, "line-1", api.EnrollmentRequest{Tags: map[string]any{"line": 1}}, api.WriteOptions{IfNoneMatch: "*"})
	if err != nil {
		t.Fatal(err)
	}
	enroll := func(token, id, own string) (*mqttDevice, error) {
		derived, err := fleet.DeriveDeviceKey(token, id)
		if err != nil {
			t.Fatal(err)
		}
		return connectDevice(t, n.MQTTAddr(), id, fleet.EnrollmentKey(derived, own))
	}
	ownA := testutil.NewKey(t)
	a, err := enroll(e.Token, "dev-a", ownA)
	if err != nil {
		t.Fatal(err)
	}

	rot, err := c.RotateEnrollment(ctx, "line-1", api.RotateEnrollmentRequest{}, api.WriteOptions{})
	if err != nil || rot.Token == "" || rot.Token == e.Token || rot.DerivationKey != "" || len(rot.RevokedDevices) != 0 {
		t.Fatalf("rotate: %+v %v", rot, err)
	}
	if _, err := enroll(e.Token, "dev-b", testutil.NewKey(t)); err == nil {
		t.Fatal("the rotated-out token enrolled a device")
	}
	ownB := testutil.NewKey(t)
	if _, err := enroll(rot.Token, "dev-b", ownB); err != nil {
		t.Fatalf("the new token: %v", err)
	}
	select {
	case <-a.c.Done():
		t.Fatal("a rotation without --revoke-devices ended a device's session")
	default:
	}

	// Revoking: both devices' sessions end, and neither key opens them.
	rot2, err := c.RotateEnrollment(ctx, "line-1", api.RotateEnrollmentRequest{RevokeDevices: true}, api.WriteOptions{})
	if err != nil || !slices.Equal(rot2.RevokedDevices, []string{"dev-a", "dev-b"}) {
		t.Fatalf("rotate --revoke-devices: %+v %v", rot2, err)
	}
	select {
	case <-a.c.Done():
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("a revoked device's session stayed open")
	}
	if _, err := enroll(rot2.Token, "dev-a", ownA); err == nil {
		t.Fatal("a revoked device reconnected (with the current token too)")
	}
	// An operator gives a device keys again.
	if d, err := c.RegenerateDeviceKey(ctx, "dev-a", "primary"); err != nil {
		t.Fatal(err)
	} else if _, err := connectDevice(t, n.MQTTAddr(), "dev-a", d.Authentication.SymmetricKey.PrimaryKey); err != nil {
		t.Fatalf("a revoked device given a new key: %v", err)
	}

	// Deleting: the token enrolls nothing more.
	if _, err := c.DeleteEnrollment(ctx, "line-1", false, api.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := enroll(rot2.Token, "dev-c", testutil.NewKey(t)); err == nil {
		t.Fatal("a deleted enrollment's token enrolled a device")
	}

	// Deleting with --revoke-devices cuts off the devices it registered.
	e2, err := c.PutEnrollment(ctx, "line-2", api.EnrollmentRequest{}, api.WriteOptions{IfNoneMatch: "*"})
	if err != nil {
		t.Fatal(err)
	}
	ownD := testutil.NewKey(t)
	d, err := enroll(e2.Token, "dev-d", ownD)
	if err != nil {
		t.Fatal(err)
	}
	del, err := c.DeleteEnrollment(ctx, "line-2", true, api.WriteOptions{})
	if err != nil || !slices.Equal(del.RevokedDevices, []string{"dev-d"}) {
		t.Fatalf("delete --revoke-devices: %+v %v", del, err)
	}
	select {
	case <-d.c.Done():
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("a device of a deleted, revoked enrollment stayed connected")
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "dev-d", ownD); err == nil {
		t.Fatal("a revoked device reconnected")
	}
}

// TestEnrollment_OlderDeviceAdoptsItsOwnKey: a device registered before
// devices brought their own key holds the derived key, which its siblings
// can compute. When its agent presents the derived key with a key of its
// own, that key replaces the derived one, which opens the device no more.
func TestEnrollment_OlderDeviceAdoptsItsOwnKey(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	e, err := c.PutEnrollment(ctx, "line-1", api.EnrollmentRequest{}, api.WriteOptions{IfNoneMatch: "*"})
	if err != nil {
		t.Fatal(err)
	}
	derived, _ := fleet.DeriveDeviceKey(e.Token, "old-press")
	// As the previous release enrolled it: the derived key is its primary.
	if _, err := n.store.Apply(ctx, raftstore.PutDevice{Time: time.Now(), Device: fleet.Device{ID: "old-press",
		Authentication: fleet.Authentication{Type: "sas", KeyHashes: &fleet.KeyHashes{Primary: fleet.HashKey(derived), Secondary: fleet.HashKey("x")}}}}); err != nil {
		t.Fatal(err)
	}
	old, err := connectDevice(t, n.MQTTAddr(), "old-press", derived)
	if err != nil {
		t.Fatalf("an older agent with its derived key: %v", err)
	}
	old.c.Disconnect(&paho.Disconnect{})
	own := testutil.NewKey(t)
	if _, err := connectDevice(t, n.MQTTAddr(), "old-press", fleet.EnrollmentKey(derived, own)); err != nil {
		t.Fatalf("adopting its own key: %v", err)
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "old-press", derived); err == nil {
		t.Fatal("the derived key still opens the device after it adopted its own")
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "old-press", own); err != nil {
		t.Fatalf("its own key: %v", err)
	}
	if v, err := c.Device(ctx, "old-press", true); err != nil || v.Enrollment != "line-1" {
		t.Fatalf("device after adoption: %+v %v", v, err)
	}
	// A key that no token derives is not replaced this way.
	d, err := c.PutDevice(ctx, "keyed", api.DeviceRequest{}, api.WriteOptions{IfNoneMatch: "*"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "keyed", fleet.EnrollmentKey(d.Authentication.SymmetricKey.PrimaryKey, testutil.NewKey(t))); err == nil {
		t.Fatal("an operator-given key was swapped for a device's own")
	}
}

// TestRegenerateKeyEndsItsSessions: regenerating a device's primary key
// ends, at once, the session that authenticated with it (it does not wait
// for the device to reconnect), refuses the old key afterwards, and leaves
// a session of the secondary key alone (keys rotate one at a time without
// the device going offline).
func TestRegenerateKeyEndsItsSessions(t *testing.T) {
	n := startNode(t, t.TempDir())
	c := clientFor(n)
	ctx := context.Background()
	d, err := c.PutDevice(ctx, "press-01", api.DeviceRequest{}, api.WriteOptions{IfNoneMatch: "*"})
	if err != nil {
		t.Fatal(err)
	}
	primary, secondary := d.Authentication.SymmetricKey.PrimaryKey, d.Authentication.SymmetricKey.SecondaryKey
	dev, err := connectDevice(t, n.MQTTAddr(), "press-01", primary)
	if err != nil {
		t.Fatal(err)
	}
	dev.subscribeDesired(t)
	dev.nextDesired(t)

	if _, err := c.RegenerateDeviceKey(ctx, "press-01", "primary"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-dev.c.Done():
	case <-time.After(testutil.WaitTimeout):
		t.Fatal("the session of the replaced key is still open")
	}
	if _, err := connectDevice(t, n.MQTTAddr(), "press-01", primary); err == nil {
		t.Fatal("the replaced key still connects")
	}

	// The secondary's session survives a regeneration of the primary.
	dev2, err := connectDevice(t, n.MQTTAddr(), "press-01", secondary)
	if err != nil {
		t.Fatal(err)
	}
	dev2.subscribeDesired(t)
	dev2.nextDesired(t)
	if _, err := c.RegenerateDeviceKey(ctx, "press-01", "primary"); err != nil {
		t.Fatal(err)
	}
	report := `{"lastDesiredVersion":0,"modules":{}}`
	if _, err := dev2.c.Publish(ctx, &paho.Publish{Topic: fleet.ReportedTopic("press-01"), QoS: 1, Payload: []byte(report)}); err != nil {
		t.Fatalf("the secondary's session after a primary regeneration: %v", err)
	}
	select {
	case <-dev2.c.Done():
		t.Fatal("regenerating the primary ended the secondary's session")
	default:
	}
}
