package fleet

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// PlaceholderError reports a template placeholder that the variables given
// do not define.
type PlaceholderError struct {
	Name        string // the variable name, e.g. CONTAINER_REGISTRY_PASSWORD
	Placeholder string // as written, e.g. ${CONTAINER_REGISTRY_PASSWORD}
	Line        int    // 1-based line of the template
}

func (e *PlaceholderError) Error() string {
	return fmt.Sprintf("unresolved placeholder %s (line %d)", e.Placeholder, e.Line)
}

// Is makes a PlaceholderError match ErrInvalid.
func (e *PlaceholderError) Is(target error) bool { return target == ErrInvalid }

// ExpandTemplate replaces the placeholders of a deployment template.
// Templates are the *.template.json files of iotedgedev and the VS Code IoT
// Edge extension: manifests with placeholders and createOptions written as
// JSON objects. Those tools expand placeholders from a .env file
// and the environment, and stringify createOptions, before the manifest
// reaches IoT Hub; ExpandTemplate and NormalizeCreateOptions do the same.
// Run ExpandTemplate on the file as read, so that the lines it reports are
// the file's, then ParseContentFile and NormalizeCreateOptions.
//
// The placeholder rule. Placeholders are only looked for inside JSON strings;
// the template must be valid JSON. There are two forms:
//
//   - ${NAME}, in any string (keys included, as in
//     "registryCredentials": {"${CONTAINER_REGISTRY_NAME}": ...}). NAME is
//     [A-Za-z_][A-Za-z0-9_.]* (iotedgedev's ${MODULES.SampleModule.debug})
//     or iotedgedev's MODULEDIR<path> followed by [A-Za-z0-9_.]*
//     (${MODULEDIR<./modules/x>.debug}). A "${" not followed by such a name
//     and "}" is left as it is.
//   - $NAME, in string values only, never in keys. NAME is the longest run
//     of [A-Za-z0-9_] after the "$", and the "$" starts a placeholder only
//     if that run is upper case: [A-Z_][A-Z0-9_]*, like
//     $CONTAINER_REGISTRY_PASSWORD. Azure's own "$" words ($edgeAgent,
//     $edgeHub, $upstream, $version, $schema-template, routing's
//     $connectionDeviceId, $body, $iothub-..., MQTT's $iothub/...) all
//     contain lower case, so they are never placeholders.
//
// Every placeholder found must resolve: the first one (in document order)
// that lookup does not know is returned as a *PlaceholderError. A value is
// inserted JSON-escaped, so a password holding quotes or backslashes keeps
// the document valid. To write a literal "${X}" or "$X" that would be
// taken for a placeholder, escape the dollar as \u0024.
//
// ExpandTemplate returns the expanded document, which is valid JSON and
// otherwise byte for byte the template (a leading UTF-8 byte order mark is
// dropped). Errors: invalid JSON (with line and column), a duplicate key
// (with its path), or a *PlaceholderError for the first placeholder that lookup does not
// resolve. A nil lookup resolves nothing. Unlike iotedgedev, which runs
// os.path.expandvars on the file text, an unknown name is an error instead
// of being left in place, a bare $NAME must be upper case, and values are
// escaped.
func ExpandTemplate(data []byte, lookup func(name string) (string, bool)) ([]byte, error) {
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
	if _, err := parseJSON(data, ""); err != nil { // syntax errors and duplicate keys, with where
		return nil, err
	}
	if lookup == nil {
		lookup = func(string) (string, bool) { return "", false }
	}
	out := make([]byte, 0, len(data))
	line := 1
	for i := 0; i < len(data); {
		c := data[i]
		if c != '"' {
			if c == '\n' {
				line++
			}
			out = append(out, c)
			i++
			continue
		}
		end := stringEnd(data, i)
		var err error
		out = append(out, '"')
		out, err = expandString(out, data[i+1:end], isKey(data, end+1), line, lookup)
		if err != nil {
			return nil, err
		}
		out = append(out, '"')
		i = end + 1
	}
	return out, nil
}

// TemplatePlaceholders lists the variable names a template's placeholders
// need, each once, in document order.
func TemplatePlaceholders(data []byte) ([]string, error) {
	var names []string
	seen := map[string]bool{}
	_, err := ExpandTemplate(data, func(name string) (string, bool) {
		if !seen[name] {
			seen[name] = true
			names = append(names, name)
		}
		return "", true
	})
	return names, err
}

// stringEnd returns the index of the quote that closes the JSON string
// opening at data[start]. data is valid JSON.
func stringEnd(data []byte, start int) int {
	for i := start + 1; i < len(data); i++ {
		switch data[i] {
		case '\\':
			i++
		case '"':
			return i
		}
	}
	return len(data) - 1
}

// isKey reports whether the string that ended just before data[i] is an
// object key, i.e. whether a colon follows it.
func isKey(data []byte, i int) bool {
	for ; i < len(data); i++ {
		switch data[i] {
		case ' ', '\t', '\r', '\n':
			continue
		case ':':
			return true
		}
		return false
	}
	return false
}

// expandString appends the raw (still escaped) text of one JSON string to
// out with its placeholders replaced.
func expandString(out, s []byte, key bool, line int, lookup func(string) (string, bool)) ([]byte, error) {
	for j := 0; j < len(s); {
		switch s[j] {
		case '\\':
			out = append(out, s[j], s[j+1])
			j += 2
			continue
		case '$':
			name, n := placeholderAt(s[j:], key)
			if n == 0 {
				break
			}
			v, ok := lookup(name)
			if !ok {
				return nil, &PlaceholderError{Name: name, Placeholder: string(s[j : j+n]), Line: line}
			}
			esc := appendString(nil, v, false)
			out = append(out, esc[1:len(esc)-1]...)
			j += n
			continue
		}
		out = append(out, s[j])
		j++
	}
	return out, nil
}

// placeholderAt reads the placeholder starting with the "$" at s[0] and
// returns its name and length, or a length of 0 if there is none.
func placeholderAt(s []byte, key bool) (string, int) {
	if len(s) > 1 && s[1] == '{' {
		n := braceNameLen(s[2:])
		if n > 0 && 2+n < len(s) && s[2+n] == '}' {
			return string(s[2 : 2+n]), n + 3
		}
		return "", 0
	}
	if key {
		return "", 0
	}
	n := 1
	upper := true
	for n < len(s) && isWordByte(s[n]) {
		if s[n] >= 'a' && s[n] <= 'z' {
			upper = false
		}
		n++
	}
	if n == 1 || !upper || (s[1] >= '0' && s[1] <= '9') {
		return "", 0
	}
	return string(s[1:n]), n
}

func isWordByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_'
}

// braceNameLen returns the length of the ${...} name at the start of s: a
// [A-Za-z_][A-Za-z0-9_.]* name, or MODULEDIR<path> followed by
// [A-Za-z0-9_.]*. It returns 0 if s starts with neither.
func braceNameLen(s []byte) int {
	n := 0
	if rest, ok := bytes.CutPrefix(s, []byte("MODULEDIR<")); ok {
		end := bytes.IndexByte(rest, '>')
		if end <= 0 || bytes.ContainsAny(rest[:end], "\"\\{}$<") {
			return 0
		}
		n = len("MODULEDIR<") + end + 1
	} else {
		if len(s) == 0 || !(s[0] == '_' || s[0] >= 'a' && s[0] <= 'z' || s[0] >= 'A' && s[0] <= 'Z') {
			return 0
		}
		n = 1
	}
	for n < len(s) && (isWordByte(s[n]) || s[n] == '.') {
		n++
	}
	return n
}

// ParseEnvFile reads an iotedgedev .env file: one KEY=value a line, blank
// lines and lines starting with # ignored, an optional "export " before the
// key, spaces around key and value trimmed. A value may be quoted: in
// 'single quotes' it is taken as it is; in "double quotes" the escapes \\ \"
// \' \n \r \t \a \b \f \v are decoded. An unquoted value ends at " #" (a
// comment). Keys follow the ${NAME} placeholder rule, so
// MODULES.SampleModule=... can supply an image. A key set twice is an
// error naming both lines (python-dotenv lets the later line win, silently,
// so a forgotten line would change a deployment). Unlike python-dotenv,
// values are not expanded (a "${X}" in a value stays as it is) and a quoted
// value cannot span lines. Errors name the line.
func ParseEnvFile(data []byte) (map[string]string, error) {
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
	vars := map[string]string{}
	lines := map[string]int{} // key → the line that set it
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64*1024), len(data)+1)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if rest, ok := strings.CutPrefix(line, "export "); ok {
			line = strings.TrimLeft(rest, " \t")
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			return nil, Invalid("", "line %d: expected KEY=value; got %q", n, line)
		}
		key = strings.TrimSpace(key)
		if l := braceNameLen([]byte(key)); l == 0 || l != len(key) {
			return nil, Invalid("", "line %d: %q is not a variable name (letters, digits, _ and ., not starting with a digit)", n, key)
		}
		if first, dup := lines[key]; dup {
			return nil, Invalid("", "line %d: %s is already set on line %d; set each variable once", n, key, first)
		}
		v, err := envValueOf(strings.TrimSpace(value))
		if err != nil {
			return nil, Invalid("", "line %d: %s: %v", n, key, err)
		}
		vars[key], lines[key] = v, n
	}
	if err := sc.Err(); err != nil {
		return nil, Invalid("", "%v", err)
	}
	return vars, nil
}

// envValueOf decodes the value part of a .env line, already trimmed.
func envValueOf(v string) (string, error) {
	if v == "" {
		return "", nil
	}
	q := v[0]
	if q != '"' && q != '\'' {
		if i := strings.Index(v, " #"); i >= 0 {
			v = v[:i]
		}
		if i := strings.Index(v, "\t#"); i >= 0 {
			v = v[:i]
		}
		return strings.TrimSpace(v), nil
	}
	var b strings.Builder
	for i := 1; i < len(v); i++ {
		c := v[i]
		switch {
		case c == q:
			rest := strings.TrimSpace(v[i+1:])
			if rest != "" && !strings.HasPrefix(rest, "#") {
				return "", fmt.Errorf("unexpected %q after the closing quote", rest)
			}
			return b.String(), nil
		case c == '\\' && q == '"' && i+1 < len(v):
			i++
			switch v[i] {
			case 'n':
				b.WriteByte('\n')
			case 'r':
				b.WriteByte('\r')
			case 't':
				b.WriteByte('\t')
			case 'a':
				b.WriteByte('\a')
			case 'b':
				b.WriteByte('\b')
			case 'f':
				b.WriteByte('\f')
			case 'v':
				b.WriteByte('\v')
			case '\\', '"', '\'':
				b.WriteByte(v[i])
			default:
				b.WriteByte('\\')
				b.WriteByte(v[i])
			}
		default:
			b.WriteByte(c)
		}
	}
	return "", fmt.Errorf("missing closing %c", q)
}

// createOptionsChunkSize is the length of each createOptions chunk that
// NormalizeCreateOptions writes: Azure's twin limit for a string value, and
// what iotedgedev uses.
const createOptionsChunkSize = 512

// NormalizeCreateOptions turns every createOptions written as a JSON object
// (the template form) in $edgeAgent's modules and system modules into the
// string Azure's tooling sends: compact JSON, members in their original
// order, non-ASCII characters \u-escaped, exactly as iotedgedev's
// json.dumps(separators=(',', ':')) writes it. A string longer than 512
// characters is split into createOptions, createOptions01,
// createOptions02, ... of 512 characters each (iotedgedev stops at 8
// chunks; we do not). Layered keys such as
// "properties.desired.modules.m.settings.createOptions" are handled too.
//
// When nothing needs converting, content is returned unchanged; otherwise
// the result is compact JSON with members in their original order. An
// object createOptions beside createOptionsNN chunks is an error.
func NormalizeCreateOptions(content json.RawMessage) (json.RawMessage, error) {
	root, err := parseJSON(content, "content")
	if err != nil {
		return nil, err
	}
	changed := false
	err = walkAgentDesired(root, "content", func(obj *jnode, field string, segs [][]string) error {
		replace := map[int][]string{}
		for _, g := range createOptionsGroups(obj, segs) {
			first := g.members[0]
			if _, suffix, _ := createOptionsChunk(segs[first][3]); suffix != "" || obj.vals[first].kind != jObject {
				continue // no object base chunk; an object chunk is left for ValidateContent to reject
			}
			if len(g.members) > 1 {
				others := slices.Sorted(func(yield func(string) bool) {
					for _, i := range g.members[1:] {
						if !yield(obj.keys[i]) {
							return
						}
					}
				})
				return Invalid(field+"."+others[0], "conflicts with %s, which is given as an object; give the create options either as an object or as string chunks", obj.keys[first])
			}
			replace[first] = chunkString(string(obj.vals[first].encode(nil, true)))
		}
		if len(replace) > 0 {
			obj.rewriteMembers(replace, nil)
			changed = true
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if !changed {
		return content, nil
	}
	return root.encode(nil, false), nil
}

// chunkGroup is one createOptions value among an object's members: its
// chunks, whatever their spelling or suffix.
type chunkGroup struct {
	prefix  string // the key before the chunk name, "" inside settings
	members []int  // member positions, the one of the base chunk (no suffix) first if there is one
}

// createOptionsGroups finds the createOptions groups among the members of
// obj whose logical paths are segs (see walkAgentDesired), in document order.
func createOptionsGroups(obj *jnode, segs [][]string) []*chunkGroup {
	var groups []*chunkGroup
	byPrefix := map[string]*chunkGroup{}
	for i, s := range segs {
		if !isSettingsMember(s) {
			continue
		}
		base, suffix, ok := createOptionsChunk(s[3])
		if !ok {
			continue
		}
		prefix := strings.TrimSuffix(obj.keys[i], base+suffix)
		g := byPrefix[prefix]
		if g == nil {
			g = &chunkGroup{prefix: prefix}
			byPrefix[prefix] = g
			groups = append(groups, g)
		}
		if suffix == "" {
			g.members = append([]int{i}, g.members...)
		} else {
			g.members = append(g.members, i)
		}
	}
	return groups
}

// isSettingsMember reports whether a logical path below $edgeAgent's
// properties.desired is a member of a module's settings:
// (modules|systemModules).<name>.settings.<key>.
func isSettingsMember(s []string) bool {
	return len(s) == 4 && (s[0] == "modules" || s[0] == "systemModules") && s[2] == "settings"
}

// chunkString splits s into chunks of createOptionsChunkSize bytes, never
// inside a UTF-8 sequence.
func chunkString(s string) []string {
	var chunks []string
	for len(s) > createOptionsChunkSize {
		n := createOptionsChunkSize
		for n > 0 && s[n]&0xc0 == 0x80 {
			n--
		}
		chunks = append(chunks, s[:n])
		s = s[n:]
	}
	return append(chunks, s)
}

// rewriteMembers replaces each member at a position of replace, whose key
// is a createOptions chunk key without suffix, by members holding the
// chunks under that key and that key followed by 01, 02, ...; it removes the
// members at the positions of drop. One pass, whatever the number of
// changes.
func (n *jnode) rewriteMembers(replace map[int][]string, drop map[int]bool) {
	var keys []string
	var vals []*jnode
	for j, k := range n.keys {
		chunks, ok := replace[j]
		switch {
		case ok:
			for c, text := range chunks {
				keys = append(keys, k+chunkSuffix(c))
				vals = append(vals, &jnode{kind: jString, s: text})
			}
		case !drop[j]:
			keys = append(keys, k)
			vals = append(vals, n.vals[j])
		}
	}
	n.keys, n.vals, n.index = keys, vals, nil
}

// walkAgentDesired calls fn for every object at or below $edgeAgent's
// desired properties in content (its modulesContent or moduleContent),
// children before parents. segs[i] is the logical path below
// properties.desired of the object's i-th member: the members of the
// $edgeAgent entry itself are addressed by their keys, "properties.desired"
// or layered "properties.desired.<path>"; a nil segs[i] is a member outside
// properties.desired. field is the object's JSON path. If fn changes the
// object it may not rely on segs afterwards.
func walkAgentDesired(content *jnode, field string, fn func(obj *jnode, field string, segs [][]string) error) error {
	key, mc := modulesContent(content)
	entry, ok := mc.get(edgeAgent)
	if !ok || entry.kind != jObject {
		return nil
	}
	field += "." + key + "." + edgeAgent
	segs := make([][]string, len(entry.keys))
	for i, k := range entry.keys {
		if s, ok := desiredSegs(k); ok {
			segs[i] = s
		}
	}
	return walkObject(entry, field, segs, true, fn)
}

func walkObject(obj *jnode, field string, segs [][]string, atEntry bool, fn func(*jnode, string, [][]string) error) error {
	for i, v := range obj.vals {
		if segs[i] == nil || v.kind != jObject || !walkable(segs[i], atEntry) {
			continue
		}
		child := make([][]string, len(v.keys))
		for j, k := range v.keys {
			child[j] = append(segs[i][:len(segs[i]):len(segs[i])], k)
		}
		if err := walkObject(v, field+"."+obj.keys[i], child, false, fn); err != nil {
			return err
		}
	}
	return fn(obj, field, segs)
}

// walkable reports whether the object at logical path s below $edgeAgent's
// properties.desired can hold what RedactContent and NormalizeCreateOptions
// look for: runtime.settings.registryCredentials.<name> (a name may have
// dots when set by a layered key, atEntry) or
// (modules|systemModules).<name>.(env.<NAME>|settings). Walking nothing
// deeper keeps the walk linear however deep the document is.
func walkable(s []string, atEntry bool) bool {
	cred := []string{"runtime", "settings", "registryCredentials"}
	if len(s) > 3 && isPrefix(cred, s) {
		return len(s) == 4 || atEntry
	}
	if isPrefix(s, cred) {
		return true
	}
	switch {
	case len(s) > 4:
		return false
	case len(s) >= 1 && s[0] != "modules" && s[0] != "systemModules":
		return false
	case len(s) >= 3 && s[2] != "env" && s[2] != "settings":
		return false
	case len(s) == 4 && s[2] != "env":
		return false
	}
	return true
}
