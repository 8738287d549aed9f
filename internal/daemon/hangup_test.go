package daemon

import (
	"context"
	"errors"
	"net"
	"os"
	"strconv"
	"strings"
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
		c, s := dialAccept(t, l)
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

// TestHangupWatchesShareAThread: ops under way at once do not hold a
// thread each while they watch for their clients' hang-ups (the runtime
// keeps the threads it made: a burst of waiting clients left hundreds),
// and each is still told of its own client's hang-up, and only of it.
func TestHangupWatchesShareAThread(t *testing.T) {
	const n = 200
	l, err := net.Listen("unix", t.TempDir()+"/s")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	theHangupPoller() // its thread is not the watches'
	before := threads(t)
	clients := make([]net.Conn, n)
	ctxs := make([]context.Context, n)
	stops := make([]func(), n)
	for i := range n {
		c, s := dialAccept(t, l)
		defer s.Close()
		clients[i] = c
		ctxs[i], stops[i] = newHangupWatcher(s).watch(context.Background())
	}
	time.Sleep(100 * time.Millisecond) // for any thread the watches would make
	if after := threads(t); after-before > n/4 {
		t.Errorf("%d threads with %d watches, %d before", after, n, before)
	}
	clients[7].Close()
	select {
	case <-ctxs[7].Done():
	case <-time.After(10 * time.Second):
		t.Fatal("no hang-up seen")
	}
	for i := range n {
		if i != 7 && ctxs[i].Err() != nil {
			t.Errorf("watch %d ended (%v) by another client's hang-up", i, context.Cause(ctxs[i]))
		}
		stops[i]()
		clients[i].Close()
	}
}

// dialAccept connects a client to l and returns both ends.
func dialAccept(t *testing.T, l net.Listener) (client, server net.Conn) {
	t.Helper()
	client, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	return client, server
}

// threads is the number of the process's threads.
func threads(t *testing.T) int {
	t.Helper()
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no Threads line in /proc/self/status")
	return 0
}

// TestHangupUnwatchable: a descriptor that cannot be watched (epoll
// refuses a regular file, as --stdio could be given one) leaves the op's
// context as it was: unwatched, not ended.
func TestHangupUnwatchable(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "stdin")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, stop := newHangupWatcher(f).watch(context.Background())
	defer stop()
	if err := ctx.Err(); err != nil {
		t.Fatalf("the op's context ended (%v, %v) for a descriptor that cannot be watched", err, context.Cause(ctx))
	}
}
