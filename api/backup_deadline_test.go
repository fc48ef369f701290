package api_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"appliance/api"
)

// slowBackup is a Backend whose backup takes a while to make and then
// comes out in chunks with pauses: a large state on a slow disk. Only
// Backup is implemented; the test calls no other route.
type slowBackup struct {
	api.Backend
	chunks [][]byte
	pause  time.Duration
}

func (b slowBackup) Backup(ctx context.Context) (io.ReadCloser, int64, error) {
	time.Sleep(b.pause) // making the archive
	size := 0
	for _, c := range b.chunks {
		size += len(c)
	}
	return io.NopCloser(&pausingReader{chunks: b.chunks, pause: b.pause}), int64(size), nil
}

type pausingReader struct {
	chunks [][]byte
	pause  time.Duration
}

func (r *pausingReader) Read(p []byte) (int, error) {
	if len(r.chunks) == 0 {
		return 0, io.EOF
	}
	time.Sleep(r.pause)
	n := copy(p, r.chunks[0])
	r.chunks[0] = r.chunks[0][n:]
	if len(r.chunks[0]) == 0 {
		r.chunks = r.chunks[1:]
	}
	return n, nil
}

// TestBackup_OutlastsTheServersRequestTimeouts: the node's API server
// bounds a whole request and a whole response (read and write timeouts);
// a backup download, larger and slower than any other answer, renews its
// write deadline per chunk instead, so it completes when it takes longer
// than both.
func TestBackup_OutlastsTheServersRequestTimeouts(t *testing.T) {
	var chunks [][]byte
	var want []byte
	for i := range 8 {
		c := bytes.Repeat([]byte{byte('a' + i)}, 32<<10)
		chunks = append(chunks, c)
		want = append(want, c...)
	}
	srv, err := api.NewServer(api.ServerConfig{Backend: slowBackup{chunks: chunks, pause: 100 * time.Millisecond}, Token: "t0ken"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// Timeouts far below the download's nine pauses.
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: time.Second, ReadTimeout: 250 * time.Millisecond, WriteTimeout: 250 * time.Millisecond}
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })

	c := &api.Client{BaseURL: "http://" + ln.Addr().String(), Token: "t0ken"}
	var got bytes.Buffer
	n, err := c.Backup(context.Background(), &got)
	if err != nil {
		t.Fatalf("backup download: %v (after %d bytes)", err, n)
	}
	if !bytes.Equal(got.Bytes(), want) {
		t.Fatalf("got %d bytes, want the %d of the archive", got.Len(), len(want))
	}
}
