package daemon

import (
	"bytes"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/nixyard/nixyard/internal/build"
	"github.com/nixyard/nixyard/internal/daemon/wire"
)

// TestBuildProgressNeverBlocks: a client that stops reading does not hold
// up the builds that report to it (builds shared by several clients
// report under their locks); the lines it could not take are counted and
// said, and the activities are all stopped when it reads again.
func TestBuildProgressNeverBlocks(t *testing.T) {
	client, daemon, tun := workingTunnel(t)
	defer client.Close()
	p := newBuildProgress(tun)
	drv := "/nix/store/00000000000000000000000000000000-x.drv"
	p.BuildStarted(drv, "", build.ModeNormal)
	for i := 0; i < 3*maxQueuedLines; i++ { // far more than a socket buffer holds
		p.BuildLogLine(drv, "a line of output that nobody reads for a while")
		p.BuildsProgress(0, 1, 1, 0)
	}
	p.BuildFinished(drv, nil)
	read := make(chan []byte)
	go func() {
		data, _ := io.ReadAll(client)
		read <- data
	}()
	p.close()
	daemon.Close()
	data := <-read
	if !bytes.Contains(data, []byte("lines of build output were not sent")) {
		t.Error("the dropped lines were not reported")
	}
	if n := bytes.Count(data, []byte("a line of output")); n == 0 || n >= 3*maxQueuedLines {
		t.Errorf("%d lines of %d sent, want some left out", n, 3*maxQueuedLines)
	}
}

// workingTunnel returns a tunnel in an op's work (protocol 1.34) that
// writes to daemon, the other end of client: a socket pair, whose writes
// block once its buffer is full and the client does not read.
func workingTunnel(t *testing.T) (client, daemon net.Conn, tun *tunnel) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	client, daemon = socketConn(t, fds[0]), socketConn(t, fds[1])
	tun = newTunnel(wire.NewEncoder(daemon), 34)
	tun.working = true
	return client, daemon, tun
}

func socketConn(t *testing.T, fd int) net.Conn {
	t.Helper()
	f := os.NewFile(uintptr(fd), "socket")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
