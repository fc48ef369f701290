package evaluator

import (
	"errors"
	"fmt"
)

var (
	// ErrInvalidCondition matches every error Compile and CompileQuery
	// return: the HTTP edge maps it to 400 with errors.Is.
	ErrInvalidCondition = errors.New("invalid condition")
	// ErrNoDeploymentID: a Deployment given to the engine has an empty ID.
	ErrNoDeploymentID = errors.New("deployment id must not be empty")
	// ErrNotTargetCondition: a condition compiled with CompileQuery names a
	// root other than deviceId and tags, so the engine cannot evaluate it.
	ErrNotTargetCondition = errors.New("condition names properties other than deviceId and tags")
)

// SyntaxError is a condition the compiler refuses. Column is 1-based and
// counts characters (not bytes) from the start of the condition, so an
// editor or the CLI can point at it.
type SyntaxError struct {
	Column int
	Msg    string
}

func (e *SyntaxError) Error() string { return fmt.Sprintf("column %d: %s", e.Column, e.Msg) }

// Is makes every SyntaxError match ErrInvalidCondition.
func (e *SyntaxError) Is(target error) bool { return target == ErrInvalidCondition }

func syntaxErr(col int, format string, args ...any) *SyntaxError {
	return &SyntaxError{Column: col, Msg: fmt.Sprintf(format, args...)}
}
