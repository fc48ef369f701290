// Package secrettest holds the secrets a redaction test plants in a
// deployment manifest: every spelling of a secret name (issue 13's list
// and the earlier ones), connection strings under harmless names, in each
// place a manifest holds them (module env, Docker create options, module
// twin desired properties), and manifest keys spelled with another case
// than Azure's, which must be refused. The fleet, agent, node and e2e tests
// share it so that each reader (the redactor, the agent, the API, the CLI)
// is checked against the same list.
//
// It imports nothing of this module: fleet's own tests use it.
package secrettest

import (
	"encoding/json"
	"fmt"
	"strings"
)

// Marker starts every planted secret value: a test that finds it in what
// a reader shows has found a leak.
const Marker = "zS3cr3t"

// Placement is where a manifest holds a secret.
type Placement string

const (
	// Env: $edgeAgent modules.<EnvModule>.env.<NAME>.value.
	Env Placement = "env"
	// CreateOptions: an "NAME=value" entry of Env in
	// modules.<OptionsModule>.settings.createOptions.
	CreateOptions Placement = "createOptions"
	// Twin: modulesContent.<EnvModule>.properties.desired.<NAME>.
	Twin Placement = "module twin"
	// TwinNested: modulesContent.<EnvModule>.properties.desired.settings.<NAME>.
	TwinNested Placement = "module twin (nested)"
)

// Module names of Manifest.
const (
	EnvModule     = "envsecrets" // a process module
	OptionsModule = "optsecrets" // a docker module
)

// Secret is one planted secret.
type Secret struct {
	Placement Placement
	Name      string // the variable or property name
	Value     string // holds Marker and is unique
}

// Names are secret names as manifests spell them, the newer ones (AUTH,
// CERT, COOKIE, DATABASE_URL, *_PAT, HMAC, JWT, SAS, SESSION, PASSPHRASE)
// first.
var Names = []string{
	"AUTH", "BASIC_AUTH", "mqttAuth",
	"CERT", "TLS_CERT", "clientCert",
	"COOKIE", "cookieJar",
	"DATABASE_URL", "databaseUrl",
	"GITHUB_PAT", "adoPat",
	"HMAC", "hmac_sha256",
	"JWT", "JWT_SIGNING",
	"SAS", "BlobSasUrl",
	"SESSION", "session_id",
	"PASSPHRASE", "keyPassphrase",
	"PASSWORD", "db_password", "MYSQL_PWD", "CLIENT_SECRET", "GITHUB_TOKEN",
	"API_KEY", "ApiKey", "PRIVATE_KEY", "IOTHUB_CONNECTION_STRING", "AWS_CREDENTIALS",
}

// connectionStrings are values that are secret whatever their name, given
// under harmless names; %s is where the secret goes.
var connectionStrings = []struct{ name, format string }{
	{"IOTHUB_CS", "HostName=hub.local;DeviceId=d1;SharedAccessKey=%s"},
	{"STORAGE", "DefaultEndpointsProtocol=https;AccountName=plant;AccountKey=%s;EndpointSuffix=local"},
	{"SQL", "Server=db;Database=plant;User Id=app;Password=%s;"},
	{"MONGO_URI", "mongodb://app:%s@mongo:27017/plant"},
}

// Secrets returns every name and connection string in every placement,
// each with its own value.
func Secrets() []Secret {
	var out []Secret
	n := 0
	next := func() string { n++; return fmt.Sprintf("%s%03d", Marker, n) }
	for _, p := range []Placement{Env, CreateOptions, Twin, TwinNested} {
		for _, name := range Names {
			out = append(out, Secret{Placement: p, Name: name, Value: next()})
		}
		for _, cs := range connectionStrings {
			out = append(out, Secret{Placement: p, Name: cs.name, Value: fmt.Sprintf(cs.format, next())})
		}
	}
	return out
}

// Harmless are env variables of EnvModule that are not secret and must be
// shown as they are.
var Harmless = map[string]string{"LOG_LEVEL": "debug", "AUTHOR": "plant-team", "PATH_PREFIX": "/opt"}

// RegistryPassword is the password of the manifest's registry credential.
const RegistryPassword = Marker + "REG"

// Manifest returns a valid standard deployment content
// {"modulesContent": ...} holding secrets where they say: EnvModule is a
// process module running command (with the Env secrets and Harmless in its
// environment), OptionsModule a docker module (with the CreateOptions
// secrets), and EnvModule's twin has the Twin ones. A registry credential
// has RegistryPassword.
func Manifest(command []string, secrets []Secret) json.RawMessage {
	env := map[string]any{}
	for k, v := range Harmless {
		env[k] = map[string]any{"value": v}
	}
	var optsEnv []string
	twin := map[string]any{"threshold": 30}
	nested := map[string]any{"mode": "fast"}
	for _, s := range secrets {
		switch s.Placement {
		case Env:
			env[s.Name] = map[string]any{"value": s.Value}
		case CreateOptions:
			optsEnv = append(optsEnv, s.Name+"="+s.Value)
		case Twin:
			twin[s.Name] = s.Value
		case TwinNested:
			nested[s.Name] = s.Value
		}
	}
	twin["settings"] = nested
	opts, err := json.Marshal(map[string]any{"Env": append(optsEnv, "OPTS_MODE=fast"), "HostConfig": map[string]any{"Binds": []string{"/var/lib/plant:/data"}}})
	if err != nil {
		panic(err)
	}
	modules := map[string]any{
		EnvModule: map[string]any{"type": "process", "status": "running", "restartPolicy": "always", "env": env,
			"settings": map[string]any{"command": command}},
		OptionsModule: map[string]any{"type": "docker", "status": "running", "restartPolicy": "always",
			"settings": map[string]any{"image": "registry.plant.local/optsecrets:1", "createOptions": string(opts)}},
	}
	mc := base(modules)
	mc[EnvModule] = map[string]any{"properties.desired": twin}
	return marshal(map[string]any{"modulesContent": mc})
}

// base is a modulesContent with the given $edgeAgent modules.
func base(modules map[string]any) map[string]any {
	return map[string]any{
		"$edgeAgent": map[string]any{"properties.desired": map[string]any{
			"schemaVersion": "1.1",
			"runtime": map[string]any{"type": "docker", "settings": map[string]any{
				"registryCredentials": map[string]any{"plant": map[string]any{"username": "deployer", "password": RegistryPassword, "address": "registry.plant.local"}},
			}},
			"systemModules": map[string]any{
				"edgeAgent": map[string]any{"type": "docker", "settings": map[string]any{"image": "mcr.microsoft.com/azureiotedge-agent:1.5"}},
				"edgeHub": map[string]any{"type": "docker", "status": "running", "restartPolicy": "always",
					"settings": map[string]any{"image": "mcr.microsoft.com/azureiotedge-hub:1.5"}},
			},
			"modules": modules,
		}},
		"$edgeHub": map[string]any{"properties.desired": map[string]any{
			"schemaVersion": "1.1",
			"routes":        map[string]any{"up": "FROM /messages/* INTO $upstream"},
		}},
	}
}

func marshal(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// Refusal is a manifest with a key spelled with another case than Azure's
// schema spells it; the key carries a secret.
type Refusal struct {
	Name    string
	Field   string // the JSON path the refusal must name
	Value   string // the secret, never to be shown
	Content json.RawMessage
}

// Refusals returns manifests that must be refused. command is
// EnvModule's.
func Refusals(command []string) []Refusal {
	const desired = "content.modulesContent.$edgeAgent.properties.desired"
	secret := func(i int) string { return fmt.Sprintf("%sREF%02d", Marker, i) }
	module := func(extra map[string]any) map[string]any {
		m := map[string]any{"type": "process", "status": "running", "restartPolicy": "always",
			"settings": map[string]any{"command": command}}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	docker := func(opts string) map[string]any {
		return map[string]any{"type": "docker", "status": "running", "restartPolicy": "always",
			"settings": map[string]any{"image": "registry.plant.local/optsecrets:1", "createOptions": opts}}
	}
	envOf := func(name, value string) map[string]any { return map[string]any{name: map[string]any{"value": value}} }
	var out []Refusal
	add := func(name, field string, value string, mc map[string]any) {
		out = append(out, Refusal{Name: name, Field: field, Value: value, Content: marshal(map[string]any{"modulesContent": mc})})
	}
	for i, key := range []string{"Env", "ENV", "eNV"} {
		v := secret(i)
		add("module "+key, desired+".modules.m."+key, v, base(map[string]any{"m": module(map[string]any{key: envOf("API_KEY", v)})}))
	}
	v := secret(10)
	add("env Value", desired+".modules.m.env.MODE.Value", v, base(map[string]any{"m": module(map[string]any{"env": map[string]any{"MODE": map[string]any{"value": "x", "Value": v}}})}))
	for i, key := range []string{"env", "ENV"} {
		v := secret(20 + i)
		add("createOptions "+key, desired+".modules.m.settings.createOptions", v,
			base(map[string]any{"m": docker(fmt.Sprintf(`{"Env":["MODE=fast"],%q:["API_KEY=%s"]}`, key, v))}))
	}
	v = secret(30)
	mc := base(map[string]any{})
	mc["$edgeAgent"].(map[string]any)["properties.desired"].(map[string]any)["Modules"] = map[string]any{"evil": module(map[string]any{"env": envOf("API_KEY", v)})}
	add("Modules", desired+".Modules", v, mc)
	v = secret(31)
	mc = base(map[string]any{})
	mc["$edgeAgent"].(map[string]any)["properties.desired"].(map[string]any)["runtime"].(map[string]any)["settings"] = map[string]any{
		"RegistryCredentials": map[string]any{"r": map[string]any{"username": "u", "password": v, "address": "a"}}}
	add("RegistryCredentials", desired+".runtime.settings.RegistryCredentials", v, mc)
	v = secret(32)
	mc = base(map[string]any{})
	mc["$edgeAgent"].(map[string]any)["properties.desired"].(map[string]any)["runtime"].(map[string]any)["settings"] = map[string]any{
		"registryCredentials": map[string]any{"r": map[string]any{"username": "u", "password": "p", "Password": v, "address": "a"}}}
	add("registry Password", desired+".runtime.settings.registryCredentials.r.Password", v, mc)
	v = secret(33)
	add("module \u017fettings (long s)", desired+".modules.m.\u017fettings", v,
		base(map[string]any{"m": module(map[string]any{"\u017fettings": map[string]any{"command": []string{"/bin/sh", "-c", "echo " + v}}})}))
	v = secret(34)
	mc = base(map[string]any{})
	mc["m"] = map[string]any{"Properties.Desired": map[string]any{"apiKey": v}}
	add("Properties.Desired", "content.modulesContent.m.Properties.Desired", v, mc)
	return out
}

// Find returns the planted values found in text, for a failure message.
func Find(text string, values ...string) []string {
	var found []string
	for _, v := range values {
		if strings.Contains(text, v) {
			found = append(found, v)
		}
	}
	return found
}
