package node

import (
	"context"
	"io"

	"appliance/api"
	"appliance/deviceimport"
	"appliance/fleet"
	"appliance/raftstore"
)

// Bulk import and export of device identities (api.ImportBackend) are
// package deviceimport's; the node gives it its store and the deployment
// limits a device's tags are checked against (package deploylimits).

// importStore is the node as an import sees it.
type importStore Node

var _ deviceimport.Store = (*importStore)(nil)

func (s *importStore) Ready() error { return (*Node)(s).servingReads() }

func (s *importStore) CheckCommand(ctx context.Context, t raftstore.CommandType) error {
	if s.store == nil {
		return nil
	}
	return s.store.CheckCommand(ctx, t)
}

func (s *importStore) View(fn func(r *raftstore.Reader) error) error { return s.store.View(fn) }

func (s *importStore) Apply(ctx context.Context, cmd raftstore.Command) (*raftstore.Result, error) {
	return (*backend)(s).apply(ctx, cmd)
}

// ImportDevices implements api.ImportBackend.
func (b *backend) ImportDevices(ctx context.Context, body io.Reader, opts api.ImportOptions) (api.ImportSummary, error) {
	return b.imports.Import(ctx, body, opts)
}

// ExportDevices implements api.ImportBackend.
func (b *backend) ExportDevices(ctx context.Context, fn func(fleet.Device) error) error {
	return b.imports.Export(ctx, fn)
}
