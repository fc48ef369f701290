package fleet

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// Manifest keys are matched exactly as Azure's schema spells them. Readers
// that ignore case would otherwise see another manifest than the one that
// was checked and is shown: encoding/json (the agent's decoder), Docker's
// Engine API and edgeAgent's Newtonsoft.Json all match member names without
// regard to case (encoding/json even folds "ſ" to "s" and the Kelvin sign to
// "k"), and merge two spellings of one map-valued member. A module written
// under "Modules", an "Env" beside "env", or "RegistryCredentials" would run
// unchecked and be shown unredacted. So a key that differs from a schema
// key only by case (strings.EqualFold, the folding encoding/json uses) is
// refused, naming its path. Keys the schema does not name at all are left
// to the validator (some objects accept them, as in Azure's schemas); free
// names (modules, env variables, registries, routes, module twin
// properties) are not schema keys.

// keySchema lists the member names of one object of the manifest that
// Azure's schema spells, and what lies below each.
type keySchema struct {
	// names are the schema's member names, each with the schema of its
	// value (nil: nothing below is checked).
	names map[string]*keySchema
	// free is the schema of every member of a map keyed by free names
	// (modules, env variables, registries, routes).
	free *keySchema
	// elems is the schema of an array's elements.
	elems *keySchema
	// chunks: the object holds createOptions chunks (createOptions,
	// createoptions, createOptions01, ...), a module's settings.
	chunks bool
}

var (
	moduleKeys = &keySchema{names: map[string]*keySchema{
		"type": nil, "status": nil, "restartPolicy": nil, "imagePullPolicy": nil, "startupOrder": nil, "version": nil,
		"env":      {free: &keySchema{names: map[string]*keySchema{"value": nil}}},
		"settings": {names: map[string]*keySchema{"image": nil, "command": nil, "workingDir": nil}, chunks: true},
	}}
	agentDesiredKeys = &keySchema{names: map[string]*keySchema{
		"schemaVersion": nil,
		"runtime": {names: map[string]*keySchema{
			"type": nil,
			"settings": {names: map[string]*keySchema{
				"minDockerVersion": nil, "loggingOptions": nil,
				"registryCredentials": {free: &keySchema{names: map[string]*keySchema{"username": nil, "password": nil, "address": nil}}},
			}},
		}},
		"systemModules": {names: map[string]*keySchema{"edgeAgent": moduleKeys, "edgeHub": moduleKeys}},
		"modules":       {free: moduleKeys},
	}}
	mqttPolicyKeys = &keySchema{elems: &keySchema{names: map[string]*keySchema{"operations": nil, "resources": nil}}}
	hubDesiredKeys = &keySchema{names: map[string]*keySchema{
		"schemaVersion":                nil,
		"routes":                       {free: &keySchema{names: map[string]*keySchema{"route": nil, "priority": nil, "timeToLiveSecs": nil}}},
		"storeAndForwardConfiguration": {names: map[string]*keySchema{"timeToLiveSecs": nil}},
		"mqttBroker": {names: map[string]*keySchema{
			"bridges": {elems: &keySchema{names: map[string]*keySchema{
				"endpoint": nil,
				"settings": {elems: &keySchema{names: map[string]*keySchema{"direction": nil, "topic": nil, "inPrefix": nil, "outPrefix": nil}}},
			}}},
			"authorizations": {elems: &keySchema{names: map[string]*keySchema{"identities": nil, "allow": mqttPolicyKeys, "deny": mqttPolicyKeys}}},
		}},
	}}
)

// dockerCreateKeys are the top-level members of Docker's create request
// (github.com/moby/moby/api/types/container.CreateRequest: the Config
// fields, HostConfig and NetworkingConfig), which createOptions holds. The
// agent decodes createOptions into that type, ignoring case, and its "Env"
// joins the module's environment: "env" or "ENV" would pass an
// environment the redactor never saw. agent's tests check this list
// against the type.
var dockerCreateKeys = []string{
	"Hostname", "Domainname", "User", "AttachStdin", "AttachStdout", "AttachStderr", "ExposedPorts", "Tty",
	"OpenStdin", "StdinOnce", "Env", "Cmd", "Healthcheck", "ArgsEscaped", "Image", "Volumes", "WorkingDir",
	"Entrypoint", "NetworkDisabled", "OnBuild", "Labels", "StopSignal", "StopTimeout", "Shell",
	"HostConfig", "NetworkingConfig",
}

// spellingError reports a key that differs from the schema's only by case.
func spellingError(field, got, want string) error {
	return Invalid(field, "%q differs from %q only by case: manifest keys are case-sensitive (write %q, as Azure's schema does)", got, want, want)
}

// member returns the schema below member k of an object of schema s, or an
// error if k is a schema key spelled with another case.
func (s *keySchema) member(k, field string) (*keySchema, error) {
	if below, ok := s.names[k]; ok {
		return below, nil
	}
	if s.chunks && isCreateOptionsKey(k) {
		return nil, nil
	}
	for _, name := range slices.Sorted(maps.Keys(s.names)) {
		if strings.EqualFold(k, name) {
			return nil, spellingError(field, k, name)
		}
	}
	if s.chunks {
		if base := strings.TrimRight(k, "0123456789"); strings.EqualFold(base, "createOptions") {
			return nil, spellingError(field, base, "createOptions")
		}
	}
	return s.free, nil
}

// checkSpelling checks the keys of n and below against schema s, members
// in sorted order, depth first.
func checkSpelling(n *jnode, s *keySchema, field string) error {
	if s == nil {
		return nil
	}
	switch n.kind {
	case jArray:
		if s.elems == nil {
			return nil
		}
		for i, e := range n.vals {
			if err := checkSpelling(e, s.elems, fmt.Sprintf("%s[%d]", field, i)); err != nil {
				return err
			}
		}
	case jObject:
		for _, k := range sortedKeys(n) {
			f := field + "." + k
			below, err := s.member(k, f)
			if err != nil {
				return err
			}
			v, _ := n.get(k)
			if err := checkSpelling(v, below, f); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkModulesContentSpelling checks the keys of a modulesContent object
// (field is its path): the system module twins' names, each entry's
// "properties.desired" (or layered "properties.desired.<path>", whose path
// segments are checked one by one), and the keys below $edgeAgent's and
// $edgeHub's desired properties. Module twins' own properties are free.
func checkModulesContentSpelling(mc *jnode, field string) error {
	if mc.kind != jObject {
		return nil
	}
	for _, name := range sortedKeys(mc) {
		f := field + "." + name
		var desired *keySchema
		switch {
		case name == edgeAgent:
			desired = agentDesiredKeys
		case name == edgeHub:
			desired = hubDesiredKeys
		case strings.EqualFold(name, edgeAgent):
			return spellingError(f, name, edgeAgent)
		case strings.EqualFold(name, edgeHub):
			return spellingError(f, name, edgeHub)
		}
		entry, _ := mc.get(name)
		if entry.kind != jObject {
			continue
		}
		for _, k := range sortedKeys(entry) {
			kf := f + "." + k
			segs := strings.Split(k, ".")
			if len(segs) < 2 || !strings.EqualFold(segs[0], "properties") || !strings.EqualFold(segs[1], "desired") {
				continue // not a desired-properties key at all: the validator says what it is
			}
			if segs[0] != "properties" || segs[1] != "desired" {
				return spellingError(kf, segs[0]+"."+segs[1], desiredKey)
			}
			s := desired
			for _, seg := range segs[2:] {
				if s == nil {
					break
				}
				below, err := s.member(seg, kf)
				if err != nil {
					return err
				}
				s = below
			}
			v, _ := entry.get(k)
			if err := checkSpelling(v, s, kf); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkDockerSpelling checks the top-level keys of Docker create options
// (field names the createOptions chunk they start in) and that "Env", the
// one that joins the module's environment, is a list of strings.
func checkDockerSpelling(opts *jnode, field string) error {
	for _, k := range sortedKeys(opts) {
		for _, name := range dockerCreateKeys {
			if k != name && strings.EqualFold(k, name) {
				return Invalid(field, "Docker create option %q differs from %q only by case: write %q (Docker would read it as %s, unchecked and unredacted)", k, name, name, name)
			}
		}
	}
	env, ok := opts.get("Env")
	if !ok || env.kind == jNull {
		return nil
	}
	if env.kind != jArray {
		return Invalid(field, `Docker create option "Env" must be an array of "NAME=value" strings; got %s`, describeKind(env))
	}
	for i, e := range env.vals {
		if e.kind != jString {
			return Invalid(field, `Docker create option "Env"[%d] must be a "NAME=value" string; got %s`, i, describeKind(e))
		}
	}
	return nil
}

// describeKind names a value's JSON type only, for messages about values
// that may be secret.
func describeKind(n *jnode) string {
	switch n.kind {
	case jString:
		return "a string"
	case jNumber:
		return "a number"
	case jBool:
		return "a boolean"
	case jNull:
		return "null"
	}
	return describe(n) // "an array" or "an object"
}
