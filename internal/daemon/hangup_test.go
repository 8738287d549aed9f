package daemon

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

// TestHangupWatcher: the op's context ends with errHangup when the client
// closes its end, and not when the op ends first.
func TestHangupWatcher(t *testing.T) {
	for _, hangUp := range []bool{true, false} {
		server, client := net.Pipe() // no descriptor: no watcher
		if newHangupWatcher(server) != nil {
			t.Fatal("a watcher for a connection without a descriptor")
		}
		server.Close()
		client.Close()

		l, err := net.Listen("unix", t.TempDir()+"/s")
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("unix", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		ctx, stop := newHangupWatcher(s).watch(context.Background())
		if hangUp {
			c.Close()
			select {
			case <-ctx.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("no hang-up seen")
			}
			if !errors.Is(context.Cause(ctx), errHangup) {
				t.Errorf("cause %v, want errHangup", context.Cause(ctx))
			}
			stop()
		} else {
			// A client that only shuts down its writing side still waits
			// for the reply: not a hang-up.
			c.(*net.UnixConn).CloseWrite()
			select {
			case <-ctx.Done():
				t.Errorf("a half-closed client counted as gone: %v", context.Cause(ctx))
			case <-time.After(200 * time.Millisecond):
			}
			stop()
			if errors.Is(context.Cause(ctx), errHangup) {
				t.Errorf("an op that ended saw a hang-up")
			}
			c.Close()
		}
		s.Close()
		l.Close()
	}
}
