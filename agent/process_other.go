//go:build !unix

package agent

import (
	"fmt"
	"runtime"
)

func newProcessDriver(Config, func()) (driver, error) {
	return nil, fmt.Errorf("the process runtime is not supported on %s", runtime.GOOS)
}
