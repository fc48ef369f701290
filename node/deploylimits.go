package node

import (
	"fmt"
	"time"

	"appliance/fleet"
)

// DefaultOfflineAfter is how long a device may be out of contact before it
// counts as offline (serve --offline-after).
const DefaultOfflineAfter = fleet.DefaultOfflineAfter

// DeploymentLimits bound what one deployment may hold and how many
// deployments reach one device (serve flags; docs in README, "Limits").
// A write over a limit is refused with 400 naming the limit and its flag.
type DeploymentLimits struct {
	// MaxManifestBytes caps a deployment's content, and a device's merged
	// document (base and layers), as compact JSON.
	MaxManifestBytes int
	// MaxModuleDesiredBytes caps one module twin's desired properties
	// (Azure's limit of a module twin's desired section, 512 KB).
	MaxModuleDesiredBytes int
	// MaxModules caps the modules of a deployment, and of a device's
	// merged document (Azure: 50 per deployment).
	MaxModules int
	// MaxDeploymentsPerDevice caps the deployments (bases and layers) a
	// device may be targeted by; MaxLayersPerDevice the layered ones.
	MaxDeploymentsPerDevice int
	MaxLayersPerDevice      int
}

// Defaults of DeploymentLimits.
const (
	DefaultMaxManifestBytes        = 1 << 20
	DefaultMaxModuleDesiredBytes   = 512 << 10
	DefaultMaxModules              = 50
	DefaultMaxDeploymentsPerDevice = 50
	DefaultMaxLayersPerDevice      = 20
)

func (l DeploymentLimits) withDefaults() DeploymentLimits {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&l.MaxManifestBytes, DefaultMaxManifestBytes)
	def(&l.MaxModuleDesiredBytes, DefaultMaxModuleDesiredBytes)
	def(&l.MaxModules, DefaultMaxModules)
	def(&l.MaxDeploymentsPerDevice, DefaultMaxDeploymentsPerDevice)
	def(&l.MaxLayersPerDevice, DefaultMaxLayersPerDevice)
	return l
}

// timeNow is time.Now in UTC, for presence.
func timeNow() time.Time { return time.Now().UTC() }

var _ = fmt.Sprintf
