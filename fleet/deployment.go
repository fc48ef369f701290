package fleet

import (
	"encoding/json"
	"time"
)

// Deployment is an automatic deployment: a module manifest, the condition
// that selects its devices, and its priority. It follows the Azure IoT Hub
// configuration object so that Azure users can bring their files.
type Deployment struct {
	ID              string            `json:"id"`
	Labels          map[string]string `json:"labels,omitempty"`
	Content         json.RawMessage   `json:"content"`
	TargetCondition string            `json:"targetCondition"`
	Priority        int64             `json:"priority"`
	Metrics         Metrics           `json:"metrics"`
	Layered         bool              `json:"layered,omitempty"`
	// Rollout, when set, makes the deployment reach its devices in waves
	// (see RolloutPolicy); stored normalized.
	Rollout            *RolloutPolicy `json:"rollout,omitempty"`
	CreatedTimeUTC     time.Time      `json:"createdTimeUtc"`
	LastUpdatedTimeUTC time.Time      `json:"lastUpdatedTimeUtc"`
	Etag               string         `json:"etag"`
}

// Metrics holds a deployment's custom metric queries, name → condition.
type Metrics struct {
	Queries map[string]string `json:"queries,omitempty"`
}

// Public returns a copy of d that is safe to return to a reader: secrets in
// the content (registry passwords, secret-looking env values and module
// twin properties, connection strings) are redacted by RedactContent.
func (d Deployment) Public() Deployment {
	if len(d.Content) > 0 {
		d.Content = RedactContent(d.Content)
	}
	return d
}

// ValidateDeploymentID checks Azure's configuration-id rules: 1 to 128
// lowercase letters, digits and - + % _ * ! ' .
func ValidateDeploymentID(id string) error {
	if id == "" {
		return Invalid("id", "must not be empty")
	}
	if len(id) > MaxIDLength {
		return Invalid("id", "is %d characters long; at most %d are allowed", len(id), MaxIDLength)
	}
	for i, r := range id {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			continue
		case r >= 'A' && r <= 'Z':
			return Invalid("id", "must be lowercase; character %q at position %d is uppercase", r, i+1)
		}
		switch r {
		case '-', '+', '%', '_', '*', '!', '\'', '.':
			continue
		}
		return Invalid("id", "character %q at position %d is not allowed (lowercase letters, digits and - + %% _ * ! ' . are)", r, i+1)
	}
	return nil
}

// ValidatePriority: a priority is a non-negative integer.
func ValidatePriority(p int64) error {
	if p < 0 {
		return Invalid("priority", "must be a non-negative integer; got %d", p)
	}
	return nil
}

// ValidateLabels: label keys must be non-empty.
func ValidateLabels(labels map[string]string) error {
	for k := range labels {
		if k == "" {
			return Invalid("labels", "a label name must not be empty")
		}
	}
	return nil
}
