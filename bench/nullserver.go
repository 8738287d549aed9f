package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/nixyard/nixyard/internal/daemon/client"
	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/timerslack"
)

// The null server answers the QueryPathInfo load with one canned reply and
// does nothing else: its request rate is what the load client and the
// kernel allow any daemon to reach on this machine. Divided by the stock
// daemon's rate, it is the highest speed-up a daemon can show in the
// QueryPathInfo scenario here. In the same way it takes nix copy's upload
// (QueryValidPaths, AddMultipleToStore) and drops it, so that the time of
// a copy into it is the least any daemon can take with this client. It
// runs in a process of its own, as a daemon does: NullServerArg as the
// first argument of the benchmark's binary (see MaybeServeNull), with the
// daemon's timer slack (timerslack.Daemon), without which nixyard's own
// rate passed it on a machine where the Go runtime's short sleeps weigh
// more.
const NullServerArg = "-null-server"

// nullVersion is the protocol version of the null server's canned reply:
// the load client's.
const nullVersion = client.DefaultVersion

// CannedPathInfo encodes the reply of QueryPathInfo (protocol 1.34) for p:
// STDERR_LAST, then a valid path with p's references and a NAR size of
// p.Size, as a daemon would send it.
func CannedPathInfo(p PathInfo) []byte {
	var buf bytes.Buffer
	e := wire.NewEncoder(&buf)
	e.U64(wire.StderrLast)
	e.U64(1) // valid
	e.String("")
	e.String(strings.Repeat("0123456789abcdef", 4))
	e.Strings(p.Refs)
	e.U64(uint64(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).Unix()))
	e.U64(uint64(p.Size))
	e.U64(0) // not ultimate
	e.Strings(nil)
	e.String("")
	e.Flush()
	return buf.Bytes()
}

// MaybeServeNull runs the null server and exits if args (os.Args) ask for
// it: NullServerArg SOCKET REPLY-FILE.
func MaybeServeNull(args []string) {
	if len(args) < 2 || args[1] != NullServerArg {
		return
	}
	if len(args) != 4 {
		fmt.Fprintf(os.Stderr, "usage: %s %s SOCKET REPLY-FILE\n", args[0], NullServerArg)
		os.Exit(2)
	}
	reply, err := os.ReadFile(args[3])
	if err == nil {
		if werr := timerslack.Widen(timerslack.Daemon); werr != nil {
			fmt.Fprintf(os.Stderr, "null server: %v (widening the timer slack needs CAP_SYS_NICE; measuring with the inherited slack)\n", werr)
		}
		err = serveNull(args[2], reply)
	}
	fmt.Fprintf(os.Stderr, "null server: %v\n", err)
	os.Exit(1)
}

func serveNull(socket string, reply []byte) error {
	l, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			if err := nullConn(c, reply); err != nil && !errors.Is(err, io.EOF) {
				fmt.Fprintf(os.Stderr, "null server: connection: %v\n", err)
			}
		}()
	}
}

// nullConn runs the daemon side of the handshake, then answers SetOptions,
// QueryPathInfo (with reply, whatever the path), QueryValidPaths (none) and
// AddMultipleToStore (dropped) until the client goes.
func nullConn(c net.Conn, reply []byte) error {
	br := bufio.NewReaderSize(c, 64<<10)
	d := wire.NewDecoder(br)
	e := wire.NewEncoder(c)
	if m := d.U64("magic"); d.Err() == nil && m != wire.WorkerMagic1 {
		return fmt.Errorf("bad client magic %#x", m)
	}
	if err := d.Err(); err != nil {
		return err
	}
	// Nix's client waits for the daemon's magic and version before it
	// sends its own version.
	e.U64(wire.WorkerMagic2)
	e.U64(nullVersion)
	if err := e.Flush(); err != nil {
		return err
	}
	minor := min(d.U64("client version")&0xff, nullVersion&0xff)
	if err := d.Err(); err != nil {
		return err
	}
	if minor < nullVersion&0xff {
		// The canned reply is in the 1.34 format.
		return fmt.Errorf("client protocol 1.%d: the null server needs 1.%d", minor, nullVersion&0xff)
	}
	if minor >= 14 && d.U64("cpu affinity") != 0 {
		d.U64("cpu")
	}
	if minor >= 11 {
		d.U64("reserve space")
	}
	if minor >= 33 {
		e.String("null server")
	}
	e.U64(wire.StderrLast)
	if err := e.Flush(); err != nil {
		return err
	}
	for {
		if _, err := br.Peek(1); err != nil {
			return err // io.EOF: the client is done
		}
		op := d.U64("op")
		if err := d.Err(); err != nil {
			return err
		}
		switch op {
		case wire.OpSetOptions:
			for range 12 {
				d.U64("option")
			}
			if minor >= 12 {
				d.StringMap("overrides", wire.MaxSmallString)
			}
			e.U64(wire.StderrLast)
		case wire.OpQueryPathInfo:
			d.String("path", wire.MaxPathLen)
			e.Write(reply)
		case wire.OpQueryValidPaths:
			// nix copy asks which paths the destination has: none.
			d.Strings("paths", wire.MaxPathLen)
			d.U64("substitute")
			e.U64(wire.StderrLast)
			e.Strings(nil)
		case wire.OpAddMultipleToStore:
			// nix copy's upload: read and drop it, as fast as it comes.
			d.U64("repair")
			d.U64("dontCheckSigs")
			if err := d.Err(); err != nil {
				return err
			}
			if err := wire.NewFramedReader(br).Drain(); err != nil {
				return fmt.Errorf("AddMultipleToStore: %w", err)
			}
			e.U64(wire.StderrLast)
		default:
			return fmt.Errorf("op %d is not served by the null server", op)
		}
		if err := d.Err(); err != nil {
			return err
		}
		if err := e.Flush(); err != nil {
			return err
		}
	}
}

// NullServer is a running null server process.
type NullServer struct {
	Socket string
	cmd    *exec.Cmd
	exited chan struct{} // closed once the process has been waited for
}

// StartNullServer starts the null server (self is the benchmark's binary)
// on a socket in dir, replying to every QueryPathInfo with the canned
// reply for p, and waits until it accepts connections.
func StartNullServer(ctx context.Context, self, dir string, p PathInfo) (*NullServer, error) {
	replyFile := filepath.Join(dir, "null-reply")
	if err := os.WriteFile(replyFile, CannedPathInfo(p), 0o644); err != nil {
		return nil, fmt.Errorf("null server: %w", err)
	}
	s := &NullServer{Socket: filepath.Join(dir, "null.sock")}
	os.Remove(s.Socket)
	s.cmd = exec.Command(self, NullServerArg, s.Socket, replyFile)
	s.cmd.Stderr = os.Stderr
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("null server: %w", err)
	}
	s.exited = make(chan struct{})
	go func() {
		s.cmd.Wait()
		close(s.exited)
	}()
	exited := func() error {
		select {
		case <-s.exited:
			return fmt.Errorf("null server exited before serving: %s", s.cmd.ProcessState)
		default:
			return nil
		}
	}
	if err := awaitHandshake(ctx, s.Socket, 10*time.Second, exited); err != nil {
		s.Stop()
		return nil, fmt.Errorf("null server: %w", err)
	}
	return s, nil
}

// Stop kills the null server and waits for it.
func (s *NullServer) Stop() {
	s.cmd.Process.Kill()
	<-s.exited
}
