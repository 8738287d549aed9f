package daemon

import (
	"context"
	"errors"
	"io"
	"syscall"

	"golang.org/x/sys/unix"
)

// errHangup ends an op whose client hung up while it ran.
var errHangup = errors.New("the client hung up")

// hangupWatcher tells when the client hangs up while an op runs, as
// nix-daemon's MonitorFdHup does: a build whose only client is gone
// (a cancelled CI job, say) is then stopped, freeing its build slot,
// instead of running to its end. It polls a duplicate of the connection's
// descriptor for a hang-up without reading from it, since the op may read
// the connection itself.
type hangupWatcher struct {
	rc syscall.RawConn
}

// newHangupWatcher returns a watcher for r, or nil when r has no
// descriptor to watch.
func newHangupWatcher(r io.Reader) *hangupWatcher {
	sc, ok := r.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return &hangupWatcher{rc: rc}
}

// watch returns a context that is cancelled, with errHangup, if the client
// hangs up before stop is called. One goroutine waits in poll(2) on the
// connection and on a pipe that stop writes to.
func (h *hangupWatcher) watch(ctx context.Context) (_ context.Context, stop func()) {
	if h == nil {
		return ctx, func() {}
	}
	fd := -1
	// Close-on-exec: builders started meanwhile must not hold it.
	if err := h.rc.Control(func(f uintptr) { fd, _ = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil || fd < 0 {
		return ctx, func() {}
	}
	var wake [2]int
	if err := unix.Pipe2(wake[:], unix.O_CLOEXEC); err != nil {
		unix.Close(fd)
		return ctx, func() {}
	}
	ctx, cancel := context.WithCancelCause(ctx)
	go func() {
		defer unix.Close(fd)
		defer unix.Close(wake[0])
		// POLLHUP (always reported) is a client gone: a peer that only
		// shut down its writing side (POLLRDHUP) still reads the reply.
		pfd := []unix.PollFd{{Fd: int32(fd)}, {Fd: int32(wake[0]), Events: unix.POLLIN}}
		for {
			_, err := unix.Poll(pfd, -1)
			switch {
			case errors.Is(err, unix.EINTR):
				continue
			case err != nil, pfd[1].Revents != 0:
				return
			case pfd[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0:
				cancel(errHangup)
				return
			}
		}
	}()
	return ctx, func() {
		unix.Close(wake[1]) // wakes the poll (POLLHUP on the read end)
		cancel(nil)
	}
}
