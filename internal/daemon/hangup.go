package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// errHangup ends an op whose client hung up while it ran.
var errHangup = errors.New("the client hung up")

// hangupWatcher tells when the client hangs up while an op runs, as
// nix-daemon's MonitorFdHup does: a build whose only client is gone
// (a cancelled CI job, say) is then stopped, freeing its build slot,
// instead of running to its end. It watches a duplicate of the
// connection's descriptor for a hang-up without reading from it, since
// the op may read the connection itself.
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
// hangs up before stop is called. The process's hang-up poller watches the
// connection (see hangupPoller).
func (h *hangupWatcher) watch(ctx context.Context) (_ context.Context, stop func()) {
	if h == nil {
		return ctx, func() {}
	}
	p, err := theHangupPoller()
	if err != nil {
		return ctx, func() {}
	}
	fd := -1
	// Close-on-exec: builders started meanwhile must not hold it.
	if err := h.rc.Control(func(f uintptr) { fd, _ = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil || fd < 0 {
		return ctx, func() {}
	}
	watched, cancel := context.WithCancelCause(ctx)
	id, err := p.add(fd, cancel)
	if err != nil { // unwatched, as without a descriptor
		unix.Close(fd)
		cancel(nil)
		return ctx, func() {}
	}
	return watched, func() {
		p.remove(id)
		cancel(nil)
	}
}

// hangupPoller is the process's one epoll instance for hang-up watches:
// one goroutine waits on it for every watched connection at once, and so
// holds one thread whatever the number of ops under way (a goroutine
// waiting in poll(2) for each op held a thread each, which the runtime
// keeps once made: a burst of waiting clients left hundreds).
type hangupPoller struct {
	epfd int

	mu      sync.Mutex
	next    uint64
	watches map[uint64]hangupWatch // by the id in their epoll events
}

// hangupWatch is one watched descriptor, a duplicate that the poller
// owns: whoever takes a watch out of the map (remove, or a hang-up)
// closes it.
type hangupWatch struct {
	fd     int
	cancel context.CancelCauseFunc
}

var (
	hangupsOnce sync.Once
	hangups     *hangupPoller
	hangupsErr  error
)

// theHangupPoller returns the process's poller, started on first use.
func theHangupPoller() (*hangupPoller, error) {
	hangupsOnce.Do(func() {
		epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			hangupsErr = fmt.Errorf("hang-up watches: epoll_create1: %w", err)
			slog.Warn("clients that hang up will not stop their ops", "err", hangupsErr)
			return
		}
		hangups = &hangupPoller{epfd: epfd, watches: map[uint64]hangupWatch{}}
		go hangups.run()
	})
	return hangups, hangupsErr
}

// add watches fd, calling cancel with errHangup when its peer hangs up,
// and returns the watch's id for remove. On success the poller owns fd.
func (p *hangupPoller) add(fd int, cancel context.CancelCauseFunc) (uint64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.next++
	id := p.next
	// No events asked for: EPOLLHUP and EPOLLERR are always reported. A
	// peer that only shut down its writing side (EPOLLRDHUP) still reads
	// the reply.
	ev := unix.EpollEvent{Fd: int32(uint32(id)), Pad: int32(uint32(id >> 32))}
	if err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return 0, fmt.Errorf("epoll_ctl: %w", err)
	}
	p.watches[id] = hangupWatch{fd: fd, cancel: cancel}
	return id, nil
}

// removeLocked takes the watch id out, if a hang-up or remove has not,
// and closes its descriptor. Under p.mu.
func (p *hangupPoller) removeLocked(id uint64) (hangupWatch, bool) {
	w, ok := p.watches[id]
	if !ok {
		return w, false
	}
	delete(p.watches, id)
	unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, w.fd, nil)
	unix.Close(w.fd)
	return w, true
}

// remove ends the watch id, unless a hang-up ended it.
func (p *hangupPoller) remove(id uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.removeLocked(id)
}

// run waits for hang-ups and ends their watches, for the life of the
// process. An event of a watch removed meanwhile finds no id.
func (p *hangupPoller) run() {
	events := make([]unix.EpollEvent, 64)
	for {
		n, err := unix.EpollWait(p.epfd, events, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			slog.Error("hang-up watches: epoll_wait failed; clients that hang up will not stop their ops", "err", err)
			return
		}
		p.mu.Lock()
		for _, ev := range events[:n] {
			if ev.Events&(unix.EPOLLHUP|unix.EPOLLERR) == 0 {
				continue
			}
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if w, ok := p.removeLocked(id); ok {
				w.cancel(errHangup)
			}
		}
		p.mu.Unlock()
	}
}
