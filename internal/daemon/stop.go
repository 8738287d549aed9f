package daemon

import (
	"errors"
	"io"
	"time"

	"github.com/nixyard/nixyard/internal/jobs"
)

// trackIdle registers c, waiting for its handshake and then between ops,
// for closeIdle to close when the daemon stops; it returns the
// registration's undoing. The build hook's connections are not
// registered: they are idle while their remote builds run.
func (s *Server) trackIdle(c *conn, r io.Reader, dl readDeadliner) func() {
	cl, ok := r.(io.Closer)
	if !ok || c.peer.hook {
		return func() {}
	}
	wake := func() { cl.Close() }
	if dl != nil {
		wake = func() { dl.SetReadDeadline(time.Now()) }
	}
	c.idleSince.Store(time.Now().UnixNano())
	s.connsMu.Lock()
	s.conns[c] = wake
	s.connsMu.Unlock()
	return func() {
		s.connsMu.Lock()
		delete(s.conns, c)
		s.connsMu.Unlock()
	}
}

// closeIdle closes the connections that have waited for their next op for
// longer than after, counting a connection busy as long as its client is
// (clientsBusyAt). It claims each (idleClaimed) before it wakes it: a
// client whose op arrives meanwhile is told that the daemon stops, rather
// than cut off.
func (s *Server) closeIdle(after time.Duration) {
	now := time.Now().UnixNano()
	s.connsMu.Lock()
	defer s.connsMu.Unlock()
	busyAt, undecided := s.clientsBusyAt(now, after > 0)
	for c, wake := range s.conns {
		since := c.idleSince.Load()
		if since <= 0 {
			continue // in an operation, or claimed already
		}
		if undecided[c.peer.pid] {
			continue
		}
		last := since
		if c.peer.pid > 0 {
			last = max(last, busyAt[c.peer.pid])
		}
		if now-last >= int64(after) && c.idleSince.CompareAndSwap(since, idleClaimed) {
			c.log.Info("stopping: closing a connection idle between operations", "idle", time.Duration(now-since).Round(time.Second))
			wake()
		}
	}
}

// clientsBusyAt returns when each client process (by pid) with a
// connection open last worked, and which of them cannot be judged yet.
//
// A client's connections go together: one idle in its client's pool
// while another of the client's works is kept (the client would fail
// when it next took it), until all of them have been idle that long. So,
// with checkCPU, is one whose client process is working on its own
// (evaluating, say, before its next op): a client that uses no CPU (a nix
// repl waiting for its user) is the one not worth waiting for; one whose
// CPU time this pass sees first is undecided, kept until the next pass.
// (pid 0: SO_PEERCRED names no pid for a client outside the daemon's pid
// namespace; each such connection counts alone, and is not in busyAt.)
// s.connsMu is held.
func (s *Server) clientsBusyAt(now int64, checkCPU bool) (busyAt map[int32]int64, undecided map[int32]bool) {
	busyAt = map[int32]int64{}
	undecided = map[int32]bool{}
	for c := range s.conns {
		if since := c.idleSince.Load(); c.peer.pid > 0 && since != idleClaimed {
			if since == 0 { // in an operation
				since = now
			}
			busyAt[c.peer.pid] = max(busyAt[c.peer.pid], since)
		}
	}
	if checkCPU {
		for pid := range busyAt {
			worked, known := s.clientWorked(pid, now)
			busyAt[pid] = max(busyAt[pid], worked)
			undecided[pid] = !known
		}
	}
	for pid := range s.cpuSeen {
		if _, ok := busyAt[pid]; !ok {
			delete(s.cpuSeen, pid)
		}
	}
	return busyAt, undecided
}

// cpuMark is a client process's CPU time when closeIdle last saw it, and
// when it last saw it grow.
type cpuMark struct {
	ticks  uint64
	worked int64 // Unix nanoseconds; 0: not seen working
}

// clientWorkTicks is how much CPU time (clock ticks, 10 ms each) a client
// must have used since closeIdle's last look (a second before) to count as
// working: a waiting client's threads use next to none.
const clientWorkTicks = 5

// clientWorked returns when closeIdle last saw the client process pid
// use CPU (0 if never), and whether it can tell yet: not on its first
// look, which has nothing to compare with. A client whose CPU time cannot
// be read counts as not working. s.connsMu is held.
func (s *Server) clientWorked(pid int32, now int64) (worked int64, known bool) {
	ticks, ok := s.opts.clientCPU(pid)
	if !ok {
		return 0, true
	}
	m, seen := s.cpuSeen[pid]
	if seen && ticks >= m.ticks+clientWorkTicks {
		m.worked = now
	}
	m.ticks = ticks
	s.cpuSeen[pid] = m
	return m.worked, seen
}

// procCPU reads the CPU time (user and system, in clock ticks) of process
// pid from /proc.
func procCPU(pid int32) (uint64, bool) {
	t, err := jobs.CPUTime(int(pid))
	return t, err == nil
}

// idleClaimed marks a connection closeIdle has taken.
const idleClaimed = -1

// errStopping ends the operations still running when the daemon stops.
var errStopping = errors.New("the daemon is stopping (a restart, say): run the command again once it is back")

// stoppingDelay is how long a connection whose operation the daemon's
// stop ended stays open, so that its client hears why.
const stoppingDelay = 2 * time.Second

// drain waits, up to the shutdown grace, for the open connections to end.
func (s *Server) drain() {
	busy := func() bool {
		return s.open.Load() > 0 || s.opts.Busy != nil && s.opts.Busy() > 0
	}
	if s.opts.ShutdownGrace <= 0 || !busy() {
		s.log.Info("stopping", "connections", s.open.Load())
		return
	}
	s.log.Info("stopping: serving the open connections until they end", "connections", s.open.Load(), "grace", s.opts.ShutdownGrace)
	deadline := time.NewTimer(s.opts.ShutdownGrace)
	defer deadline.Stop()
	report := time.NewTicker(30 * time.Second)
	defer report.Stop()
	idle := time.NewTicker(time.Second)
	defer idle.Stop()
	s.closeIdle(s.opts.idleCloseAfter)
	for busy() {
		select {
		case <-idle.C:
			s.closeIdle(s.opts.idleCloseAfter)
		case <-s.changed:
		case <-report.C:
			s.log.Info("stopping: connections still open", "connections", s.open.Load())
		case <-deadline.C:
			s.log.Warn("stopping: the shutdown grace has passed; closing the connections still open and stopping their builds", "connections", s.open.Load())
			return
		case <-s.opts.StopNow:
			s.log.Warn("stopping now: closing the connections still open", "connections", s.open.Load())
			return
		}
	}
	s.log.Info("stopping: every connection has ended")
}
