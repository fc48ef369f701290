// Package jsonscan finds the parts of a JSON document without decoding
// it: where each member of an object is, its key and its raw value, the
// syntax checked on the way (as encoding/json checks a document before it
// decodes one). A node restart reads the tags of a million stored devices;
// decoding each document whole into maps was most of that restart. Nothing
// here allocates, and nothing here interprets a value: a caller that meets
// anything unusual (an escaped key, say) decodes with encoding/json
// instead. It imports nothing of ours.
package jsonscan

import (
	"errors"
	"fmt"
)

// ErrSyntax: the bytes are not one JSON value.
var ErrSyntax = errors.New("invalid JSON")

// maxDepth is encoding/json's nesting limit: deeper is refused there too.
const maxDepth = 10000

// Member is one member of an object: its key as written between the
// quotes (Plain says it holds no escape, so it is the key itself) and its
// value's bytes.
type Member struct {
	Key   []byte
	Plain bool
	Value []byte
}

// Object is an iterator over the members of a JSON object, in document
// order, duplicates included.
type Object struct {
	b   []byte
	i   int
	n   int // members read
	err error
}

// NewObject starts reading the object b (white space around it allowed).
// An error says b is not an object; the syntax of the members is checked
// as they are read (Next, Err).
func NewObject(b []byte) (Object, error) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return Object{}, fmt.Errorf("%w: not an object", ErrSyntax)
	}
	return Object{b: b, i: i + 1}, nil
}

// Next reads the next member; false at the end of the object or on an
// error (Err). After the last member it checks that nothing but white
// space follows the object.
func (o *Object) Next(m *Member) bool {
	if o.err != nil || o.i < 0 {
		return false
	}
	b, i := o.b, skipSpace(o.b, o.i)
	if o.n > 0 {
		if i < len(b) && b[i] == ',' {
			i = skipSpace(b, i+1)
		} else {
			return o.end(i)
		}
	} else if i < len(b) && b[i] == '}' {
		return o.end(i)
	}
	if i >= len(b) || b[i] != '"' {
		return o.fail(i, "a member's key")
	}
	end, plain, err := skipString(b, i)
	if err != nil {
		o.err = err
		return false
	}
	m.Key, m.Plain = b[i+1:end-1], plain
	i = skipSpace(b, end)
	if i >= len(b) || b[i] != ':' {
		return o.fail(i, "':'")
	}
	i = skipSpace(b, i+1)
	end, err = skipValue(b, i, 1)
	if err != nil {
		o.err = err
		return false
	}
	m.Value = b[i:end]
	o.i, o.n = end, o.n+1
	return true
}

// end checks the closing brace at b[i] and that only white space follows.
func (o *Object) end(i int) bool {
	if i >= len(o.b) || o.b[i] != '}' {
		return o.fail(i, "',' or '}'")
	}
	if j := skipSpace(o.b, i+1); j != len(o.b) {
		return o.fail(j, "the end of the document")
	}
	o.i = -1
	return false
}

func (o *Object) fail(i int, want string) bool {
	o.err = syntaxError(o.b, i, want)
	return false
}

// Err is the syntax error that stopped Next, nil at a well-formed end.
func (o *Object) Err() error { return o.err }

// Valid reports whether b is one JSON value (white space around it
// allowed), as encoding/json.Valid does.
func Valid(b []byte) bool {
	i := skipSpace(b, 0)
	end, err := skipValue(b, i, 0)
	return err == nil && skipSpace(b, end) == len(b)
}

func syntaxError(b []byte, i int, want string) error {
	if i >= len(b) {
		return fmt.Errorf("%w: the document ends where %s was expected", ErrSyntax, want)
	}
	return fmt.Errorf("%w: byte %d: %q where %s was expected", ErrSyntax, i, b[i], want)
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipValue returns the end of the value that starts at b[i].
func skipValue(b []byte, i, depth int) (int, error) {
	if i >= len(b) {
		return i, syntaxError(b, i, "a value")
	}
	switch c := b[i]; {
	case c == '"':
		end, _, err := skipString(b, i)
		return end, err
	case c == '{' || c == '[':
		return skipContainer(b, i, depth+1)
	case c == '-' || c >= '0' && c <= '9':
		return skipNumber(b, i)
	case c == 't':
		return skipLiteral(b, i, "true")
	case c == 'f':
		return skipLiteral(b, i, "false")
	case c == 'n':
		return skipLiteral(b, i, "null")
	}
	return i, syntaxError(b, i, "a value")
}

// skipContainer skips an object or an array starting at b[i].
func skipContainer(b []byte, i, depth int) (int, error) {
	if depth > maxDepth {
		return i, fmt.Errorf("%w: nested deeper than %d", ErrSyntax, maxDepth)
	}
	obj := b[i] == '{'
	closing := byte(']')
	if obj {
		closing = '}'
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == closing {
		return i + 1, nil
	}
	for {
		if obj {
			if i >= len(b) || b[i] != '"' {
				return i, syntaxError(b, i, "a member's key")
			}
			end, _, err := skipString(b, i)
			if err != nil {
				return end, err
			}
			i = skipSpace(b, end)
			if i >= len(b) || b[i] != ':' {
				return i, syntaxError(b, i, "':'")
			}
			i = skipSpace(b, i+1)
		}
		end, err := skipValue(b, i, depth)
		if err != nil {
			return end, err
		}
		i = skipSpace(b, end)
		switch {
		case i < len(b) && b[i] == ',':
			i = skipSpace(b, i+1)
		case i < len(b) && b[i] == closing:
			return i + 1, nil
		default:
			return i, syntaxError(b, i, fmt.Sprintf("',' or %q", closing))
		}
	}
}

// skipString returns the end of the string starting at b[i] (after its
// closing quote) and whether it holds no escape.
func skipString(b []byte, i int) (end int, plain bool, err error) {
	plain = true
	for i++; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"':
			return i + 1, plain, nil
		case c < 0x20:
			return i, false, syntaxError(b, i, "a character of a string")
		case c == '\\':
			plain = false
			i++
			if i >= len(b) {
				return i, false, syntaxError(b, i, "an escape")
			}
			switch b[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				for k := 0; k < 4; k++ {
					i++
					if i >= len(b) || !isHex(b[i]) {
						return i, false, syntaxError(b, i, "a hex digit")
					}
				}
			default:
				return i, false, syntaxError(b, i, "an escape")
			}
		}
	}
	return i, false, syntaxError(b, i, "the end of a string")
}

func isHex(c byte) bool { return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' }

// skipNumber skips -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?.
func skipNumber(b []byte, i int) (int, error) {
	if b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && b[i] >= '1' && b[i] <= '9':
		i = skipDigits(b, i)
	default:
		return i, syntaxError(b, i, "a digit")
	}
	if i < len(b) && b[i] == '.' {
		if i+1 >= len(b) || !isDigit(b[i+1]) {
			return i + 1, syntaxError(b, i+1, "a digit")
		}
		i = skipDigits(b, i+1)
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if i >= len(b) || !isDigit(b[i]) {
			return i, syntaxError(b, i, "a digit")
		}
		i = skipDigits(b, i)
	}
	return i, nil
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func skipDigits(b []byte, i int) int {
	for i < len(b) && isDigit(b[i]) {
		i++
	}
	return i
}

func skipLiteral(b []byte, i int, lit string) (int, error) {
	if len(b)-i < len(lit) || string(b[i:i+len(lit)]) != lit {
		return i, syntaxError(b, i, lit)
	}
	return i + len(lit), nil
}
