package daemon

import (
	"bytes"
	"io"
	"strings"
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
	p := c.newSubstProgress(nil)

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

// TestProgressFlushStalledClient: Flush does not wait for ever for a
// client that does not read (a suspended nix-build): the goals that
// substitute in its name serve other clients too.
func TestProgressFlushStalledClient(t *testing.T) {
	client, daemon, tun := workingTunnel(t)
	c := &conn{tun: tun, dir: storepath.DefaultDir}
	p := c.newSubstProgress(nil)
	defer func() {
		client.Close() // the writer's blocked write fails
		daemon.Close()
		p.close()
	}()
	path, _ := storepath.DefaultDir.Parse("/nix/store/00000000000000000000000000000000-a")
	long := "http://" + strings.Repeat("x", 64<<10)
	for i := range 200 { // far more than the socket holds
		p.Event(substitute.Event{Kind: substitute.EventStart, Type: substitute.ActCopyPath, ID: uint64(i + 1), Path: path, Upstream: long})
	}
	flushed := make(chan struct{})
	go func() {
		p.Flush()
		close(flushed)
	}()
	select {
	case <-flushed:
	case <-time.After(30 * time.Second):
		t.Fatal("Flush still waits for a client that does not read")
	}
}
