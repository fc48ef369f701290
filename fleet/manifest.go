package fleet

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"appliance/routing"
)

// Module types. ModuleTypeDocker is Azure's; ModuleTypeProcess is our
// extension: a module that runs an executable on the device instead of a
// container.
//
// A process module is written like any other module of $edgeAgent's
// "modules", with type "process" and settings that hold only "command"
// (required: a non-empty array of strings; the first, the program, must be
// non-empty; the others are its arguments, passed as they are, with no
// shell) and "workingDir" (optional string). It has no image and no
// createOptions. type, status, restartPolicy, env, startupOrder and version
// mean what they mean for docker modules; imagePullPolicy is accepted and
// ignored. System modules (edgeAgent, edgeHub) are always docker.
//
//	"modules": {
//	  "collector": {
//	    "type": "process",
//	    "status": "running",
//	    "restartPolicy": "always",
//	    "env": {"LOG_LEVEL": {"value": "info"}},
//	    "settings": {
//	      "command": ["/opt/collector/bin/collector", "--config", "/etc/collector.yaml"],
//	      "workingDir": "/opt/collector"
//	    }
//	  }
//	}
const (
	ModuleTypeDocker  = "docker"
	ModuleTypeProcess = "process"
)

// ProcessSettings is the settings object of a process module (see
// ModuleTypeProcess).
type ProcessSettings struct {
	Command    []string `json:"command"`
	WorkingDir string   `json:"workingDir,omitempty"`
}

// Module field values allowed by the Azure schemas.
var (
	moduleTypes        = []string{ModuleTypeDocker, ModuleTypeProcess}
	systemModuleTypes  = []string{ModuleTypeDocker}
	moduleStatuses     = []string{"running", "stopped"}
	restartPolicies    = []string{"never", "on-failure", "on-unhealthy", "always"}
	imagePullPolicies  = []string{"on-create", "never"}
	agentSchemaVersion = []string{"1.0", "1.1"}
	hubSchemaVersion   = []string{"1.0", "1.1", "1.2"}
)

// maxUint32 bounds startupOrder and the time-to-live fields, as in the schemas.
const maxUint32 = 4294967295

const (
	edgeAgent           = "$edgeAgent"
	edgeHub             = "$edgeHub"
	desiredKey          = "properties.desired"
	desiredPrefix       = desiredKey + "."
	layeredAdvice       = `this is layered content (a key that sets a path inside properties.desired); create the deployment with --layered (API: "layered": true)`
	templateAdvice      = " (an unexpanded template placeholder? expand the template first)"
	createOptionsAdvice = " (templates write createOptions as an object; expand and normalize the template first)"
)

// ValidateContent checks a deployment's content, {"modulesContent": {...}}
// ("moduleContent", Azure's deprecated alias, is accepted too), against the
// Azure IoT Edge manifest rules: those of the edgeAgent 1.0/1.1 and edgeHub
// 1.0/1.1/1.2 JSON schemas that the azure-iot CLI ships, with our process
// modules (see ModuleTypeProcess) added. modulesContent holds one entry per
// module twin, "$edgeAgent", "$edgeHub" and any "{moduleName}", each
// {"properties.desired": {...}}. As in the schemas, $edgeHub's
// storeAndForwardConfiguration is optional (when given it needs
// timeToLiveSecs), and members the schemas do not name are accepted where
// the schemas accept them. Beyond the schemas it rejects what would be
// silently lost or misread: duplicate keys; createOptions chunks not
// numbered 01, 02, ... without gaps, or mixing the spellings createOptions
// and createoptions; a module twin entry holding anything but
// properties.desired, or named neither $edgeAgent, $edgeHub nor a valid
// module name; a route on several lines, or one that does not compile
// (routing.Parse: the message names the column). It does not impose Azure's size
// limits (512 bytes per twin value, 8 createOptions chunks).
//
// The first violation is returned as a *ValidationError whose Field is the
// JSON path from the content root, e.g.
// "content.modulesContent.$edgeAgent.properties.desired.modules.temp.status".
// Object members are checked in sorted key order, depth first (a required
// member that is missing is checked where its name sorts), so the error
// reported for a given content is always the same.
//
// A layered deployment (layered true) may set paths inside a module's desired
// properties with keys such as "properties.desired.modules.mymodule0" or
// "properties.desired.routes.route0". Its validation is lighter: nothing is
// required, unknown paths are accepted, but every value given at a known
// path (a whole module, a module's status, an env variable, a route, ...)
// must obey the same rules as in a standard deployment. Keys of an entry
// may not overlap (one a path prefix of another). A layer that sets
// systemModules is accepted, as IoT Hub accepts it. Without layered, such
// keys are an error that says to create the deployment as layered.
func ValidateContent(content json.RawMessage, layered bool) error {
	if len(bytes.TrimSpace(content)) == 0 {
		return Invalid("content", `is required: give the deployment manifest as {"modulesContent": {...}}`)
	}
	root, err := parseJSON(content, "content")
	if err != nil {
		return err
	}
	v := validator{layered: layered}
	return v.content(root, "content")
}

// ParseContentFile reads a file in any of the forms that
// `az iot edge deployment create --content` accepts: the content itself,
// {"modulesContent": {...}} (a "$schema" or "$schema-template" key beside it
// is dropped); {"content": {"modulesContent": {...}}}; or a whole IoT Hub
// configuration object with "content" (its other fields, such as id,
// metrics or targetCondition, are ignored). It returns the normalised
// content {"modulesContent": ...}, keeping the modulesContent value byte for
// byte, and renames the deprecated "moduleContent" to "modulesContent".
// It does not validate the manifest: call ValidateContent for that.
func ParseContentFile(data []byte) (json.RawMessage, error) {
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
	root, err := parseJSON(data, "content")
	if err != nil {
		return nil, err
	}
	if root.kind != jObject {
		return nil, Invalid("content", `the file must hold a JSON object such as {"modulesContent": {...}}; got %s`, describe(root))
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil { // cannot fail: parseJSON accepted it
		return nil, Invalid("content", "%v", err)
	}
	contentNode, field := root, "content"
	raw := top
	if c, ok := root.get("content"); ok {
		if k, _ := modulesContent(root); k != "" {
			return nil, Invalid("content", `the file has both "content" and "modulesContent"; give one`)
		}
		if c.kind != jObject {
			return nil, Invalid("content", "must be a JSON object; got %s", describe(c))
		}
		raw = nil
		if err := json.Unmarshal(top["content"], &raw); err != nil {
			return nil, Invalid("content", "%v", err)
		}
		contentNode = c
	}
	key, _ := modulesContent(contentNode)
	for _, k := range contentNode.keys {
		check := checkContentKey
		if key == "" {
			// Only a misspelt modulesContent comes before "is required".
			check = func(_ *jnode, k, field string) error { return contentKeySpelling(k, field) }
		}
		if err := check(contentNode, k, field); err != nil {
			return nil, err
		}
	}
	if key == "" {
		return nil, Invalid(field+".modulesContent", `is required: the file must hold {"modulesContent": {...}}, {"content": {"modulesContent": {...}}} or a whole deployment configuration with "content"`)
	}
	var out bytes.Buffer
	out.WriteString(`{"modulesContent":`)
	out.Write(raw[key])
	out.WriteString("}")
	return out.Bytes(), nil
}

// modulesContent returns the key ("modulesContent" or the deprecated
// "moduleContent") and value of a content object's manifest.
func modulesContent(content *jnode) (string, *jnode) {
	if n, ok := content.get("modulesContent"); ok {
		return "modulesContent", n
	}
	if n, ok := content.get("moduleContent"); ok {
		return "moduleContent", n
	}
	return "", nil
}

// checkContentKey accepts the keys a content object may hold.
func checkContentKey(content *jnode, k, field string) error {
	switch k {
	case "modulesContent", "$schema", "$schema-template":
		return nil
	case "moduleContent":
		if _, ok := content.get("modulesContent"); ok {
			return Invalid(field+".moduleContent", "duplicates modulesContent (moduleContent is its deprecated alias); give one")
		}
		return nil
	case "content":
		return Invalid(field+".content", "unknown key: pass the content object itself ({\"modulesContent\": ...}), or read a whole configuration with ParseContentFile")
	}
	if err := contentKeySpelling(k, field); err != nil {
		return err
	}
	return Invalid(field+"."+k, "unknown key: deployment content holds modulesContent only")
}

// contentKeySpelling refuses a content key that differs from modulesContent
// or moduleContent only by case.
func contentKeySpelling(k, field string) error {
	for _, name := range []string{"modulesContent", "moduleContent"} {
		if k != name && strings.EqualFold(k, name) {
			return spellingError(field+"."+k, k, name)
		}
	}
	return nil
}

// validator walks a parsed content. Every method returns the first error.
type validator struct {
	layered bool
}

func (v *validator) content(root *jnode, field string) error {
	if root.kind != jObject {
		return Invalid(field, `must be a JSON object {"modulesContent": {...}}; got %s`, describe(root))
	}
	key, mc := modulesContent(root)
	for _, k := range sortedKeys(root) {
		if err := checkContentKey(root, k, field); err != nil {
			return err
		}
	}
	if key == "" {
		return Invalid(field+".modulesContent", "is required")
	}
	field += "." + key
	if mc.kind != jObject {
		return Invalid(field, "must be an object; got %s", describe(mc))
	}
	if err := checkModulesContentSpelling(mc, field); err != nil {
		return err
	}
	var required []string
	if !v.layered {
		required = []string{edgeAgent, edgeHub}
		// Layered keys are reported before anything else: the fix is the
		// flag, not the content.
		for _, name := range sortedKeys(mc) {
			entry, _ := mc.get(name)
			for _, k := range sortedKeys(entry) {
				if strings.HasPrefix(k, desiredPrefix) {
					return Invalid(field+"."+name+"."+k, "%s", layeredAdvice)
				}
			}
		}
	}
	for _, name := range sortedKeys(mc, required...) {
		f := field + "." + name
		entry, ok := mc.get(name)
		if !ok {
			return Invalid(f, "is required")
		}
		if err := v.entry(name, entry, f); err != nil {
			return err
		}
	}
	return nil
}

// entry checks one module twin entry of modulesContent.
func (v *validator) entry(name string, entry *jnode, field string) error {
	if strings.HasPrefix(name, "$") && name != edgeAgent && name != edgeHub {
		return Invalid(field, "unknown system module: only $edgeAgent and $edgeHub can be configured")
	}
	if !strings.HasPrefix(name, "$") && !isModuleName(name) {
		return Invalid(field, "module name must match ^[a-zA-Z0-9_-]+$")
	}
	if entry.kind != jObject {
		return Invalid(field, `must be an object {"properties.desired": {...}}; got %s`, describe(entry))
	}
	if !v.layered {
		for _, k := range sortedKeys(entry, desiredKey) {
			f := field + "." + k
			d, ok := entry.get(k)
			switch {
			case !ok:
				return Invalid(f, "is required")
			case strings.HasPrefix(k, desiredPrefix):
				return Invalid(f, "%s", layeredAdvice)
			case k != desiredKey:
				return Invalid(f, "unknown key: a module entry holds properties.desired only")
			}
			if err := v.desired(name, nil, d, f); err != nil {
				return err
			}
		}
		return nil
	}
	// A key overlaps an earlier one (in sorted order) if either path is a
	// prefix of the other. Paths are compared as their dotted text below
	// properties.desired, "" being the whole desired object.
	earlier := map[string]string{}  // path of an earlier key → that key
	prefixOf := map[string]string{} // proper prefix of an earlier key's path → that key
	for _, k := range sortedKeys(entry) {
		f := field + "." + k
		segs, ok := desiredSegs(k)
		if !ok {
			return Invalid(f, "unknown key: a module entry of a layered deployment holds properties.desired or properties.desired.<path> keys only")
		}
		path := strings.Join(segs, ".")
		if prev, ok := prefixOf[path]; ok {
			return Invalid(f, "overlaps with key %q: a layered deployment may set each path once", prev)
		}
		prefixes := properPrefixes(path)
		for _, p := range prefixes {
			if prev, ok := earlier[p]; ok {
				return Invalid(f, "overlaps with key %q: a layered deployment may set each path once", prev)
			}
		}
		earlier[path] = k
		for _, p := range prefixes {
			if _, ok := prefixOf[p]; !ok {
				prefixOf[p] = k
			}
		}
		d, _ := entry.get(k)
		if err := v.desired(name, segs, d, f); err != nil {
			return err
		}
	}
	return nil
}

// desiredSegs splits "properties.desired[.a.b]" into the path below
// properties.desired ([] or [a b]).
func desiredSegs(key string) ([]string, bool) {
	if key == desiredKey {
		return []string{}, true
	}
	rest, ok := strings.CutPrefix(key, desiredPrefix)
	if !ok || rest == "" {
		return nil, false
	}
	return strings.Split(rest, "."), true
}

// properPrefixes returns the proper prefixes of a dotted path, shortest
// first: "" (the whole desired object) for any path, then "a" and "a.b" for
// "a.b.c". The empty path has none.
func properPrefixes(path string) []string {
	if path == "" {
		return nil
	}
	prefixes := []string{""}
	for i := 0; i < len(path); i++ {
		if path[i] == '.' {
			prefixes = append(prefixes, path[:i])
		}
	}
	return prefixes
}

func isPrefix(p, s []string) bool {
	return len(p) <= len(s) && slices.Equal(p, s[:len(p)])
}

// desired checks a value set at segs below a module's properties.desired:
// segs is empty for the whole desired object, and non-empty only for the
// keys of layered content.
func (v *validator) desired(module string, segs []string, n *jnode, field string) error {
	switch module {
	case edgeAgent:
		return v.agentAt(segs, n, field)
	case edgeHub:
		return v.hubAt(segs, n, field)
	}
	if len(segs) == 0 && n.kind != jObject {
		return Invalid(field, "must be an object (the module twin's desired properties); got %s", describe(n))
	}
	return nil
}

// agentAt dispatches a value at a path below $edgeAgent's properties.desired.
// Unknown paths are accepted: only layered content reaches them.
func (v *validator) agentAt(segs []string, n *jnode, field string) error {
	if len(segs) == 0 {
		return v.agentDesired(n, field)
	}
	switch segs[0] {
	case "schemaVersion":
		if len(segs) == 1 {
			return oneOf(n, field, agentSchemaVersion)
		}
	case "runtime":
		return v.runtimeAt(segs[1:], n, field)
	case "systemModules":
		switch len(segs) {
		case 1:
			return v.systemModules(n, field)
		case 2:
			if err := checkSystemModuleName(segs[1], field); err != nil {
				return err
			}
			return v.module(segs[1], true, n, field)
		default:
			if err := checkSystemModuleName(segs[1], parentField(field, len(segs)-2)); err != nil {
				return err
			}
			return v.moduleAt(true, segs[2:], n, field)
		}
	case "modules":
		switch len(segs) {
		case 1:
			return v.modules(n, field)
		case 2:
			if !isModuleName(segs[1]) {
				return Invalid(field, "module name must match ^[a-zA-Z0-9_-]+$")
			}
			return v.module(segs[1], false, n, field)
		default:
			if !isModuleName(segs[1]) {
				return Invalid(parentField(field, len(segs)-2), "module name must match ^[a-zA-Z0-9_-]+$")
			}
			return v.moduleAt(false, segs[2:], n, field)
		}
	}
	return nil
}

// parentField drops the last n dotted components of a field path.
func parentField(field string, n int) string {
	for ; n > 0; n-- {
		if i := strings.LastIndexByte(field, '.'); i >= 0 {
			field = field[:i]
		}
	}
	return field
}

func checkSystemModuleName(name, field string) error {
	if name != "edgeAgent" && name != "edgeHub" {
		return Invalid(field, "unknown system module: systemModules holds edgeAgent and edgeHub only")
	}
	return nil
}

func (v *validator) agentDesired(n *jnode, field string) error {
	if n.kind != jObject {
		return Invalid(field, "must be an object; got %s", describe(n))
	}
	var required []string
	if !v.layered {
		required = []string{"schemaVersion", "runtime", "systemModules", "modules"}
	}
	for _, k := range sortedKeys(n, required...) {
		f := field + "." + k
		c, ok := n.get(k)
		if !ok {
			return Invalid(f, "is required")
		}
		var err error
		switch k {
		case "schemaVersion":
			err = oneOf(c, f, agentSchemaVersion)
		case "runtime":
			err = v.runtime(c, f)
		case "systemModules":
			err = v.systemModules(c, f)
		case "modules":
			err = v.modules(c, f)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (v *validator) runtimeAt(segs []string, n *jnode, field string) error {
	switch {
	case len(segs) == 0:
		return v.runtime(n, field)
	case len(segs) == 1 && segs[0] == "type":
		return oneOf(n, field, systemModuleTypes)
	case segs[0] == "settings":
		return runtimeSettingsAt(segs[1:], n, field)
	}
	return nil
}

func (v *validator) runtime(n *jnode, field string) error {
	if n.kind != jObject {
		return Invalid(field, "must be an object; got %s", describe(n))
	}
	var required []string
	if !v.layered {
		required = []string{"type", "settings"}
	}
	for _, k := range sortedKeys(n, required...) {
		f := field + "." + k
		c, ok := n.get(k)
		if !ok {
			return Invalid(f, "is required")
		}
		var err error
		switch k {
		case "type":
			err = oneOf(c, f, systemModuleTypes)
		case "settings":
			err = runtimeSettingsAt(nil, c, f)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func runtimeSettingsAt(segs []string, n *jnode, field string) error {
	if len(segs) == 0 {
		if n.kind != jObject {
			return Invalid(field, "must be an object; got %s", describe(n))
		}
		for _, k := range sortedKeys(n) {
			c, _ := n.get(k)
			if err := runtimeSettingsAt([]string{k}, c, field+"."+k); err != nil {
				return err
			}
		}
		return nil
	}
	switch segs[0] {
	case "minDockerVersion", "loggingOptions":
		if len(segs) == 1 {
			return isString(n, field)
		}
	case "registryCredentials":
		switch len(segs) {
		case 1:
			if n.kind != jObject {
				return Invalid(field, "must be an object of registry name → {username, password, address}; got %s", describe(n))
			}
			for _, name := range sortedKeys(n) {
				c, _ := n.get(name)
				if err := registryCredential(name, c, field+"."+name); err != nil {
					return err
				}
			}
		case 2:
			return registryCredential(segs[1], n, field)
		case 3:
			return credentialField(segs[2], n, field)
		}
	}
	return nil
}

func registryCredential(name string, n *jnode, field string) error {
	if name == "" {
		return Invalid(field, "a registry credential name must not be empty")
	}
	if n.kind != jObject {
		return Invalid(field, "must be an object {username, password, address}; got %s", describe(n))
	}
	for _, k := range sortedKeys(n, "username", "password", "address") {
		f := field + "." + k
		c, ok := n.get(k)
		if !ok {
			return Invalid(f, "is required")
		}
		if err := credentialField(k, c, f); err != nil {
			return err
		}
	}
	return nil
}

func credentialField(k string, n *jnode, field string) error {
	switch k {
	case "username":
		return isString(n, field)
	case "password":
		if n.kind != jString {
			return Invalid(field, "must be a string; got %s", describeKind(n)) // the value is never echoed
		}
		return nil
	case "address":
		if err := isString(n, field); err != nil {
			return err
		}
		if n.s == "" {
			return Invalid(field, "must not be empty")
		}
		if i := strings.IndexFunc(n.s, unicode.IsSpace); i >= 0 {
			return Invalid(field, "must not contain whitespace; got %q", n.s)
		}
	}
	return nil
}

func (v *validator) systemModules(n *jnode, field string) error {
	if n.kind != jObject {
		return Invalid(field, "must be an object {edgeAgent, edgeHub}; got %s", describe(n))
	}
	var required []string
	if !v.layered {
		required = []string{"edgeAgent", "edgeHub"}
	}
	for _, k := range sortedKeys(n, required...) {
		f := field + "." + k
		c, ok := n.get(k)
		if !ok {
			return Invalid(f, "is required")
		}
		if err := checkSystemModuleName(k, f); err != nil {
			return err
		}
		if err := v.module(k, true, c, f); err != nil {
			return err
		}
	}
	return nil
}

func (v *validator) modules(n *jnode, field string) error {
	if n.kind != jObject {
		return Invalid(field, "must be an object of module name → module; got %s", describe(n))
	}
	for _, name := range sortedKeys(n) {
		f := field + "." + name
		if !isModuleName(name) {
			return Invalid(f, "module name must match ^[a-zA-Z0-9_-]+$")
		}
		c, _ := n.get(name)
		if err := v.module(name, false, c, f); err != nil {
			return err
		}
	}
	return nil
}

// isModuleName reports whether name matches ^[a-zA-Z0-9_-]+$.
func isModuleName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// module checks a whole module object: a system module (name edgeAgent or
// edgeHub) or an entry of modules.
func (v *validator) module(name string, system bool, n *jnode, field string) error {
	if n.kind != jObject {
		return Invalid(field, "must be an object; got %s", describe(n))
	}
	required := []string{"type", "status", "restartPolicy", "settings"}
	if system && name == "edgeAgent" {
		required = []string{"type", "settings"}
	}
	// settings are checked according to the type; an invalid type is
	// reported when its key comes, and settings then get the checks common
	// to every type.
	typ := ""
	if t, ok := n.get("type"); ok && oneOf(t, "", types(system)) == nil {
		typ = t.s
	}
	for _, k := range sortedKeys(n, required...) {
		f := field + "." + k
		c, ok := n.get(k)
		if !ok {
			return Invalid(f, "is required")
		}
		var err error
		if k == "settings" {
			err = settings(typ, c, f)
		} else {
			err = v.moduleAt(system, []string{k}, c, f)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func types(system bool) []string {
	if system {
		return systemModuleTypes
	}
	return moduleTypes
}

// moduleAt checks a value at a path inside a module object.
func (v *validator) moduleAt(system bool, segs []string, n *jnode, field string) error {
	switch segs[0] {
	case "type":
		if len(segs) == 1 {
			return oneOf(n, field, types(system))
		}
	case "status":
		if len(segs) == 1 {
			return oneOf(n, field, moduleStatuses)
		}
	case "restartPolicy":
		if len(segs) == 1 {
			return oneOf(n, field, restartPolicies)
		}
	case "imagePullPolicy":
		if len(segs) == 1 {
			return oneOf(n, field, imagePullPolicies)
		}
	case "startupOrder":
		if len(segs) == 1 {
			return integer(n, field, 0, maxUint32)
		}
	case "version":
		if len(segs) == 1 {
			return isString(n, field)
		}
	case "env":
		return envAt(segs[1:], n, field)
	case "settings":
		return settingsAt(segs[1:], n, field)
	}
	return nil
}

func envAt(segs []string, n *jnode, field string) error {
	switch len(segs) {
	case 0:
		if n.kind != jObject {
			return Invalid(field, `must be an object of NAME → {"value": ...}; got %s`, describe(n))
		}
		for _, name := range sortedKeys(n) {
			c, _ := n.get(name)
			if err := envVar(name, c, field+"."+name); err != nil {
				return err
			}
		}
	case 1:
		return envVar(segs[0], n, field)
	case 2:
		if segs[1] == "value" {
			return envValue(n, field)
		}
	}
	return nil
}

func envVar(name string, n *jnode, field string) error {
	if name == "" {
		return Invalid(field, "an env variable name must not be empty")
	}
	if i := strings.IndexFunc(name, func(r rune) bool {
		return r == '+' || r == '#' || r == '$' || r == '.' || unicode.IsSpace(r)
	}); i >= 0 {
		return Invalid(field, "env variable name must not contain + # $ . or whitespace; got %q", name)
	}
	if n.kind != jObject {
		return Invalid(field, `must be an object {"value": ...}; got %s`, describe(n))
	}
	for _, k := range sortedKeys(n, "value") {
		c, ok := n.get(k)
		if !ok {
			return Invalid(field+".value", "is required")
		}
		if k == "value" {
			if err := envValue(c, field+".value"); err != nil {
				return err
			}
		}
	}
	return nil
}

func envValue(n *jnode, field string) error {
	switch n.kind {
	case jString, jNumber, jBool:
		return nil
	}
	return Invalid(field, "must be a string, number or boolean; got %s", describe(n))
}

// settingsAt checks a value at a path inside a module's settings when the
// module type is not known (layered content).
func settingsAt(segs []string, n *jnode, field string) error {
	if len(segs) == 0 {
		return settings("", n, field)
	}
	switch k := segs[0]; {
	case len(segs) > 1:
		return nil
	case k == "image":
		return nonEmptyString(n, field)
	case k == "command":
		return command(n, field)
	case k == "workingDir":
		return isString(n, field)
	case isCreateOptionsKey(k):
		if n.kind != jString {
			return Invalid(field, "must be a string; got %s%s", describe(n), createOptionsHint(n))
		}
	}
	return nil
}

// settings checks a module's settings for a module of type typ ("docker",
// "process", or "" when the type is unknown or invalid).
func settings(typ string, n *jnode, field string) error {
	if n.kind != jObject {
		return Invalid(field, "must be an object; got %s", describe(n))
	}
	var required []string
	switch typ {
	case "docker":
		required = []string{"image"}
	case "process":
		required = []string{"command"}
	}
	chunksDone := false
	for _, k := range sortedKeys(n, required...) {
		f := field + "." + k
		c, ok := n.get(k)
		if !ok {
			return Invalid(f, "is required")
		}
		if typ == "process" && k != "command" && k != "workingDir" {
			return Invalid(f, "is not a setting of a process module (they have command and workingDir)")
		}
		switch {
		case k == "image":
			if err := nonEmptyString(c, f); err != nil {
				return err
			}
		case k == "command" && typ != "docker":
			if err := command(c, f); err != nil {
				return err
			}
		case k == "workingDir" && typ != "docker":
			if err := isString(c, f); err != nil {
				return err
			}
		case isCreateOptionsKey(k) && !chunksDone:
			chunksDone = true
			if err := createOptions(n, field); err != nil {
				return err
			}
		}
	}
	return nil
}

func command(n *jnode, field string) error {
	if n.kind != jArray {
		return Invalid(field, `must be an array of strings ["/path/to/program", "arg", ...]; got %s`, describe(n))
	}
	if len(n.vals) == 0 {
		return Invalid(field, "must not be empty: its first element is the program to run")
	}
	for i, a := range n.vals {
		f := fmt.Sprintf("%s[%d]", field, i)
		if err := isString(a, f); err != nil {
			return err
		}
		if i == 0 && a.s == "" {
			return Invalid(f, "must not be empty: it is the program to run")
		}
	}
	return nil
}

// isCreateOptionsKey reports whether k matches ^(createoptions|createOptions)[0-9]*$.
func isCreateOptionsKey(k string) bool {
	_, _, ok := createOptionsChunk(k)
	return ok
}

// createOptionsChunk splits a createOptions chunk key into its base
// ("createOptions" or "createoptions") and its suffix of digits.
func createOptionsChunk(k string) (base, suffix string, ok bool) {
	for _, b := range []string{"createOptions", "createoptions"} {
		if s, found := strings.CutPrefix(k, b); found {
			for i := 0; i < len(s); i++ {
				if s[i] < '0' || s[i] > '9' {
					return "", "", false
				}
			}
			return b, s, true
		}
	}
	return "", "", false
}

// chunkIndex returns the position of a chunk: 0 for no suffix, else the
// number, which must be written with two digits at least and no other
// leading zero (01, 02, ..., 99, 100), the way edgeAgent and iotedgedev
// name them.
func chunkIndex(suffix string) (int, bool) {
	if suffix == "" {
		return 0, true
	}
	i, err := strconv.Atoi(suffix)
	if err != nil || i < 1 || fmt.Sprintf("%02d", i) != suffix {
		return 0, false
	}
	return i, true
}

// chunkSuffix is the inverse of chunkIndex.
func chunkSuffix(i int) string {
	if i == 0 {
		return ""
	}
	return fmt.Sprintf("%02d", i)
}

// createOptions checks the createOptions chunks of a settings object: each
// a string, numbered without gaps from createOptions, createOptions01, ...,
// and together an empty string or the JSON text of an object. The 512-byte
// limit per chunk and the 8-chunk limit of Azure's twins are not imposed.
func createOptions(settings *jnode, field string) error {
	type chunk struct {
		key string
		n   *jnode
	}
	byIndex := map[int]chunk{}
	spelling := ""
	for _, k := range sortedKeys(settings) {
		base, suffix, ok := createOptionsChunk(k)
		if !ok {
			continue
		}
		f := field + "." + k
		c, _ := settings.get(k)
		if c.kind != jString {
			return Invalid(f, "must be a string; got %s%s", describe(c), createOptionsHint(c))
		}
		if spelling == "" {
			spelling = base
		} else if base != spelling {
			return Invalid(f, "mixes the spellings %s and %s; use one", spelling, base)
		}
		i, ok := chunkIndex(suffix)
		if !ok {
			return Invalid(f, "createOptions chunks are numbered with two digits: createOptions, createOptions01, createOptions02, ...")
		}
		if prev, dup := byIndex[i]; dup {
			return Invalid(f, "duplicates %s", prev.key)
		}
		byIndex[i] = chunk{k, c}
	}
	var text strings.Builder
	keys := make([]string, 0, len(byIndex))
	for i := 0; i < len(byIndex); i++ {
		c, ok := byIndex[i]
		if !ok {
			// The first missing index is below the highest given one.
			var next string
			for j := i + 1; ; j++ {
				if c, ok := byIndex[j]; ok {
					next = c.key
					break
				}
			}
			return Invalid(field+"."+next, "createOptions chunks must be numbered without gaps: createOptions%s is missing", chunkSuffix(i))
		}
		text.WriteString(c.n.s)
		keys = append(keys, c.key)
	}
	if text.Len() == 0 {
		return nil
	}
	f := field + "." + keys[0]
	what := "must hold"
	if len(keys) > 1 {
		what = fmt.Sprintf("together with %s must hold", strings.Join(keys[1:], ", "))
	}
	opts, err := parseJSON([]byte(text.String()), "")
	if err != nil {
		var ve *ValidationError
		if errors.As(err, &ve) {
			err = errors.New(ve.Msg)
			if ve.Field != "" {
				err = fmt.Errorf("%s: %s", ve.Field, ve.Msg) // the path inside the create options
			}
		}
		return Invalid(f, "%s the Docker create options as a JSON object: %v", what, err)
	}
	if opts.kind != jObject {
		return Invalid(f, "%s the Docker create options as a JSON object; got %s", what, describe(opts))
	}
	return checkDockerSpelling(opts, f)
}

func createOptionsHint(n *jnode) string {
	if n.kind == jObject {
		return createOptionsAdvice
	}
	return ""
}

// hubAt dispatches a value at a path below $edgeHub's properties.desired.
func (v *validator) hubAt(segs []string, n *jnode, field string) error {
	if len(segs) == 0 {
		return v.hubDesired(n, field)
	}
	switch segs[0] {
	case "schemaVersion":
		if len(segs) == 1 {
			return oneOf(n, field, hubSchemaVersion)
		}
	case "routes":
		// The base deployment sets the schema version; a layer may use
		// either form of route.
		switch len(segs) {
		case 1:
			return routes(n, field, "1.2")
		case 2:
			return route(segs[1], n, field, "1.2")
		case 3:
			return routeField(segs[2], n, field)
		}
	case "storeAndForwardConfiguration":
		switch len(segs) {
		case 1:
			return storeAndForward(n, field, "1.0")
		case 2:
			if segs[1] == "timeToLiveSecs" {
				return integer(n, field, 0, maxUint32)
			}
		}
	case "mqttBroker":
		if len(segs) == 1 {
			return mqttBroker(n, field)
		}
	}
	return nil
}

func (v *validator) hubDesired(n *jnode, field string) error {
	if n.kind != jObject {
		return Invalid(field, "must be an object; got %s", describe(n))
	}
	var required []string
	if !v.layered {
		required = []string{"schemaVersion", "routes"}
	}
	// The route forms and the allowed keys depend on the schema version;
	// an invalid version is reported at its own key.
	version := "1.2"
	if sv, ok := n.get("schemaVersion"); ok && oneOf(sv, "", hubSchemaVersion) == nil {
		version = sv.s
	}
	for _, k := range sortedKeys(n, required...) {
		f := field + "." + k
		c, ok := n.get(k)
		if !ok {
			return Invalid(f, "is required")
		}
		var err error
		switch k {
		case "schemaVersion":
			err = oneOf(c, f, hubSchemaVersion)
		case "routes":
			err = routes(c, f, version)
		case "storeAndForwardConfiguration":
			err = storeAndForward(c, f, version)
		case "mqttBroker":
			if version != "1.2" {
				return Invalid(f, "needs schemaVersion 1.2; this is %s", version)
			}
			err = mqttBroker(c, f)
		default:
			if version != "1.0" {
				return Invalid(f, "unknown key: edgeHub's desired properties hold schemaVersion, routes, storeAndForwardConfiguration and mqttBroker")
			}
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func routes(n *jnode, field, version string) error {
	if n.kind != jObject {
		return Invalid(field, "must be an object of route name → route; got %s", describe(n))
	}
	for _, name := range sortedKeys(n) {
		c, _ := n.get(name)
		if err := route(name, c, field+"."+name, version); err != nil {
			return err
		}
	}
	return nil
}

func route(name string, n *jnode, field, version string) error {
	if name == "" {
		return Invalid(field, "a route name must not be empty")
	}
	if version != "1.0" && strings.ContainsAny(name, ".$# ") {
		return Invalid(field, "route name must not contain . $ # or space; got %q", name)
	}
	switch n.kind {
	case jString:
		return routeText(n, field)
	case jObject:
		if version == "1.0" {
			return Invalid(field, `must be a string with schemaVersion 1.0; routes of the form {"route": ..., "priority": ..., "timeToLiveSecs": ...} need schemaVersion 1.1 or later`)
		}
		for _, k := range sortedKeys(n, "route") {
			f := field + "." + k
			c, ok := n.get(k)
			if !ok {
				return Invalid(f, "is required")
			}
			if err := routeField(k, c, f); err != nil {
				return err
			}
		}
		return nil
	}
	return Invalid(field, `must be a string "FROM ... INTO ..." or an object {"route": ..., "priority": ..., "timeToLiveSecs": ...}; got %s`, describe(n))
}

func routeField(k string, n *jnode, field string) error {
	switch k {
	case "route":
		return routeText(n, field)
	case "priority":
		return integer(n, field, 0, 9)
	case "timeToLiveSecs":
		return integer(n, field, 0, maxUint32)
	}
	return Invalid(field, "unknown key: a route object holds route, priority and timeToLiveSecs")
}

func routeText(n *jnode, field string) error {
	if err := isString(n, field); err != nil {
		return err
	}
	if strings.TrimSpace(n.s) == "" {
		return Invalid(field, `must not be empty: a route is "FROM <source> [WHERE <condition>] INTO <sink>"`)
	}
	if strings.ContainsAny(n.s, "\r\n") {
		return Invalid(field, "must be on one line")
	}
	if _, err := routing.Parse(n.s); err != nil {
		return Invalid(field, "%v", err)
	}
	return nil
}

// storeAndForward checks storeAndForwardConfiguration. The section is
// optional in every edgeHub schema; when given it needs timeToLiveSecs.
func storeAndForward(n *jnode, field, version string) error {
	if n.kind != jObject {
		return Invalid(field, `must be an object {"timeToLiveSecs": ...}; got %s`, describe(n))
	}
	for _, k := range sortedKeys(n, "timeToLiveSecs") {
		f := field + "." + k
		c, ok := n.get(k)
		switch {
		case !ok:
			return Invalid(f, "is required")
		case k == "timeToLiveSecs":
			if err := integer(c, f, 0, maxUint32); err != nil {
				return err
			}
		case version != "1.0":
			return Invalid(f, "unknown key: storeAndForwardConfiguration holds timeToLiveSecs only")
		}
	}
	return nil
}

// mqttBroker checks the edgeHub 1.2 MQTT broker section: bridges and
// authorizations.
func mqttBroker(n *jnode, field string) error {
	if n.kind != jObject {
		return Invalid(field, "must be an object {bridges, authorizations}; got %s", describe(n))
	}
	for _, k := range sortedKeys(n) {
		f := field + "." + k
		c, _ := n.get(k)
		var err error
		switch k {
		case "bridges":
			err = eachObject(c, f, bridge)
		case "authorizations":
			err = eachObject(c, f, authorization)
		default:
			err = Invalid(f, "unknown key: mqttBroker holds bridges and authorizations")
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func eachObject(n *jnode, field string, check func(*jnode, string) error) error {
	if n.kind != jArray {
		return Invalid(field, "must be an array; got %s", describe(n))
	}
	for i, e := range n.vals {
		f := fmt.Sprintf("%s[%d]", field, i)
		if e.kind != jObject {
			return Invalid(f, "must be an object; got %s", describe(e))
		}
		if err := check(e, f); err != nil {
			return err
		}
	}
	return nil
}

func bridge(n *jnode, field string) error {
	for _, k := range sortedKeys(n) {
		f := field + "." + k
		c, _ := n.get(k)
		switch k {
		case "endpoint":
			if err := isString(c, f); err != nil {
				return err
			}
			if c.s != "$upstream" {
				return Invalid(f, `must be "$upstream"; got %q`, c.s)
			}
		case "settings":
			err := eachObject(c, f, func(s *jnode, field string) error {
				for _, k := range sortedKeys(s) {
					f := field + "." + k
					c, _ := s.get(k)
					switch k {
					case "direction":
						if err := oneOf(c, f, []string{"in", "out"}); err != nil {
							return err
						}
					case "topic", "inPrefix", "outPrefix":
						if err := isString(c, f); err != nil {
							return err
						}
					default:
						return Invalid(f, "unknown key: a bridge setting holds direction, topic, inPrefix and outPrefix")
					}
				}
				return nil
			})
			if err != nil {
				return err
			}
		default:
			return Invalid(f, "unknown key: a bridge holds endpoint and settings")
		}
	}
	return nil
}

func authorization(n *jnode, field string) error {
	for _, k := range sortedKeys(n) {
		f := field + "." + k
		c, _ := n.get(k)
		var err error
		switch k {
		case "identities":
			err = nonEmptyStrings(c, f)
		case "allow", "deny":
			err = eachObject(c, f, policy)
		default:
			err = Invalid(f, "unknown key: an authorization holds identities, allow and deny")
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func policy(n *jnode, field string) error {
	for _, k := range sortedKeys(n) {
		f := field + "." + k
		c, _ := n.get(k)
		switch k {
		case "operations":
			if c.kind != jArray {
				return Invalid(f, "must be an array; got %s", describe(c))
			}
			for i, op := range c.vals {
				if err := oneOf(op, fmt.Sprintf("%s[%d]", f, i), []string{"mqtt:connect", "mqtt:subscribe", "mqtt:publish"}); err != nil {
					return err
				}
			}
		case "resources":
			if err := nonEmptyStrings(c, f); err != nil {
				return err
			}
		default:
			return Invalid(f, "unknown key: a policy holds operations and resources")
		}
	}
	return nil
}

func nonEmptyStrings(n *jnode, field string) error {
	if n.kind != jArray {
		return Invalid(field, "must be an array of strings; got %s", describe(n))
	}
	for i, e := range n.vals {
		if err := nonEmptyString(e, fmt.Sprintf("%s[%d]", field, i)); err != nil {
			return err
		}
	}
	return nil
}

// Leaf checks.

func isString(n *jnode, field string) error {
	if n.kind != jString {
		return Invalid(field, "must be a string; got %s", describe(n))
	}
	return nil
}

func nonEmptyString(n *jnode, field string) error {
	if err := isString(n, field); err != nil {
		return err
	}
	if n.s == "" {
		return Invalid(field, "must not be empty")
	}
	return nil
}

// oneOf checks that n is one of the allowed strings.
func oneOf(n *jnode, field string, allowed []string) error {
	if n.kind == jString && slices.Contains(allowed, n.s) {
		return nil
	}
	hint := ""
	if n.kind == jString && (strings.Contains(n.s, "${") || strings.HasPrefix(n.s, "$")) {
		hint = templateAdvice
	}
	return Invalid(field, "must be one of %s; got %s%s", strings.Join(allowed, ", "), describe(n), hint)
}

// integer checks that n is a JSON number with an integer value in [lo, hi].
// 7, 7.0 and 7e0 are all the integer 7, as in JSON Schema.
func integer(n *jnode, field string, lo, hi float64) error {
	if n.kind == jNumber {
		f, err := strconv.ParseFloat(n.s, 64)
		if err == nil && f == math.Trunc(f) && f >= lo && f <= hi {
			return nil
		}
	}
	return Invalid(field, "must be an integer from %.0f to %.0f; got %s", lo, hi, describe(n))
}

// describe renders a value for an error message: strings quoted, numbers
// and literals as written, containers by kind.
func describe(n *jnode) string {
	switch n.kind {
	case jString:
		s := n.s
		if utf8.RuneCountInString(s) > 80 {
			s = string([]rune(s)[:80]) + "…"
		}
		return strconv.Quote(s)
	case jNumber:
		return n.s
	case jBool:
		return strconv.FormatBool(n.b)
	case jNull:
		return "null"
	case jArray:
		return "an array"
	}
	return "an object"
}

// A small JSON tree that keeps object members in document order (so that a
// rewritten manifest reads like the original), numbers as written, and
// detects duplicate keys, which encoding/json silently collapses.

type jkind uint8

const (
	jNull jkind = iota
	jBool
	jNumber
	jString
	jArray
	jObject
)

type jnode struct {
	kind  jkind
	s     string         // a string's value, or a number as written
	b     bool           // a boolean's value
	keys  []string       // an object's member names, in document order
	vals  []*jnode       // an object's member values (parallel to keys), or an array's elements
	index map[string]int // key → member position, for large objects; nil when stale
}

// smallObject is the member count up to which get scans instead of indexing.
const smallObject = 8

// get returns an object member.
func (n *jnode) get(key string) (*jnode, bool) {
	if n == nil || n.kind != jObject {
		return nil, false
	}
	if len(n.keys) <= smallObject {
		for i, k := range n.keys {
			if k == key {
				return n.vals[i], true
			}
		}
		return nil, false
	}
	if n.index == nil {
		n.index = make(map[string]int, len(n.keys))
		for i, k := range n.keys {
			n.index[k] = i
		}
	}
	i, ok := n.index[key]
	if !ok {
		return nil, false
	}
	return n.vals[i], true
}

// sortedKeys returns an object's member names together with any required
// names it lacks, sorted, so that validation order is deterministic.
func sortedKeys(n *jnode, required ...string) []string {
	keys := slices.Clone(n.keys)
	for _, r := range required {
		if !slices.Contains(keys, r) {
			keys = append(keys, r)
		}
	}
	slices.Sort(keys)
	return keys
}

// parseJSON parses one JSON value. A syntax error is reported with its line
// and column; a duplicate key with its path under root.
func parseJSON(data []byte, root string) (*jnode, error) {
	if !json.Valid(data) {
		return nil, syntaxError(data, root)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	return decodeNode(dec, &jpath{key: root})
}

// jpath is the path of a value being decoded, rendered only for an error,
// so that decoding deep documents stays linear.
type jpath struct {
	parent *jpath
	key    string
	index  int // an array index, when key is ""
}

func (p *jpath) String() string {
	var parts []*jpath
	for ; p != nil; p = p.parent {
		parts = append(parts, p)
	}
	var b strings.Builder
	for i := len(parts) - 1; i >= 0; i-- {
		switch q := parts[i]; {
		case q.parent == nil:
			b.WriteString(q.key)
		case q.key == "" && q.index >= 0:
			fmt.Fprintf(&b, "[%d]", q.index)
		default:
			if b.Len() > 0 {
				b.WriteByte('.')
			}
			b.WriteString(q.key)
		}
	}
	return b.String()
}

// syntaxError describes why data is not JSON, with a 1-based line and
// column (in characters) of the offending byte.
func syntaxError(data []byte, field string) error {
	var v any
	err := json.Unmarshal(data, &v)
	var se *json.SyntaxError
	if !errors.As(err, &se) {
		if err == nil {
			err = errors.New("invalid JSON")
		}
		return Invalid(field, "invalid JSON: %v", err)
	}
	line, col := lineCol(data, int(se.Offset)-1)
	return Invalid(field, "invalid JSON at line %d, column %d: %v", line, col, se)
}

// lineCol returns the 1-based line and column of byte offset off in data.
func lineCol(data []byte, off int) (line, col int) {
	off = max(0, min(off, len(data)))
	before := data[:off]
	line = 1 + bytes.Count(before, []byte("\n"))
	start := bytes.LastIndexByte(before, '\n') + 1
	return line, utf8.RuneCount(before[start:]) + 1
}

func decodeNode(dec *json.Decoder, path *jpath) (*jnode, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, Invalid(path.String(), "invalid JSON: %v", err)
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			n := &jnode{kind: jObject}
			var seen map[string]bool
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return nil, Invalid(path.String(), "invalid JSON: %v", err)
				}
				k, _ := kt.(string)
				child := &jpath{parent: path, key: k, index: -1}
				if seen == nil {
					seen = map[string]bool{}
				}
				if seen[k] {
					return nil, Invalid(child.String(), "duplicate key %q: JSON readers keep only one of its values, silently (Azure's tools refuse it too)", k)
				}
				seen[k] = true
				v, err := decodeNode(dec, child)
				if err != nil {
					return nil, err
				}
				n.keys = append(n.keys, k)
				n.vals = append(n.vals, v)
			}
			if _, err := dec.Token(); err != nil {
				return nil, Invalid(path.String(), "invalid JSON: %v", err)
			}
			return n, nil
		case '[':
			n := &jnode{kind: jArray}
			for i := 0; dec.More(); i++ {
				v, err := decodeNode(dec, &jpath{parent: path, index: i})
				if err != nil {
					return nil, err
				}
				n.vals = append(n.vals, v)
			}
			if _, err := dec.Token(); err != nil {
				return nil, Invalid(path.String(), "invalid JSON: %v", err)
			}
			return n, nil
		}
	case string:
		return &jnode{kind: jString, s: t}, nil
	case json.Number:
		return &jnode{kind: jNumber, s: string(t)}, nil
	case bool:
		return &jnode{kind: jBool, b: t}, nil
	case nil:
		return &jnode{kind: jNull}, nil
	}
	return nil, Invalid(path.String(), "invalid JSON: unexpected %v", tok)
}

// encode appends n as compact JSON. With ascii, every character outside
// printable ASCII is written as a \u escape, the way Python's json.dumps
// (and so iotedgedev) writes it; otherwise only what JSON requires is
// escaped (no HTML escaping).
func (n *jnode) encode(buf []byte, ascii bool) []byte {
	switch n.kind {
	case jNull:
		return append(buf, "null"...)
	case jBool:
		return strconv.AppendBool(buf, n.b)
	case jNumber:
		return append(buf, n.s...)
	case jString:
		return appendString(buf, n.s, ascii)
	case jArray:
		buf = append(buf, '[')
		for i, v := range n.vals {
			if i > 0 {
				buf = append(buf, ',')
			}
			buf = v.encode(buf, ascii)
		}
		return append(buf, ']')
	}
	buf = append(buf, '{')
	for i, k := range n.keys {
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = appendString(buf, k, ascii)
		buf = append(buf, ':')
		buf = n.vals[i].encode(buf, ascii)
	}
	return append(buf, '}')
}

func appendString(buf []byte, s string, ascii bool) []byte {
	const hex = "0123456789abcdef"
	buf = append(buf, '"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			buf = append(buf, '\\', byte(r))
		case r == '\n':
			buf = append(buf, '\\', 'n')
		case r == '\r':
			buf = append(buf, '\\', 'r')
		case r == '\t':
			buf = append(buf, '\\', 't')
		case r == '\b':
			buf = append(buf, '\\', 'b')
		case r == '\f':
			buf = append(buf, '\\', 'f')
		case r < 0x20 || (ascii && r > 0x7e) || r == '\u2028' || r == '\u2029':
			if r > 0xffff {
				r1, r2 := utf16Surrogates(r)
				buf = append(buf, '\\', 'u', hex[r1>>12], hex[r1>>8&0xf], hex[r1>>4&0xf], hex[r1&0xf])
				r = r2
			}
			buf = append(buf, '\\', 'u', hex[r>>12], hex[r>>8&0xf], hex[r>>4&0xf], hex[r&0xf])
		default:
			buf = utf8.AppendRune(buf, r)
		}
	}
	return append(buf, '"')
}

func utf16Surrogates(r rune) (rune, rune) {
	r -= 0x10000
	return 0xd800 + (r>>10)&0x3ff, 0xdc00 + r&0x3ff
}
