//go:build !unix

package broker

// waitReadable returns at once where there is no MSG_PEEK: a burst then
// waits in its read, and an idle connection keeps its burst's goroutine.
func (c *trackedConn) waitReadable() error { return nil }
