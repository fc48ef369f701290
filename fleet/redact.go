package fleet

import (
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"unicode"
)

// Redacted replaces every secret in what RedactContent returns.
const Redacted = "<redacted>"

// redactedWhole is what RedactContent returns for content it cannot redact
// member by member.
var redactedWhole = json.RawMessage(`"` + Redacted + `"`)

// RedactContent returns a copy of a deployment's content that is safe to
// show to a reader: every secret is replaced by "<redacted>". Reads of a
// deployment (API, CLI, dashboard) go through it. Secrets are:
//
//   - in $edgeAgent's desired properties (whole, or set by layered keys
//     such as "properties.desired.runtime.settings.registryCredentials.acr"):
//     the password of every registry credential,
//     runtime.settings.registryCredentials.<name>.password, and any other
//     member of a credential but username and address (a credential whose
//     name has dots, set by a layered key, is hidden whole); the value of
//     every env variable of a module or system module whose name
//     IsSecretName, (modules|systemModules).<name>.env.<NAME>.value;
//   - in the Docker create options of a module or system module (string
//     chunks or template object): every "NAME=value" entry of "Env" whose
//     NAME IsSecretName or whose value IsSecretValue, which becomes
//     "NAME=<redacted>", and every other string that IsSecretValue; the
//     string is re-encoded and re-chunked;
//   - in every module twin's desired properties ("{module}":
//     {"properties.desired": ...}, or layered "properties.desired.<path>"
//     keys): what RedactModuleTwinDesired hides;
//   - anywhere else in modulesContent, every string that IsSecretValue (a
//     connection string such as an env value
//     "HostName=...;SharedAccessKey=...").
//
// Everything else (command lines, registry user names, routes) is shown as
// it is. If nothing is redacted the copy is byte for byte the content;
// otherwise it is compact JSON with members in their original order.
// Content that cannot be redacted member by member is replaced whole by
// the JSON string "<redacted>": content that is not valid JSON or has a
// duplicate key, and content with a key that differs only by case from a
// manifest key (which ValidateContent refuses, but an earlier version may
// have stored): the agent's decoder ignores case, so such a key may hold
// secrets this function would not look for. If content is a whole
// configuration object, its "content" is redacted too.
func RedactContent(content json.RawMessage) json.RawMessage {
	root, err := parseJSON(content, "content")
	if err != nil {
		return append(json.RawMessage(nil), redactedWhole...)
	}
	contents := []*jnode{root}
	if c, ok := root.get("content"); ok {
		contents = append(contents, c)
	}
	for _, c := range contents {
		if _, mc := modulesContent(c); mc != nil && checkModulesContentSpelling(mc, "") != nil {
			return append(json.RawMessage(nil), redactedWhole...)
		}
	}
	r := &redactor{done: map[*jnode]bool{}}
	changed := false
	for _, c := range contents {
		changed = r.content(c) || changed
	}
	if !changed {
		return append(json.RawMessage(nil), content...)
	}
	return root.encode(nil, false)
}

// RedactModuleTwinDesired returns a copy of a module twin's desired
// properties (the value of "properties.desired" in a "{module}" entry of
// modulesContent, or a twin's desired document as a device hub keeps it)
// that is safe to show to a reader: below every member whose name
// IsSecretName (at any depth, e.g. "apiKey" or "db": {"password": ...}),
// every string, number and boolean is replaced by "<redacted>", and every
// other string that IsSecretValue is replaced too. The shape (objects,
// arrays, nulls, member order) is kept, so a reader sees which properties
// are set. The module itself must get the properties unredacted; this is
// for what is read back (API, CLI, dashboard, logs). If nothing is
// redacted the copy is byte for byte the input; a value that is not valid
// JSON is replaced whole by the JSON string "<redacted>".
func RedactModuleTwinDesired(desired json.RawMessage) json.RawMessage {
	root, err := parseJSON(desired, "properties.desired")
	if err != nil {
		return append(json.RawMessage(nil), redactedWhole...)
	}
	r := &redactor{done: map[*jnode]bool{}}
	if !r.values(root, true, false) {
		return append(json.RawMessage(nil), desired...)
	}
	return root.encode(nil, false)
}

// redactor hides secrets in a parsed document, and with collect, keeps
// each value it hides (SecretValues).
type redactor struct {
	// done are nodes not to look at again: create options redacted as a
	// whole (parsed, re-encoded) are not looked at string by string.
	done    map[*jnode]bool
	collect bool
	found   []string
}

// hide records a hidden scalar (strings and numbers; booleans say
// nothing), and the secret parts of a connection string or URL.
func (r *redactor) hide(n *jnode) {
	if !r.collect {
		return
	}
	switch n.kind {
	case jString:
		r.found = append(r.found, n.s)
		r.found = append(r.found, secretParts(n.s)...)
	case jNumber:
		r.found = append(r.found, n.s)
	case jArray, jObject:
		for _, v := range n.vals {
			r.hide(v)
		}
	}
}

func (r *redactor) content(content *jnode) bool {
	changed := false
	_ = walkAgentDesired(content, "", func(obj *jnode, _ string, segs [][]string) error {
		for i, s := range segs {
			if isSecretPath(s, obj.vals[i]) {
				if obj.vals[i].kind != jString || obj.vals[i].s != Redacted {
					r.hide(obj.vals[i])
				}
				obj.vals[i] = &jnode{kind: jString, s: Redacted}
				changed = true
			}
		}
		if r.createOptions(obj, segs) {
			changed = true
		}
		return nil
	})
	_, mc := modulesContent(content)
	if mc == nil || mc.kind != jObject {
		return changed
	}
	for i, name := range mc.keys {
		entry := mc.vals[i]
		if strings.HasPrefix(name, "$") || entry.kind != jObject {
			// System twins: connection strings only.
			changed = r.values(entry, false, false) || changed
			continue
		}
		// A module twin: its desired properties, whole or by layered path.
		for j, k := range entry.keys {
			segs, ok := desiredSegs(k)
			secret := false
			for _, s := range segs {
				secret = secret || IsSecretName(s)
			}
			changed = r.values(entry.vals[j], ok, secret) || changed
		}
	}
	return changed
}

// values redacts below n: every string that IsSecretValue; with names,
// below every member whose name IsSecretName, every scalar; with secret
// (n is below such a member), every scalar of n. Nodes in done are
// skipped.
func (r *redactor) values(n *jnode, names, secret bool) bool {
	if r.done[n] {
		return false
	}
	switch n.kind {
	case jString, jNumber, jBool:
		if n.kind == jString && n.s == Redacted {
			return false
		}
		if secret || n.kind == jString && IsSecretValue(n.s) {
			r.hide(n)
			*n = jnode{kind: jString, s: Redacted}
			return true
		}
	case jArray:
		changed := false
		for _, v := range n.vals {
			changed = r.values(v, names, secret) || changed
		}
		return changed
	case jObject:
		changed := false
		for i, k := range n.keys {
			changed = r.values(n.vals[i], names, secret || names && IsSecretName(k)) || changed
		}
		return changed
	}
	return false
}

// isSecretPath reports whether the value v at logical path s below
// $edgeAgent's properties.desired is a secret.
func isSecretPath(s []string, v *jnode) bool {
	switch {
	case s == nil:
		return false
	case len(s) >= 5 && s[0] == "runtime" && s[1] == "settings" && s[2] == "registryCredentials":
		// Not only "password": edgeAgent may read a "Password" too.
		last := s[len(s)-1]
		return !strings.EqualFold(last, "username") && !strings.EqualFold(last, "address")
	case len(s) >= 4 && (s[0] == "modules" || s[0] == "systemModules") && s[2] == "env" && IsSecretName(s[3]):
		// The {"value": ...} object itself is walked into; anything at or
		// below its value, or a malformed non-object entry, is hidden.
		return len(s) > 4 || v.kind != jObject
	}
	return false
}

// createOptions redacts the secrets of the createOptions chunk groups
// among obj's members, and records the chunks it parsed in done.
func (r *redactor) createOptions(obj *jnode, segs [][]string) bool {
	changed := false
	replace := map[int][]string{}
	drop := map[int]bool{}
	var parsed []string // prefixes of the groups parsed
	for _, g := range createOptionsGroups(obj, segs) {
		first := g.members[0]
		if v := obj.vals[first]; v.kind == jObject {
			changed = r.dockerOptions(v) || changed
			r.done[v] = true
			continue
		}
		// Chunks join in index order; those with a malformed suffix, which
		// ValidateContent rejects, are left out.
		byIndex := map[int]int{}
		for _, i := range g.members {
			_, suffix, _ := createOptionsChunk(segs[i][3])
			if c, ok := chunkIndex(suffix); ok && obj.vals[i].kind == jString {
				byIndex[c] = i
			}
		}
		idx := slices.Sorted(maps.Keys(byIndex))
		if len(idx) == 0 || idx[0] != 0 {
			continue
		}
		var text strings.Builder
		for _, c := range idx {
			text.WriteString(obj.vals[byIndex[c]].s)
		}
		opts, err := parseJSON([]byte(text.String()), "")
		if err != nil {
			continue // not JSON: each chunk is looked at as a string
		}
		parsed = append(parsed, g.prefix)
		if !r.dockerOptions(opts) {
			continue
		}
		replace[byIndex[0]] = chunkString(string(opts.encode(nil, false)))
		for _, i := range g.members {
			if i != byIndex[0] {
				drop[i] = true
			}
		}
	}
	if len(replace) > 0 {
		obj.rewriteMembers(replace, drop)
		changed = true
	}
	for i, k := range obj.keys {
		for _, p := range parsed {
			if rest, ok := strings.CutPrefix(k, p); ok && isCreateOptionsKey(rest) {
				r.done[obj.vals[i]] = true
			}
		}
	}
	return changed
}

// dockerOptions hides the secrets of Docker create options: in "Env"
// (whatever its case: Docker reads "env" as "Env"), "NAME=value" becomes
// "NAME=<redacted>" when NAME IsSecretName or value IsSecretValue; any
// other string that IsSecretValue becomes "<redacted>".
func (r *redactor) dockerOptions(opts *jnode) bool {
	if opts.kind != jObject {
		return false
	}
	changed := false
	for i, k := range opts.keys {
		v := opts.vals[i]
		if !strings.EqualFold(k, "Env") {
			changed = r.values(v, false, false) || changed
			continue
		}
		entries := v.vals
		if v.kind == jString {
			entries = []*jnode{v}
		}
		for _, e := range entries {
			if e.kind != jString {
				changed = r.values(e, false, false) || changed
				continue
			}
			name, value, _ := strings.Cut(e.s, "=")
			if (IsSecretName(name) || IsSecretValue(value)) && value != Redacted {
				r.hide(&jnode{kind: jString, s: value})
				e.s = name + "=" + Redacted
				changed = true
			}
		}
	}
	return changed
}

// IsSecretName reports whether a name (of an env variable, or of a module
// twin property) looks like it holds a secret. Case is ignored. The name is
// secret if, with everything but letters and digits removed, it contains
// PASSWORD, PASSWD, PASSPHRASE, SECRET, TOKEN, CREDENTIAL,
// CONNECTIONSTRING, DATABASEURL (or DATABASEURI), COOKIE, HMAC or JWT; or if
// one of its words is KEY, KEYS, APIKEY, ACCESSKEY, PRIVATEKEY, SHAREDKEY,
// PASS, PWD, AUTH, OAUTH, AUTHORIZATION, CERT, CERTS, CERTIFICATE,
// CERTIFICATES, SAS or SESSION; or if its last word is PAT (a personal
// access token: GITHUB_PAT, AdoPat). Words are split at characters other
// than letters and digits and at camelCase humps, so API_KEY, api-key,
// ApiKey, LogAnalyticsSharedKey, BASIC_AUTH and BlobSasUrl are secret while
// MONKEY, KEYBOARD, BYPASS_PROXY, AUTHOR, PATH and PAT_COUNT are not. The
// rule errs on the side of hiding: a certificate path or a session timeout
// is hidden too.
func IsSecretName(name string) bool {
	var compact strings.Builder
	for _, r := range strings.ToUpper(name) {
		if unicode.IsLetter(r) || unicode.IsDigit(r) {
			compact.WriteRune(r)
		}
	}
	c := compact.String()
	for _, s := range secretNameParts {
		if strings.Contains(c, s) {
			return true
		}
	}
	words := nameWords(name)
	for _, w := range words {
		if slices.Contains(secretNameWords, strings.ToUpper(w)) {
			return true
		}
	}
	return len(words) > 0 && strings.EqualFold(words[len(words)-1], "PAT")
}

var (
	// secretNameParts make a name secret wherever they appear in it.
	secretNameParts = []string{"PASSWORD", "PASSWD", "PASSPHRASE", "SECRET", "TOKEN", "CREDENTIAL", "CONNECTIONSTRING",
		"DATABASEURL", "DATABASEURI", "COOKIE", "HMAC", "JWT"}
	// secretNameWords make a name secret when they are one of its words.
	secretNameWords = []string{"KEY", "KEYS", "APIKEY", "ACCESSKEY", "PRIVATEKEY", "SHAREDKEY", "PASS", "PWD",
		"AUTH", "OAUTH", "AUTHORIZATION", "CERT", "CERTS", "CERTIFICATE", "CERTIFICATES", "SAS", "SESSION"}
	// secretValueMarkers make a value secret wherever they appear in it,
	// case ignored: the secret parts of Azure, storage and database
	// connection strings, and SAS tokens.
	secretValueMarkers = []string{"sharedaccesskey=", "accountkey=", "password=", "pwd=", "sharedaccesssignature "}
)

// IsSecretValue reports whether a value looks like a secret whatever the
// name it is given under: a connection string, that is a value holding
// SharedAccessKey=, AccountKey=, Password= or Pwd= anywhere (case
// ignored), such as "HostName=hub;DeviceId=d;SharedAccessKey=..."; a SAS
// token ("SharedAccessSignature sr=...&sig=..."); or a URL with a password,
// scheme://user:password@host.
func IsSecretValue(value string) bool {
	lower := strings.ToLower(value)
	for _, m := range secretValueMarkers {
		if strings.Contains(lower, m) {
			return true
		}
	}
	return hasURLPassword(value)
}

// hasURLPassword reports whether s holds scheme://user:password@ anywhere.
func hasURLPassword(s string) bool {
	for {
		i := strings.Index(s, "://")
		if i < 0 {
			return false
		}
		if i > 0 && isSchemeChar(s[i-1]) {
			rest := s[i+3:]
			end := strings.IndexAny(rest, "/?# \t\r\n\"'")
			if end < 0 {
				end = len(rest)
			}
			if at := strings.LastIndexByte(rest[:end], '@'); at > 0 && strings.Contains(rest[:at], ":") {
				return true
			}
		}
		s = s[i+3:]
	}
}

func isSchemeChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '+' || c == '-' || c == '.'
}

// nameWords splits an identifier into words at non-alphanumerics and at
// camelCase humps: "LogAnalyticsSharedKey" → Log Analytics Shared Key,
// "APIKey" → API Key, "API_KEY" → API KEY.
func nameWords(name string) []string {
	var words []string
	rs := []rune(name)
	start := -1
	for i, r := range rs {
		if !unicode.IsLetter(r) && !unicode.IsDigit(r) {
			if start >= 0 {
				words = append(words, string(rs[start:i]))
				start = -1
			}
			continue
		}
		if start < 0 {
			start = i
			continue
		}
		prev := rs[i-1]
		hump := unicode.IsUpper(r) && (unicode.IsLower(prev) ||
			unicode.IsUpper(prev) && i+1 < len(rs) && unicode.IsLower(rs[i+1]))
		if hump {
			words = append(words, string(rs[start:i]))
			start = i
		}
	}
	if start >= 0 {
		words = append(words, string(rs[start:]))
	}
	return words
}
