package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"appliance/fleet"
)

// fakeBackend is a Backend made of functions: each test sets the ones its
// requests should reach. A call to one left nil answers errNotExpected
// (a 500), and every call is counted, so a test also sees that a refused
// request never reached the backend. A fake, because the handlers are
// under test here, not a node: the node's own tests run the real one.
type fakeBackend struct {
	mu    sync.Mutex
	calls []string

	putDevice           func(ctx context.Context, id string, req DeviceRequest, opts WriteOptions) (fleet.Device, bool, error)
	patchDevice         func(ctx context.Context, id string, p DevicePatch, opts WriteOptions) (fleet.Device, error)
	deleteDevice        func(ctx context.Context, id string, opts WriteOptions) error
	device              func(ctx context.Context, id string, consistent bool) (DeviceView, error)
	devices             func(ctx context.Context, q DeviceQuery) (DevicePage, error)
	putDeployment       func(ctx context.Context, id string, req DeploymentRequest, opts WriteOptions) (DeploymentView, bool, error)
	dryRunDeployment    func(ctx context.Context, id string, req DeploymentRequest) (DryRunResult, error)
	patchDeployment     func(ctx context.Context, id string, p DeploymentPatch, opts WriteOptions) (DeploymentView, error)
	deleteDeployment    func(ctx context.Context, id string, opts WriteOptions) error
	deployment          func(ctx context.Context, id string, consistent bool) (DeploymentView, error)
	deployments         func(ctx context.Context, q DeploymentQuery) (DeploymentPage, error)
	deploymentStatus    func(ctx context.Context, id string, q StatusQuery) (DeploymentStatus, error)
	history             func(ctx context.Context, deployment bool, id string, limit int) (HistoryPage, error)
	regenerateDeviceKey func(ctx context.Context, id, which string) (fleet.Device, error)
	putEnrollment       func(ctx context.Context, name string, req EnrollmentRequest, opts WriteOptions) (fleet.Enrollment, bool, error)
	deleteEnrollment    func(ctx context.Context, name string, revokeDevices bool, opts WriteOptions) ([]string, error)
	rotateEnrollment    func(ctx context.Context, name string, req RotateEnrollmentRequest, opts WriteOptions) (EnrollmentRotation, error)
	enrollment          func(ctx context.Context, name string) (fleet.Enrollment, error)
	enrollments         func(ctx context.Context) ([]fleet.Enrollment, error)
	cluster             func(ctx context.Context) (ClusterView, error)
	removeClusterMember func(ctx context.Context, id string) (MemberRemoval, error)
	rotateAdminToken    func(ctx context.Context) (string, error)
	rotateJoinToken     func(ctx context.Context) (string, error)
	backup              func(ctx context.Context) (io.ReadCloser, int64, error)
	overview            func(ctx context.Context) (Overview, error)
	checkCondition      func(ctx context.Context, req ConditionRequest) (ConditionCheck, error)
	dryRunPatch         func(ctx context.Context, id string, patch DeploymentPatch) (DryRunResult, error)
	dryRunDelete        func(ctx context.Context, id string) (DryRunResult, error)
	rolloutStatus       func(ctx context.Context, id string, consistent bool) (fleet.RolloutStatus, error)
	rolloutAction       func(ctx context.Context, id string, req RolloutActionRequest) (fleet.RolloutStatus, error)
	resetDevice         func(ctx context.Context, id string, opts WriteOptions) (fleet.Device, error)
	importDevices       func(ctx context.Context, body io.Reader, opts ImportOptions) (ImportSummary, error)
	exportDevices       func(ctx context.Context, fn func(fleet.Device) error) error
	health              func() Health
	ready               func(ctx context.Context) error
	// hub holds the device hub's routes' functions (hub_test.go).
	hub hubFuncs
}

var _ Backend = (*fakeBackend)(nil)

var errNotExpected = errors.New("fakeBackend: this call was not expected by the test")

// record counts a call to name, and refuses it when the test did not set
// its function.
func (b *fakeBackend) record(name string, set bool) error {
	b.mu.Lock()
	b.calls = append(b.calls, name)
	b.mu.Unlock()
	if !set {
		return fmt.Errorf("%w: %s", errNotExpected, name)
	}
	return nil
}

// Calls lists the backend methods called so far.
func (b *fakeBackend) Calls() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.calls...)
}

func (b *fakeBackend) PutDevice(ctx context.Context, id string, req DeviceRequest, opts WriteOptions) (fleet.Device, bool, error) {
	if err := b.record("PutDevice", b.putDevice != nil); err != nil {
		return fleet.Device{}, false, err
	}
	return b.putDevice(ctx, id, req, opts)
}

func (b *fakeBackend) PatchDevice(ctx context.Context, id string, p DevicePatch, opts WriteOptions) (fleet.Device, error) {
	if err := b.record("PatchDevice", b.patchDevice != nil); err != nil {
		return fleet.Device{}, err
	}
	return b.patchDevice(ctx, id, p, opts)
}

func (b *fakeBackend) DeleteDevice(ctx context.Context, id string, opts WriteOptions) error {
	if err := b.record("DeleteDevice", b.deleteDevice != nil); err != nil {
		return err
	}
	return b.deleteDevice(ctx, id, opts)
}

func (b *fakeBackend) Device(ctx context.Context, id string, consistent bool) (DeviceView, error) {
	if err := b.record("Device", b.device != nil); err != nil {
		return DeviceView{}, err
	}
	return b.device(ctx, id, consistent)
}

func (b *fakeBackend) Devices(ctx context.Context, q DeviceQuery) (DevicePage, error) {
	if err := b.record("Devices", b.devices != nil); err != nil {
		return DevicePage{}, err
	}
	return b.devices(ctx, q)
}

func (b *fakeBackend) PutDeployment(ctx context.Context, id string, req DeploymentRequest, opts WriteOptions) (DeploymentView, bool, error) {
	if err := b.record("PutDeployment", b.putDeployment != nil); err != nil {
		return DeploymentView{}, false, err
	}
	return b.putDeployment(ctx, id, req, opts)
}

func (b *fakeBackend) DryRunDeployment(ctx context.Context, id string, req DeploymentRequest, _ DryRunQuery) (DryRunResult, error) {
	if err := b.record("DryRunDeployment", b.dryRunDeployment != nil); err != nil {
		return DryRunResult{}, err
	}
	return b.dryRunDeployment(ctx, id, req)
}

func (b *fakeBackend) PatchDeployment(ctx context.Context, id string, p DeploymentPatch, opts WriteOptions) (DeploymentView, error) {
	if err := b.record("PatchDeployment", b.patchDeployment != nil); err != nil {
		return DeploymentView{}, err
	}
	return b.patchDeployment(ctx, id, p, opts)
}

func (b *fakeBackend) DeleteDeployment(ctx context.Context, id string, opts WriteOptions) error {
	if err := b.record("DeleteDeployment", b.deleteDeployment != nil); err != nil {
		return err
	}
	return b.deleteDeployment(ctx, id, opts)
}

func (b *fakeBackend) Deployment(ctx context.Context, id string, consistent bool) (DeploymentView, error) {
	if err := b.record("Deployment", b.deployment != nil); err != nil {
		return DeploymentView{}, err
	}
	return b.deployment(ctx, id, consistent)
}

func (b *fakeBackend) Deployments(ctx context.Context, q DeploymentQuery) (DeploymentPage, error) {
	if err := b.record("Deployments", b.deployments != nil); err != nil {
		return DeploymentPage{}, err
	}
	return b.deployments(ctx, q)
}

func (b *fakeBackend) DeploymentStatus(ctx context.Context, id string, q StatusQuery) (DeploymentStatus, error) {
	if err := b.record("DeploymentStatus", b.deploymentStatus != nil); err != nil {
		return DeploymentStatus{}, err
	}
	return b.deploymentStatus(ctx, id, q)
}

func (b *fakeBackend) History(ctx context.Context, deployment bool, id string, limit int) (HistoryPage, error) {
	if err := b.record("History", b.history != nil); err != nil {
		return HistoryPage{}, err
	}
	return b.history(ctx, deployment, id, limit)
}

func (b *fakeBackend) RegenerateDeviceKey(ctx context.Context, id, which string) (fleet.Device, error) {
	if err := b.record("RegenerateDeviceKey", b.regenerateDeviceKey != nil); err != nil {
		return fleet.Device{}, err
	}
	return b.regenerateDeviceKey(ctx, id, which)
}

func (b *fakeBackend) ResetDevice(ctx context.Context, id string, opts WriteOptions) (fleet.Device, error) {
	if err := b.record("ResetDevice", b.resetDevice != nil); err != nil {
		return fleet.Device{}, err
	}
	return b.resetDevice(ctx, id, opts)
}

func (b *fakeBackend) PutEnrollment(ctx context.Context, name string, req EnrollmentRequest, opts WriteOptions) (fleet.Enrollment, bool, error) {
	if err := b.record("PutEnrollment", b.putEnrollment != nil); err != nil {
		return fleet.Enrollment{}, false, err
	}
	return b.putEnrollment(ctx, name, req, opts)
}

func (b *fakeBackend) DeleteEnrollment(ctx context.Context, name string, revokeDevices bool, opts WriteOptions) ([]string, error) {
	if err := b.record("DeleteEnrollment", b.deleteEnrollment != nil); err != nil {
		return nil, err
	}
	return b.deleteEnrollment(ctx, name, revokeDevices, opts)
}

func (b *fakeBackend) RotateEnrollment(ctx context.Context, name string, req RotateEnrollmentRequest, opts WriteOptions) (EnrollmentRotation, error) {
	if err := b.record("RotateEnrollment", b.rotateEnrollment != nil); err != nil {
		return EnrollmentRotation{}, err
	}
	return b.rotateEnrollment(ctx, name, req, opts)
}

func (b *fakeBackend) Enrollment(ctx context.Context, name string) (fleet.Enrollment, error) {
	if err := b.record("Enrollment", b.enrollment != nil); err != nil {
		return fleet.Enrollment{}, err
	}
	return b.enrollment(ctx, name)
}

func (b *fakeBackend) Enrollments(ctx context.Context) ([]fleet.Enrollment, error) {
	if err := b.record("Enrollments", b.enrollments != nil); err != nil {
		return nil, err
	}
	return b.enrollments(ctx)
}

func (b *fakeBackend) Cluster(ctx context.Context) (ClusterView, error) {
	if err := b.record("Cluster", b.cluster != nil); err != nil {
		return ClusterView{}, err
	}
	return b.cluster(ctx)
}

func (b *fakeBackend) RemoveClusterMember(ctx context.Context, id string) (MemberRemoval, error) {
	if err := b.record("RemoveClusterMember", b.removeClusterMember != nil); err != nil {
		return MemberRemoval{}, err
	}
	return b.removeClusterMember(ctx, id)
}

func (b *fakeBackend) RotateAdminToken(ctx context.Context) (string, error) {
	if err := b.record("RotateAdminToken", b.rotateAdminToken != nil); err != nil {
		return "", err
	}
	return b.rotateAdminToken(ctx)
}

func (b *fakeBackend) RotateJoinToken(ctx context.Context) (string, error) {
	if err := b.record("RotateJoinToken", b.rotateJoinToken != nil); err != nil {
		return "", err
	}
	return b.rotateJoinToken(ctx)
}

func (b *fakeBackend) Backup(ctx context.Context) (io.ReadCloser, int64, error) {
	if err := b.record("Backup", b.backup != nil); err != nil {
		return nil, 0, err
	}
	return b.backup(ctx)
}

func (b *fakeBackend) Overview(ctx context.Context) (Overview, error) {
	if err := b.record("Overview", b.overview != nil); err != nil {
		return Overview{}, err
	}
	return b.overview(ctx)
}

func (b *fakeBackend) CheckCondition(ctx context.Context, req ConditionRequest) (ConditionCheck, error) {
	if err := b.record("CheckCondition", b.checkCondition != nil); err != nil {
		return ConditionCheck{}, err
	}
	return b.checkCondition(ctx, req)
}

func (b *fakeBackend) DryRunPatchDeployment(ctx context.Context, id string, patch DeploymentPatch, _ DryRunQuery) (DryRunResult, error) {
	if err := b.record("DryRunPatchDeployment", b.dryRunPatch != nil); err != nil {
		return DryRunResult{}, err
	}
	return b.dryRunPatch(ctx, id, patch)
}

func (b *fakeBackend) DryRunDeleteDeployment(ctx context.Context, id string, _ DryRunQuery) (DryRunResult, error) {
	if err := b.record("DryRunDeleteDeployment", b.dryRunDelete != nil); err != nil {
		return DryRunResult{}, err
	}
	return b.dryRunDelete(ctx, id)
}

// Health and Ready answer ok unless the test says otherwise: every
// server asks them.
func (b *fakeBackend) Health() Health {
	if b.health == nil {
		return Health{Status: "ok", NodeID: "fake", Raft: "Leader", Version: "test"}
	}
	return b.health()
}

func (b *fakeBackend) Ready(ctx context.Context) error {
	if b.ready == nil {
		return nil
	}
	return b.ready(ctx)
}

func (b *fakeBackend) RolloutStatus(ctx context.Context, id string, consistent bool) (fleet.RolloutStatus, error) {
	if err := b.record("RolloutStatus", b.rolloutStatus != nil); err != nil {
		return fleet.RolloutStatus{}, err
	}
	return b.rolloutStatus(ctx, id, consistent)
}

func (b *fakeBackend) RolloutAction(ctx context.Context, id string, req RolloutActionRequest) (fleet.RolloutStatus, error) {
	if err := b.record("RolloutAction", b.rolloutAction != nil); err != nil {
		return fleet.RolloutStatus{}, err
	}
	return b.rolloutAction(ctx, id, req)
}

func (b *fakeBackend) ImportDevices(ctx context.Context, body io.Reader, opts ImportOptions) (ImportSummary, error) {
	if err := b.record("ImportDevices", b.importDevices != nil); err != nil {
		return ImportSummary{}, err
	}
	return b.importDevices(ctx, body, opts)
}

func (b *fakeBackend) ExportDevices(ctx context.Context, fn func(fleet.Device) error) error {
	if err := b.record("ExportDevices", b.exportDevices != nil); err != nil {
		return err
	}
	return b.exportDevices(ctx, fn)
}
