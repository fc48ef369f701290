package deviceimport

import (
	"context"

	"appliance/fleet"
	"appliance/raftstore"
)

// exportPage devices are read per read transaction of an export: a
// long-held read transaction would hold up the state file's growth.
const exportPage = 5000

// Export hands every device, in id order, to fn (api.ImportBackend's
// ExportDevices), exportPage per read transaction of the replica.
func (im *Importer) Export(ctx context.Context, fn func(fleet.Device) error) error {
	after := ""
	for {
		page := make([]fleet.Device, 0, exportPage)
		if err := im.cfg.Store.Ready(); err != nil {
			return err
		}
		err := im.cfg.Store.View(func(r *raftstore.Reader) error {
			return r.Devices(after, func(d fleet.Device) bool {
				page = append(page, d)
				return len(page) < exportPage
			})
		})
		if err != nil {
			return err
		}
		for _, d := range page {
			if err := fn(d); err != nil {
				return err
			}
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if len(page) < exportPage {
			return nil
		}
		after = page[len(page)-1].ID
	}
}
