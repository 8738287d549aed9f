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
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// TestBuildProgressNeverBlocks: a client that stops reading does not hold
// up the builds that report to it (builds shared by several clients
// report under their locks); the lines it could not take are counted and
// said, and the activities are all stopped when it reads again.
func TestBuildProgressNeverBlocks(t *testing.T) {
	client, daemon, tun := workingTunnel(t)
	defer client.Close()
	p := newBuildProgress(tun, nil)
	drv := "/nix/store/00000000000000000000000000000000-x.drv"
	p.BuildStarted(drv, "", build.ModeNormal, build.Round{N: 1, Of: 1})
	for i := 0; i < 3*maxQueuedLines; i++ { // far more than a socket buffer holds
		p.BuildLogLine(drv, "a line of output that nobody reads for a while")
		p.BuildsProgress(0, 1, 1, 0)
	}
	p.BuildFinished(drv, nil)
	data := closeAndRead(p, client, daemon)
	if !bytes.Contains(data, []byte("lines of build output were not sent")) {
		t.Error("the dropped lines were not reported")
	}
	if n := bytes.Count(data, []byte("a line of output")); n == 0 || n >= 3*maxQueuedLines {
		t.Errorf("%d lines of %d sent, want some left out", n, 3*maxQueuedLines)
	}
}

// closeAndRead closes p and the daemon's end, and returns all the client
// got.
func closeAndRead(p *buildProgress, client, daemon net.Conn) []byte {
	read := make(chan []byte)
	go func() {
		data, _ := io.ReadAll(client)
		read <- data
	}()
	p.close()
	daemon.Close()
	return <-read
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

// TestRemoteActivities: the build hook's activities become the client's,
// with their results, under ids of the daemon's own; those the hook left
// open are stopped with the build; events for unknown ids are dropped.
func TestRemoteActivities(t *testing.T) {
	client, daemon, tun := workingTunnel(t)
	defer client.Close()
	p := newBuildProgress(tun, nil)
	drv := "/nix/store/00000000000000000000000000000000-x.drv"
	p.BuildStarted(drv, "ssh-ng://m", build.ModeNormal, build.Round{N: 1, Of: 1})
	p.RemoteActivity(drv, build.RemoteEvent{Action: "start", ID: 7, Level: 3, Type: actBuild, Text: "remote building", Fields: []any{drv, "", uint64(1), uint64(1)}})
	p.RemoteActivity(drv, build.RemoteEvent{Action: "result", ID: 7, Type: resBuildLogLine, Fields: []any{"remote line"}})
	p.RemoteActivity(drv, build.RemoteEvent{Action: "result", ID: 8, Type: resBuildLogLine, Fields: []any{"lost line"}})
	p.RemoteActivity(drv, build.RemoteEvent{Action: "stop", ID: 7})
	p.RemoteActivity(drv, build.RemoteEvent{Action: "start", ID: 9, Level: 4, Type: 0, Text: "left open"})
	p.BuildFinished(drv, nil)
	d := wire.NewDecoder(bytes.NewReader(closeAndRead(p, client, daemon)))
	started := map[uint64]string{}
	stopped := map[uint64]bool{}
	var results []string
	for {
		tag := d.U64("tag")
		if d.Err() != nil {
			break
		}
		switch tag {
		case wire.StderrStartActivity:
			id := d.U64("id")
			d.U64("level")
			d.U64("type")
			started[id] = d.String("text", 1<<20)
			readTestFields(d)
			d.U64("parent")
		case wire.StderrStopActivity:
			stopped[d.U64("id")] = true
		case wire.StderrResult:
			id := d.U64("id")
			d.U64("type")
			if f := readTestFields(d); len(f) > 0 {
				results = append(results, started[id]+": "+f[0])
			}
		case wire.StderrNext:
			d.String("line", 1<<20)
		default:
			t.Fatalf("unexpected tag %#x", tag)
		}
	}
	texts := map[string]bool{}
	for id, text := range started {
		texts[text] = true
		if !stopped[id] {
			t.Errorf("activity %q not stopped", text)
		}
	}
	if !texts["building '"+drv+"' on 'ssh-ng://m'"] || !texts["remote building"] || !texts["left open"] {
		t.Errorf("activities: %v", texts)
	}
	if len(results) != 1 || results[0] != "remote building: remote line" {
		t.Errorf("results: %q", results)
	}
}

// readTestFields reads an activity's fields, returning the strings.
func readTestFields(d *wire.Decoder) []string {
	var out []string
	for n := d.U64("fields"); n > 0 && d.Err() == nil; n-- {
		if d.U64("field type") == 1 {
			out = append(out, d.String("field", 1<<20))
		} else {
			d.U64("field")
		}
	}
	return out
}

// TestSubstCounts: the paths a substitution call plans are expected from
// its start, each once; an attempt that fails leaves its path expected
// while the call may try another cache; a path no cache had, or one that
// was valid already, is expected no more once its call settles it, nor
// counted running if the call gave up waiting for it; an attempt no call
// planned (a repair) counts as it starts.
func TestSubstCounts(t *testing.T) {
	client, daemon, tun := workingTunnel(t)
	defer client.Close()
	p := newBuildProgress(tun, nil)
	defer closeAndRead(p, client, daemon)
	path := func(name string) storepath.Path {
		sp, err := storepath.ParseBase("00000000000000000000000000000000-" + name)
		if err != nil {
			t.Fatal(err)
		}
		return sp
	}
	a, b, c, d, e := path("a"), path("b"), path("c"), path("d"), path("e")
	check := func(step string, substs [4]int, nar, download uint64) {
		t.Helper()
		p.mu.Lock()
		got := p.counts
		p.mu.Unlock()
		if got.substs != substs || got.narBytes != nar || got.download != download {
			t.Errorf("%s: substitutions %v (done, expected, running, failed), NAR bytes %d, download %d; want %v, %d, %d",
				step, got.substs, got.narBytes, got.download, substs, nar, download)
		}
	}
	p.substPlanned(a, 100, 10)
	p.substPlanned(b, 200, 20)
	p.substPlanned(c, 300, 30)
	p.substPlanned(a, 100, 10) // a second call for the same path
	check("planned", [4]int{0, 3, 0, 0}, 600, 60)
	p.substStarted(a, 100, 10)
	check("a started", [4]int{0, 3, 1, 0}, 600, 60)
	p.substEnded(a, false)
	check("a failed once", [4]int{0, 3, 0, 0}, 600, 60)
	p.substStarted(a, 100, 10)
	p.substEnded(a, true)
	p.substSettled(a)
	p.substSettled(a)
	check("a fetched", [4]int{1, 3, 0, 0}, 600, 60)
	p.substStarted(b, 200, 20)
	p.substEnded(b, false)
	p.substSettled(b)
	check("b failed", [4]int{1, 2, 0, 0}, 400, 40)
	p.substSettled(c)
	check("c valid already", [4]int{1, 1, 0, 0}, 100, 10)
	p.substStarted(d, 5, 1)
	check("d started unplanned", [4]int{1, 2, 1, 0}, 105, 11)
	p.substEnded(d, false)
	check("d failed", [4]int{1, 1, 0, 0}, 100, 10)
	// A call cancelled while it waits for a download hears no end of it.
	p.substPlanned(e, 7, 2)
	p.substStarted(e, 7, 2)
	check("e started", [4]int{1, 2, 1, 0}, 107, 12)
	p.substSettled(e)
	check("e given up", [4]int{1, 1, 0, 0}, 100, 10)
	p.substEnded(e, false) // late: counted no more
	check("e ended late", [4]int{1, 1, 0, 0}, 100, 10)
}
