package daemon

import (
	"bytes"
	"io"
	"testing"
	"time"

	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/substitute"
)

// TestProgressFlush: Flush returns once every substitution event so far
// is on the wire, even while the writer would otherwise wait for its next
// interval, so that what follows (a build's lines) comes after them.
func TestProgressFlush(t *testing.T) {
	client, daemon, tun := workingTunnel(t)
	defer client.Close()
	c := &conn{tun: tun, dir: storepath.DefaultDir}
	p := c.newProgress()

	got := &bytes.Buffer{}
	// What Flush has waited for is in the socket already: a read that
	// does not wait (shorter than the writer's interval) gets it.
	read := func() {
		t.Helper()
		buf := make([]byte, 64<<10)
		client.SetReadDeadline(time.Now().Add(time.Millisecond))
		for {
			n, err := client.Read(buf)
			got.Write(buf[:n])
			if err != nil {
				return // the deadline: nothing more was written
			}
		}
	}
	path, _ := storepath.DefaultDir.Parse("/nix/store/00000000000000000000000000000000-a")
	for i, name := range []string{"first-cache", "second-cache"} {
		p.Event(substitute.Event{Kind: substitute.EventStart, Type: substitute.ActCopyPath, ID: uint64(i + 1), Path: path, Upstream: "http://" + name})
		p.Flush()
		read()
		if !bytes.Contains(got.Bytes(), []byte("copying path '/nix/store/00000000000000000000000000000000-a' from 'http://"+name+"'")) {
			t.Fatalf("after Flush, event %d is not on the wire: %q", i, got.Bytes())
		}
	}
	done := make(chan struct{})
	go func() {
		io.Copy(io.Discard, client)
		close(done)
	}()
	p.close()
	daemon.Close()
	<-done
}
