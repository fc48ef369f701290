package fleet

import (
	"cmp"
	"encoding/json"
	"regexp"
	"slices"
	"strings"
)

// MinSecretLength is the shortest secret value RedactText looks for in
// text: a shorter one (a PIN "42", "true") would hide every occurrence of
// common words and numbers, so such values are hidden only where a rule
// finds them (a secret-looking name before them).
const MinSecretLength = 4

// SecretValues returns the values RedactContent hides in a deployment's
// content (the same rules: registry passwords, env values under secret
// names, createOptions Env entries, module twin properties under secret
// names, connection strings, SAS tokens and URLs with passwords), each
// once, longest first, and also the secret parts of connection strings and
// URLs (the SharedAccessKey= value alone, a URL's password), which a
// program may print on their own. It is what RedactText looks for in the
// free text a device produces (module logs, a support bundle). Content
// that RedactContent hides whole (not valid JSON, a duplicate key, a
// misspelled manifest key) yields none: no agent runs it.
func SecretValues(content json.RawMessage) []string {
	root, err := parseJSON(content, "content")
	if err != nil {
		return nil
	}
	contents := []*jnode{root}
	if c, ok := root.get("content"); ok {
		contents = append(contents, c)
	}
	for _, c := range contents {
		if _, mc := modulesContent(c); mc != nil && checkModulesContentSpelling(mc, "") != nil {
			return nil
		}
	}
	r := &redactor{done: map[*jnode]bool{}, collect: true}
	for _, c := range contents {
		r.content(c)
	}
	return uniqueLongestFirst(r.found)
}

func uniqueLongestFirst(values []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, v := range values {
		if v == "" || v == Redacted || seen[v] {
			continue
		}
		seen[v] = true
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b string) int {
		if c := cmp.Compare(len(b), len(a)); c != 0 {
			return c
		}
		return strings.Compare(a, b)
	})
	return out
}

// RedactText returns text (a log line, a file of a support bundle) with
// secrets replaced by "<redacted>": every occurrence of each of secrets
// (SecretValues' list; values shorter than MinSecretLength are not looked
// for), and what looks secret by itself: the value after a connection
// string's SharedAccessKey=, AccountKey=, Password= or Pwd=, a SAS token
// after "SharedAccessSignature ", a URL's password (scheme://user:pw@),
// and the value of an assignment whose name IsSecretName (API_KEY=...,
// "password": "...", token: ...). It errs on the side of hiding.
func RedactText(text string, secrets []string) string {
	for _, s := range secrets {
		if len(s) >= MinSecretLength && strings.Contains(text, s) {
			text = strings.ReplaceAll(text, s, Redacted)
		}
	}
	text = redactMarkedValues(text)
	text = redactURLPasswords(text)
	return redactAssignments(text)
}

// isValueEnd ends a secret value in free text.
func isValueEnd(c byte) bool {
	switch c {
	case ' ', '\t', '\n', '\r', ';', '"', '\'', ',', '<', '>', '`':
		return true
	}
	return false
}

// markedValues are the spans after each value marker (case ignored).
func markedValues(text string) [][2]int {
	lower := strings.ToLower(text)
	var spans [][2]int
	for _, m := range secretValueMarkers {
		for from := 0; ; {
			i := strings.Index(lower[from:], m)
			if i < 0 {
				break
			}
			start := from + i + len(m)
			end := start
			for end < len(text) && !isValueEnd(text[end]) {
				end++
			}
			if end > start && text[start:end] != Redacted {
				spans = append(spans, [2]int{start, end})
			}
			from = max(end, start)
		}
	}
	return spans
}

// urlPasswords are the spans of the passwords of scheme://user:pw@host.
func urlPasswords(text string) [][2]int {
	var spans [][2]int
	for from := 0; ; {
		i := strings.Index(text[from:], "://")
		if i < 0 {
			return spans
		}
		at := from + i
		from = at + 3
		if at == 0 || !isSchemeChar(text[at-1]) {
			continue
		}
		rest := text[from:]
		end := strings.IndexAny(rest, "/?# \t\r\n\"'")
		if end < 0 {
			end = len(rest)
		}
		auth := rest[:end]
		if a := strings.LastIndexByte(auth, '@'); a > 0 {
			if c := strings.IndexByte(auth[:a], ':'); c >= 0 && auth[c+1:a] != Redacted && a > c+1 {
				spans = append(spans, [2]int{from + c + 1, from + a})
			}
		}
	}
}

// replaceSpans replaces non-overlapping spans (any order) by Redacted.
func replaceSpans(text string, spans [][2]int) string {
	if len(spans) == 0 {
		return text
	}
	slices.SortFunc(spans, func(a, b [2]int) int { return cmp.Compare(a[0], b[0]) })
	var b strings.Builder
	last := 0
	for _, s := range spans {
		if s[0] < last {
			continue // overlaps one replaced already
		}
		b.WriteString(text[last:s[0]])
		b.WriteString(Redacted)
		last = s[1]
	}
	b.WriteString(text[last:])
	return b.String()
}

func redactMarkedValues(text string) string { return replaceSpans(text, markedValues(text)) }

func redactURLPasswords(text string) string { return replaceSpans(text, urlPasswords(text)) }

// assignment is NAME=value, NAME: value, "NAME": "value" and the like; the
// value is quoted or runs to a delimiter, and is not an object or array.
var assignment = regexp.MustCompile(`([A-Za-z0-9_.\-]+)["']?[ \t]*[=:][ \t]*("[^"]*"|'[^']*'|[^\s,;"'{\[][^\s,;"']*)`)

func redactAssignments(text string) string {
	var spans [][2]int
	for _, m := range assignment.FindAllStringSubmatchIndex(text, -1) {
		name := text[m[2]:m[3]]
		vs, ve := m[4], m[5]
		if ve-vs >= 2 && (text[vs] == '"' || text[vs] == '\'') {
			vs, ve = vs+1, ve-1
		}
		if ve <= vs || text[vs:ve] == Redacted || !IsSecretName(name) {
			continue
		}
		spans = append(spans, [2]int{vs, ve})
	}
	return replaceSpans(text, spans)
}

// secretParts are the secret parts of a value that IsSecretValue: the
// values after its markers and its URLs' passwords.
func secretParts(value string) []string {
	var out []string
	for _, s := range append(markedValues(value), urlPasswords(value)...) {
		out = append(out, value[s[0]:s[1]])
	}
	return out
}
