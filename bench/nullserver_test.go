package bench

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/daemon/client"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// TestNullServer checks that the null server completes the handshake and
// SetOptions of the load client and answers QueryPathInfo with a reply
// that the client's checks accept, for any path.
func TestNullServer(t *testing.T) {
	p := PathInfo{
		Path: "/nix/store/00000000000000000000000000000000-a",
		Refs: []string{"/nix/store/11111111111111111111111111111111-b"},
		Size: 4096,
	}
	sock, done := serveOneNullConn(t, CannedPathInfo(p))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{p.Path, "/nix/store/22222222222222222222222222222222-other"} {
		sp, err := storepath.DefaultDir.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.QueryPathInfoValid(c.QueryPathInfoRequest(sp)); err != nil {
			t.Errorf("QueryPathInfo %s: %v", s, err)
		}
		info, err := c.QueryPathInfo(ctx, sp)
		if err != nil || info.NarSize != uint64(p.Size) || len(info.References) != 1 {
			t.Errorf("QueryPathInfo %s: %+v, %v", s, info, err)
		}
	}
	c.Close()
	if err := <-done; err != nil && !errors.Is(err, io.EOF) {
		t.Errorf("null server after the client closed: %v", err)
	}
}

// TestNullServerOldClient checks that a client older than the canned
// reply's protocol is refused, not answered in a format it misreads.
func TestNullServerOldClient(t *testing.T) {
	sock, done := serveOneNullConn(t, CannedPathInfo(PathInfo{Path: "/nix/store/00000000000000000000000000000000-a"}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if c, err := client.DialVersion(ctx, sock, 1<<8|21, false); err == nil {
		c.Close()
		t.Error("a protocol 1.21 client completed the handshake")
	}
	if err := <-done; err == nil || !strings.Contains(err.Error(), "needs 1.34") {
		t.Errorf("null server: %v, want a refusal naming 1.34", err)
	}
}

// serveOneNullConn serves one connection on a new socket with nullConn and
// reply; done receives nullConn's result.
func serveOneNullConn(t *testing.T, reply []byte) (sock string, done <-chan error) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "null.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	ch := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			ch <- err
			return
		}
		defer c.Close()
		ch <- nullConn(c, reply)
	}()
	return sock, ch
}
