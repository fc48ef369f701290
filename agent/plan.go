package agent

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"appliance/fleet"
	"appliance/routing"
)

// Module restart policies and statuses of the manifest.
const (
	policyNever       = "never"
	policyOnFailure   = "on-failure"
	policyOnUnhealthy = "on-unhealthy"
	policyAlways      = "always"

	statusRunning = "running"
	statusStopped = "stopped"

	pullOnCreate = "on-create"
	pullNever    = "never"

	// defaultStartupOrder is the schema's value for a module without one:
	// it starts after every module that has one.
	defaultStartupOrder = math.MaxUint32
)

// plan is a validated desired document, ready to reconcile.
type plan struct {
	version      uint64
	deploymentID string
	// layers are the layered deployments the controller merged into the
	// document (echoed in the report, so that status knows which
	// document the report is about).
	layers []string
	// modules are the desired modules by name; empty for an empty desired
	// state (no deployment applies), which removes every module.
	modules map[string]*moduleSpec
	// systemModules echoes $edgeAgent's systemModules (edgeAgent, edgeHub).
	systemModules map[string]systemModule
	// credentials are the registry credentials of runtime.settings.
	credentials []registryCredential
	// The device hub's part: $edgeHub's routes and store-and-forward time
	// to live, and each module's desired properties (modulesContent's
	// {module: {"properties.desired": ...}}).
	routes []*routing.Route
	ttl    time.Duration
	twins  map[string]json.RawMessage
	// secrets are the values a read of the deployment hides
	// (fleet.SecretValues), longest first: what the troubleshooting
	// methods redact in module logs and support bundles.
	secrets []string
}

// moduleSpec is one desired module.
type moduleSpec struct {
	Name            string
	Deployment      string // the deployment that placed it (a container label)
	Type            string
	Version         string
	Status          string // running or stopped
	RestartPolicy   string
	StartupOrder    uint32
	ImagePullPolicy string
	Env             map[string]string
	// Docker modules.
	Image         string
	CreateOptions string // the createOptions chunks joined
	// Process modules.
	Command    []string
	WorkingDir string
	// Edge is what the agent adds for the device hub (nil without one).
	Edge *edgeSpec
}

// edgeSpec is a module's IoT Edge environment: the IOTEDGE_* variables, and
// for a container its workload socket's directory (mounted at
// /var/run/iotedge) and the hub's host name mapping.
type edgeSpec struct {
	Env         map[string]string
	WorkloadDir string
	ExtraHost   string // "name:ip", docker only
}

// systemModule is what the report echoes of a system module.
type systemModule struct {
	Type, Image, Status string
}

// registryCredential is one entry of runtime.settings.registryCredentials.
// It never reaches a log: LogValue and String redact the password.
type registryCredential struct {
	Name, Address, Username, Password string
}

func (c registryCredential) String() string {
	return fmt.Sprintf("{%s %s %s ***}", c.Name, c.Address, c.Username)
}

func (c registryCredential) LogValue() slog.Value {
	return slog.GroupValue(slog.String("name", c.Name), slog.String("address", c.Address))
}

// hash identifies what an instance was created from: a change in any of
// these fields means the instance must be replaced. Status, restart policy,
// startup order and pull policy change without a new instance.
func (s *moduleSpec) hash() string {
	type hashed struct {
		Type, Version, Image, CreateOptions string
		Env                                 [][2]string
		Command                             []string
		WorkingDir                          string
		Edge                                *edgeSpec `json:",omitempty"`
	}
	h := hashed{Type: s.Type, Version: s.Version, Image: s.Image, CreateOptions: s.CreateOptions,
		Command: s.Command, WorkingDir: s.WorkingDir, Edge: s.Edge}
	for _, k := range sortedKeys(s.Env) {
		h.Env = append(h.Env, [2]string{k, s.Env[k]})
	}
	b, _ := json.Marshal(h)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:12])
}

// image is what the report's settings.image echoes: the image, or the
// program of a process module.
func (s *moduleSpec) image() string {
	if s.Type == fleet.ModuleTypeProcess && len(s.Command) > 0 {
		return s.Command[0]
	}
	return s.Image
}

// desiredError is a desired document the agent refuses, with the
// lastDesiredStatus code to report (400 or 412).
type desiredError struct {
	code int
	msg  string
}

func (e *desiredError) Error() string { return e.msg }

// parseDesired decodes an MQTT payload. A payload that is not a desired
// document at all gives a *desiredError with ok false: its version is
// unknown.
func parseDesired(payload []byte) (doc fleet.DesiredDocument, err error) {
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		return doc, &desiredError{code: fleet.StatusCodeInvalid, msg: "desired document: " + describeJSONError(payload, err)}
	}
	if dec.More() {
		return doc, &desiredError{code: fleet.StatusCodeInvalid, msg: "desired document: invalid JSON: data after the document"}
	}
	return doc, nil
}

func describeJSONError(data []byte, err error) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		off := int(se.Offset)
		line := 1 + bytes.Count(data[:min(off, len(data))], []byte("\n"))
		return fmt.Sprintf("invalid JSON at line %d, byte %d: %v", line, off, se)
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("%s: must be %s; got %s", te.Field, te.Type, te.Value)
	}
	return "invalid JSON: " + err.Error()
}

// buildPlan validates a desired document and turns it into a plan. An
// empty deployment id or empty content is the explicit empty desired
// state. Errors are *desiredError naming the field.
//
// The document itself may be of a newer schema than this agent's
// (fleet.DocumentSchema): fields it does not know are ignored, so a
// controller one release ahead still drives it. Only a new major, which
// would mean a change it cannot follow, is refused (412).
func buildPlan(doc fleet.DesiredDocument) (*plan, error) {
	if major := fleet.SchemaMajor(doc.SchemaVersion); major != fleet.SchemaMajor(fleet.DocumentSchema) {
		return nil, &desiredError{code: fleet.StatusCodeInvalidSchema,
			msg: fmt.Sprintf("desired document: schemaVersion %q is not supported: this agent reads %d.x; upgrade the agent", doc.SchemaVersion, fleet.SchemaMajor(fleet.DocumentSchema))}
	}
	p := &plan{version: doc.Version, deploymentID: doc.DeploymentID, modules: map[string]*moduleSpec{}}
	content := bytes.TrimSpace(doc.ModulesContent)
	if doc.DeploymentID == "" || len(content) == 0 || bytes.Equal(content, []byte("null")) || bytes.Equal(content, []byte("{}")) {
		p.deploymentID = ""
		return p, nil
	}
	p.layers = doc.Layers
	wrapped := make([]byte, 0, len(content)+20)
	wrapped = append(wrapped, `{"modulesContent":`...)
	wrapped = append(wrapped, content...)
	wrapped = append(wrapped, '}')
	if err := fleet.ValidateContent(wrapped, false); err != nil {
		return nil, validationToDesired(err)
	}
	p.secrets = fleet.SecretValues(wrapped)
	var mc map[string]json.RawMessage
	if err := json.Unmarshal(content, &mc); err != nil {
		return nil, &desiredError{code: fleet.StatusCodeInvalid, msg: "modulesContent: " + describeJSONError(content, err)}
	}
	var agentTwin struct {
		Desired json.RawMessage `json:"properties.desired"`
	}
	if err := json.Unmarshal(mc["$edgeAgent"], &agentTwin); err != nil {
		return nil, invalid("modulesContent.$edgeAgent", "%v", err)
	}
	var desired struct {
		SchemaVersion string `json:"schemaVersion"`
		Runtime       struct {
			Settings struct {
				RegistryCredentials map[string]struct {
					Username string `json:"username"`
					Password string `json:"password"`
					Address  string `json:"address"`
				} `json:"registryCredentials"`
			} `json:"settings"`
		} `json:"runtime"`
		SystemModules map[string]rawModule `json:"systemModules"`
		Modules       map[string]rawModule `json:"modules"`
	}
	const field = "modulesContent.$edgeAgent.properties.desired"
	dec := json.NewDecoder(bytes.NewReader(agentTwin.Desired))
	dec.UseNumber()
	if err := dec.Decode(&desired); err != nil {
		return nil, invalid(field, "%s", describeJSONError(agentTwin.Desired, err))
	}
	for _, name := range sortedKeys(desired.Runtime.Settings.RegistryCredentials) {
		c := desired.Runtime.Settings.RegistryCredentials[name]
		p.credentials = append(p.credentials, registryCredential{Name: name, Address: c.Address, Username: c.Username, Password: c.Password})
	}
	p.systemModules = map[string]systemModule{}
	for name, m := range desired.SystemModules {
		var settings struct {
			Image string `json:"image"`
		}
		_ = json.Unmarshal(m.Settings, &settings)
		status := m.Status
		if status == "" {
			status = statusRunning
		}
		p.systemModules[name] = systemModule{Type: m.Type, Image: settings.Image, Status: status}
	}
	for name, m := range desired.Modules {
		spec, err := m.spec(name, field+".modules."+name)
		if err != nil {
			return nil, err
		}
		spec.Deployment = doc.DeploymentID
		p.modules[name] = spec
	}
	if err := p.hubPart(mc); err != nil {
		return nil, err
	}
	return p, nil
}

// hubPart reads what the device hub needs: $edgeHub's routes (compiled;
// the validator has compiled them already) and time to live, and the
// modules' desired properties.
func (p *plan) hubPart(mc map[string]json.RawMessage) error {
	var hubTwin struct {
		Desired struct {
			Routes                       json.RawMessage `json:"routes"`
			StoreAndForwardConfiguration struct {
				TimeToLiveSecs *uint64 `json:"timeToLiveSecs"`
			} `json:"storeAndForwardConfiguration"`
		} `json:"properties.desired"`
	}
	if raw, ok := mc["$edgeHub"]; ok {
		if err := json.Unmarshal(raw, &hubTwin); err != nil {
			return invalid("modulesContent.$edgeHub", "%v", err)
		}
	}
	routes, err := routing.ParseRoutes(hubTwin.Desired.Routes)
	if err != nil {
		return invalid("modulesContent.$edgeHub.properties.desired.routes", "%v", err)
	}
	p.routes = routes
	if t := hubTwin.Desired.StoreAndForwardConfiguration.TimeToLiveSecs; t != nil {
		p.ttl = time.Duration(*t) * time.Second
	}
	p.twins = map[string]json.RawMessage{}
	for name, raw := range mc {
		if strings.HasPrefix(name, "$") {
			continue
		}
		var twin struct {
			Desired json.RawMessage `json:"properties.desired"`
		}
		if err := json.Unmarshal(raw, &twin); err != nil {
			return invalid("modulesContent."+name, "%v", err)
		}
		if len(twin.Desired) > 0 {
			p.twins[name] = twin.Desired
		}
	}
	return nil
}

// validationToDesired maps a fleet validation error to a desired error:
// 412 for an unsupported schemaVersion, 400 for anything else. The field
// path is given from the desired document ("modulesContent....").
func validationToDesired(err error) *desiredError {
	var ve *fleet.ValidationError
	if !errors.As(err, &ve) {
		return &desiredError{code: fleet.StatusCodeInvalid, msg: err.Error()}
	}
	field := strings.TrimPrefix(ve.Field, "content.")
	code := fleet.StatusCodeInvalid
	if strings.HasSuffix(field, ".schemaVersion") {
		code = fleet.StatusCodeInvalidSchema
	}
	return &desiredError{code: code, msg: (&fleet.ValidationError{Field: field, Msg: ve.Msg}).Error()}
}

func invalid(field, format string, args ...any) *desiredError {
	return &desiredError{code: fleet.StatusCodeInvalid, msg: fleet.Invalid(field, format, args...).Error()}
}

// rawModule is a module (or system module) as the manifest writes it.
type rawModule struct {
	Version         json.RawMessage `json:"version"`
	Type            string          `json:"type"`
	Status          string          `json:"status"`
	RestartPolicy   string          `json:"restartPolicy"`
	ImagePullPolicy string          `json:"imagePullPolicy"`
	StartupOrder    json.Number     `json:"startupOrder"`
	Env             map[string]struct {
		Value json.RawMessage `json:"value"`
	} `json:"env"`
	Settings json.RawMessage `json:"settings"`
}

var createOptionsKey = regexp.MustCompile(`^(createOptions|createoptions)([0-9]*)$`)

func (m rawModule) spec(name, field string) (*moduleSpec, error) {
	s := &moduleSpec{
		Name: name, Type: m.Type, Status: m.Status, RestartPolicy: m.RestartPolicy,
		ImagePullPolicy: m.ImagePullPolicy, StartupOrder: defaultStartupOrder,
	}
	if len(m.Version) > 0 {
		var v string
		if json.Unmarshal(m.Version, &v) != nil {
			v = string(m.Version)
		}
		s.Version = v
	}
	if s.Status == "" {
		s.Status = statusRunning
	}
	if s.RestartPolicy == "" {
		s.RestartPolicy = policyAlways
	}
	if s.ImagePullPolicy == "" {
		s.ImagePullPolicy = pullOnCreate
	}
	if m.StartupOrder != "" {
		f, err := strconv.ParseFloat(string(m.StartupOrder), 64)
		if err != nil || f < 0 || f > math.MaxUint32 || f != math.Trunc(f) {
			return nil, invalid(field+".startupOrder", "must be an integer from 0 to 4294967295; got %s", m.StartupOrder)
		}
		s.StartupOrder = uint32(f)
	}
	if len(m.Env) > 0 {
		s.Env = make(map[string]string, len(m.Env))
		for k, v := range m.Env {
			var str string
			if json.Unmarshal(v.Value, &str) == nil {
				s.Env[k] = str
			} else {
				s.Env[k] = string(bytes.TrimSpace(v.Value))
			}
		}
	}
	switch m.Type {
	case fleet.ModuleTypeProcess:
		var ps fleet.ProcessSettings
		if err := json.Unmarshal(m.Settings, &ps); err != nil {
			return nil, invalid(field+".settings", "%s", describeJSONError(m.Settings, err))
		}
		if len(ps.Command) == 0 || ps.Command[0] == "" {
			return nil, invalid(field+".settings.command", "must be a non-empty array whose first element is the program")
		}
		s.Command, s.WorkingDir = ps.Command, ps.WorkingDir
	default:
		var settings map[string]json.RawMessage
		if err := json.Unmarshal(m.Settings, &settings); err != nil {
			return nil, invalid(field+".settings", "%s", describeJSONError(m.Settings, err))
		}
		if img, ok := settings["image"]; ok {
			if err := json.Unmarshal(img, &s.Image); err != nil {
				return nil, invalid(field+".settings.image", "must be a string")
			}
		}
		opts, err := joinCreateOptions(settings, field+".settings")
		if err != nil {
			return nil, err
		}
		s.CreateOptions = opts
	}
	return s, nil
}

// joinCreateOptions concatenates createOptions, createOptions01, ... in
// order (the validator has checked the numbering). A createOptions given as
// an object is taken as its JSON text.
func joinCreateOptions(settings map[string]json.RawMessage, field string) (string, error) {
	type chunk struct {
		n    int
		text string
	}
	var chunks []chunk
	for k, v := range settings {
		mm := createOptionsKey.FindStringSubmatch(k)
		if mm == nil {
			continue
		}
		n := 0
		if mm[2] != "" {
			n, _ = strconv.Atoi(mm[2])
		}
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			if !bytes.HasPrefix(bytes.TrimSpace(v), []byte("{")) {
				return "", invalid(field+"."+k, "must be a string")
			}
			s = string(v)
		}
		chunks = append(chunks, chunk{n, s})
	}
	slices.SortFunc(chunks, func(a, b chunk) int { return a.n - b.n })
	var b strings.Builder
	for _, c := range chunks {
		b.WriteString(c.text)
	}
	return b.String(), nil
}

// envList renders the module's environment as NAME=value: the variables
// every module gets first (IOTEDGE_DEVICEID, IOTEDGE_MODULEID and, with a
// hub, the rest of IoT Edge's), then the manifest's, sorted. The manifest
// cannot override an IOTEDGE_ variable the agent sets.
func envList(deviceID string, s *moduleSpec) []string {
	env := []string{"IOTEDGE_DEVICEID=" + deviceID, "IOTEDGE_MODULEID=" + s.Name}
	ours := map[string]bool{"IOTEDGE_DEVICEID": true, "IOTEDGE_MODULEID": true}
	if s.Edge != nil {
		for _, k := range sortedKeys(s.Edge.Env) {
			if !ours[k] {
				env = append(env, k+"="+s.Edge.Env[k])
				ours[k] = true
			}
		}
	}
	for _, k := range sortedKeys(s.Env) {
		if !ours[k] {
			env = append(env, k+"="+s.Env[k])
		}
	}
	return env
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
