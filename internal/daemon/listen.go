package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nixyard/nixyard/internal/jobs"
	"github.com/nixyard/nixyard/internal/store"
)

// ListenPolicy is how a listening socket treats its clients.
type ListenPolicy struct {
	// Untrusted makes every client untrusted whatever uid it has: a job
	// socket, bind-mounted into containers, where root in the container is
	// not root on the host.
	Untrusted bool
	// Trusted makes every client trusted, and lets every one connect: the
	// build hook's private socket, which only the daemon's user can reach.
	Trusted bool
	// Tenant names the socket's users in logs.
	Tenant string
	// MaxConns caps the connections open on the socket at once, refused
	// ones included (0: no cap): every job together cannot take the
	// daemon's descriptors from the host's own clients.
	MaxConns int
}

// DefaultListenMaxConns is the cap on a --listen socket's open connections
// without max-connections=N.
const DefaultListenMaxConns = 1024

// ListenSpec is one --listen argument:
// PATH[,trusted=false|users][,tenant=NAME][,max-connections=N].
type ListenSpec struct {
	Path   string
	Policy ListenPolicy
}

// ParseListenSpec parses a --listen argument (see ListenSpec).
func ParseListenSpec(s string) (ListenSpec, error) {
	parts := strings.Split(s, ",")
	// Untrusted unless asked: an extra socket is a job socket, and a job
	// socket that trusted container root by uid would let a job collect
	// the host's store.
	spec := ListenSpec{Path: parts[0], Policy: ListenPolicy{Untrusted: true, MaxConns: DefaultListenMaxConns}}
	if !filepath.IsAbs(spec.Path) {
		// A job's container mounts it by its path, and runner-config
		// takes absolute paths only.
		return spec, fmt.Errorf("--listen %q: the socket's path must be absolute", s)
	}
	for _, p := range parts[1:] {
		k, v, ok := strings.Cut(p, "=")
		if !ok {
			return spec, fmt.Errorf("--listen %q: %q is not KEY=VALUE", s, p)
		}
		switch k {
		case "trusted":
			switch v {
			case "false":
				spec.Policy.Untrusted = true
			case "users":
				// Nix's uid-based trust (trusted-users), as the default socket.
				spec.Policy.Untrusted = false
			default:
				return spec, fmt.Errorf("--listen %q: trusted=%q: want false (every client untrusted, the default) or users (trusted-users decides, as on the default socket)", s, v)
			}
		case "tenant":
			if v == "" {
				return spec, fmt.Errorf("--listen %q: empty tenant name", s)
			}
			spec.Policy.Tenant = v
		case "max-connections":
			n, err := strconv.Atoi(v)
			if err != nil || n <= 0 {
				return spec, fmt.Errorf("--listen %q: max-connections=%q is not a positive number", s, v)
			}
			spec.Policy.MaxConns = n
		default:
			return spec, fmt.Errorf("--listen %q: unknown key %q (want trusted, tenant or max-connections)", s, k)
		}
	}
	if spec.Policy.Tenant == "" {
		// Not the host's own connections' empty tenant, in logs and
		// metrics.
		spec.Policy.Tenant = spec.Path
	}
	return spec, nil
}

// Listener is a listening socket with its policy.
type Listener struct {
	net.Listener
	Policy ListenPolicy
}

// ServeAll serves every listener until ctx is done or one fails; it
// returns the first error. Once ctx is done, the sockets stop accepting
// (all but the build hook's, which the builds under way may need) and
// the connections open then are served on, until they end or
// Options.ShutdownGrace has passed (or Options.StopNow is closed); then
// the rest are closed, and their builds stopped.
func (s *Server) ServeAll(ctx context.Context, ls []Listener) error {
	accept, cancel := context.WithCancel(ctx)
	defer cancel()
	conns, stopConns := context.WithCancelCause(context.WithoutCancel(ctx))
	defer stopConns(errStopping)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for _, l := range ls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			until := accept
			if l.Policy.Trusted {
				until = conns // the build hook's: served while builds run
			}
			if err := s.serveListener(until, conns, l.Listener, l.Policy); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
				cancel()
			}
		}()
	}
	<-accept.Done()
	s.drain()
	s.closeIdle(0) // at once: there is no op to tell of the stop
	stopConns(errStopping)
	wg.Wait()
	return errors.Join(errs...)
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

// applyPolicy adjusts the peer of a connection accepted on a socket with
// policy pol, and attaches it to its job, if it is in one.
func (s *Server) applyPolicy(p *peer, pol ListenPolicy) {
	if pol.Untrusted {
		p.trusted = false
		p.jobSock = true
	}
	if pol.Trusted {
		p.trusted, p.refused, p.hook = true, "", true
	}
	p.tenant = pol.Tenant
	if s.opts.Jobs == nil || p.pid <= 0 {
		return
	}
	jc, err := s.opts.Jobs.Attach(int(p.pid), pol.Tenant)
	var tooMany *jobs.TooManyConnsError
	switch {
	case errors.Is(err, jobs.ErrNotJob):
	case errors.As(err, &tooMany):
		p.refused = err.Error()
	case err != nil && pol.Untrusted:
		// A connection that cannot be counted against its job (the
		// daemon out of descriptors, say) is not served on a job socket.
		s.log.Warn("cannot find the job of a client; refusing it", "pid", p.pid, "err", err)
		p.refused = "the daemon cannot tell which job this connection belongs to; try again"
	case err != nil:
		// The client may have exited already; its connection then gets
		// per-connection roots, as with nix-daemon.
		s.log.Warn("cannot find the job of a client; using per-connection temporary roots", "pid", p.pid, "err", err)
	default:
		p.job = jc
	}
}

// openSession returns the temporary roots of connection c: its job's, kept
// across the job's connections, or its own, dropped when it closes.
func (c *conn) openSession() (*store.Session, func()) {
	if c.peer.job != nil {
		// The job outlives the connection; serveNetConn releases it.
		return c.peer.job.Session(), func() {}
	}
	ss := c.st.OpenSession()
	return ss, func() {
		if err := ss.Close(); err != nil {
			c.log.Warn("closing store session", "err", err)
		}
	}
}

// sessionAnnouncement is the text of the activity the handshake starts and
// stops at once, so that `nixyard doctor` can see the connection's
// session. It is at level Vomit, which Nix clients do not show unless run
// with -vvvvvvv, and activities are part of the protocol since 1.20.
func (c *conn) sessionAnnouncement() string {
	trust := "trusted"
	if !c.peer.trusted {
		trust = "untrusted"
	}
	job := "none"
	if c.peer.job != nil {
		job = c.peer.job.ID()
	}
	tenant := c.peer.tenant
	if tenant == "" {
		tenant = "-"
	}
	return fmt.Sprintf("%s job=%s tenant=%s trust=%s", SessionAnnouncementPrefix, job, tenant, trust)
}

// SessionAnnouncementPrefix starts the text of the session activity a
// connection gets with a SetOptions at verbosity 7 (vomit): "nixyard-session:
// job=ID|none tenant=NAME|- trust=trusted|untrusted".
const SessionAnnouncementPrefix = "nixyard-session:"

// errJobGC refuses a deletion from a job socket.
var errJobGC = errors.New("deleting store paths is not allowed through a job socket: the host's store is shared by every job and is collected by the host")

// checkJobGC refuses, on a job socket, a collection that deletes: one
// job's `nix-collect-garbage` would otherwise empty the host's cache for
// every other job, and so would `nix-store --delete $(nix-store --gc
// --print-dead)`. A job cannot delete what it made either: its job
// session holds every path it used. Listing roots or dead paths stays
// allowed.
func (c *conn) checkJobGC(action store.GCAction) error {
	if c.peer.jobSock && (action == store.GCDeleteDead || action == store.GCDeleteSpecific) {
		return errJobGC
	}
	return nil
}

// reapJobs ends the jobs that are over, so that a collection may delete
// their paths.
func (c *conn) reapJobs() {
	if c.srv.opts.Jobs != nil {
		c.srv.opts.Jobs.Reap()
	}
}
