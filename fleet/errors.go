package fleet

import (
	"errors"
	"fmt"
)

// Sentinel errors shared by every layer. The HTTP edge maps them to status
// codes with errors.Is.
var (
	// ErrNotFound: the named device or deployment does not exist.
	ErrNotFound = errors.New("not found")
	// ErrExists: a create named an id that is already taken.
	ErrExists = errors.New("already exists")
	// ErrPreconditionFailed: an If-Match etag did not match the stored one.
	ErrPreconditionFailed = errors.New("precondition failed")
	// ErrInvalid: the request is malformed; usually wrapped in a ValidationError.
	ErrInvalid = errors.New("invalid")
	// ErrImmutable: the request tried to change something that cannot change.
	ErrImmutable = errors.New("immutable")
	// ErrConflict: the request does not fit the resource's current state
	// (resuming a rollout that is not paused, resetting a device a
	// deployment applies to).
	ErrConflict = errors.New("conflict")
)

// ValidationError names the field (a JSON path such as
// "content.modulesContent.$edgeAgent.properties.desired.modules.temp.status")
// that made a request invalid.
type ValidationError struct {
	Field string
	Msg   string
}

func (e *ValidationError) Error() string {
	if e.Field == "" {
		return e.Msg
	}
	return fmt.Sprintf("%s: %s", e.Field, e.Msg)
}

// Is makes every ValidationError match ErrInvalid.
func (e *ValidationError) Is(target error) bool { return target == ErrInvalid }

// Invalid builds a ValidationError with a formatted message.
func Invalid(field, format string, args ...any) *ValidationError {
	return &ValidationError{Field: field, Msg: fmt.Sprintf(format, args...)}
}
