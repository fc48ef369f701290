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

// RedactContent returns a copy of a deployment's content that is safe to
// show to a reader: every secret is replaced by "<redacted>". Secrets are,
// in $edgeAgent's desired properties (whole, or set by layered keys such as
// "properties.desired.runtime.settings.registryCredentials.acr"):
//
//   - the password of every registry credential,
//     runtime.settings.registryCredentials.<name>.password, and any other
//     member of a credential but username and address (a credential whose
//     name has dots, set by a layered key, is hidden whole);
//   - the value of every env variable of a module or system module whose
//     name IsSecretName, (modules|systemModules).<name>.env.<NAME>.value;
//   - in the Docker create options of a module or system module (string
//     chunks or template object), every "NAME=value" entry of "Env" whose
//     NAME IsSecretName, which becomes "NAME=<redacted>"; the string is
//     re-encoded and re-chunked.
//
// Everything else (module twins' desired properties, command lines,
// registry user names) is shown as it is. If nothing is redacted the copy
// is byte for byte the content; otherwise it is compact JSON with members in
// their original order. Content that is not valid JSON cannot be redacted
// and is replaced whole by the JSON string "<redacted>". If content is a
// whole configuration object, its "content" is redacted too.
func RedactContent(content json.RawMessage) json.RawMessage {
	root, err := parseJSON(content, "content")
	if err != nil {
		return json.RawMessage(`"` + Redacted + `"`)
	}
	changed := redactContent(root)
	if c, ok := root.get("content"); ok {
		changed = redactContent(c) || changed
	}
	if !changed {
		return append(json.RawMessage(nil), content...)
	}
	return root.encode(nil, false)
}

func redactContent(content *jnode) bool {
	changed := false
	_ = walkAgentDesired(content, "", func(obj *jnode, _ string, segs [][]string) error {
		for i, s := range segs {
			if isSecretPath(s, obj.vals[i]) {
				obj.vals[i] = &jnode{kind: jString, s: Redacted}
				changed = true
			}
		}
		if redactCreateOptions(obj, segs) {
			changed = true
		}
		return nil
	})
	return changed
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

// redactCreateOptions redacts the secret Env entries of the createOptions
// chunk groups among obj's members.
func redactCreateOptions(obj *jnode, segs [][]string) bool {
	changed := false
	replace := map[int][]string{}
	drop := map[int]bool{}
	for _, g := range createOptionsGroups(obj, segs) {
		first := g.members[0]
		if v := obj.vals[first]; v.kind == jObject {
			changed = redactDockerEnv(v) || changed
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
		if err != nil || !redactDockerEnv(opts) {
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
	return changed
}

// redactDockerEnv hides the secret values of the "Env" list of Docker
// create options: "NAME=value" becomes "NAME=<redacted>".
func redactDockerEnv(opts *jnode) bool {
	env, ok := opts.get("Env")
	if !ok || env.kind != jArray {
		return false
	}
	changed := false
	for _, e := range env.vals {
		if e.kind != jString {
			continue
		}
		name, value, _ := strings.Cut(e.s, "=")
		if IsSecretName(name) && value != Redacted {
			e.s = name + "=" + Redacted
			changed = true
		}
	}
	return changed
}

// IsSecretName reports whether an env variable name looks like it holds a
// secret. Case is ignored. The name is secret if, with everything but
// letters and digits removed, it contains PASSWORD, PASSWD, SECRET, TOKEN,
// CREDENTIAL or CONNECTIONSTRING; or if one of its words is KEY, KEYS,
// APIKEY, ACCESSKEY, PRIVATEKEY, SHAREDKEY, PASS or PWD. Words are split at
// characters other than letters and digits and at camelCase humps, so
// API_KEY, api-key, ApiKey and LogAnalyticsSharedKey are secret while
// MONKEY, KEYBOARD and BYPASS_PROXY are not.
func IsSecretName(name string) bool {
	var compact strings.Builder
	for _, r := range strings.ToUpper(name) {
		if unicode.IsLetter(r) || unicode.IsDigit(r) {
			compact.WriteRune(r)
		}
	}
	c := compact.String()
	for _, s := range []string{"PASSWORD", "PASSWD", "SECRET", "TOKEN", "CREDENTIAL", "CONNECTIONSTRING"} {
		if strings.Contains(c, s) {
			return true
		}
	}
	for _, w := range nameWords(name) {
		switch strings.ToUpper(w) {
		case "KEY", "KEYS", "APIKEY", "ACCESSKEY", "PRIVATEKEY", "SHAREDKEY", "PASS", "PWD":
			return true
		}
	}
	return false
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
