// Package jobs groups the connections of one CI job into a job session, so
// that the paths a job uses stay alive for the whole job rather than for
// one connection.
//
// A job is recognised from the peer of a connection, with no cooperation
// from the CI runner: SO_PEERCRED gives the client's pid in the daemon's
// pid namespace, and the client's pid namespace (/proc/<pid>/ns/pid) names
// the job when it differs from the daemon's own, as it does for a
// container; the namespaces a job makes inside its container (a sandbox,
// a container of its own) are the same job's (see Options.Depth). A
// client cannot claim another job's namespace, since it is read from the
// kernel. The namespace's init process (pid 1 inside it) together with
// its start time pins the identity, so a namespace inode the kernel
// reuses later is a new job.
//
// A job ends when its pid namespace has no process left (its init exited:
// the kernel then kills every other process in it) or when its lease runs
// out: job-lease after its last connection closed. Ends are checked by Reap,
// which the daemon runs before a garbage collection and periodically.
//
// A job's temporary roots are a store.Session kept open across its
// connections: in memory for nixyard's collector and in the store's
// temproots file for a real Nix collector, like any connection's roots.
// They are also journalled, a file per job under <state>/nixyard-jobs, so
// that a daemon started after this one (a restart, an upgrade, a crash)
// takes up the jobs still running, with their roots; a journal whose job
// has ended is deleted. A daemon started while another still keeps the
// journals (it drains) journals its own jobs in a waiting directory of
// its own there, locked while it lives, until it gets them; if it exits
// first, the daemon that has them takes those up too (each collection
// looks first).
package jobs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/nixyard/nixyard/internal/store"
	"golang.org/x/sys/unix"
)

// DefaultLease is how long a job session outlives its last connection when
// its namespace stays alive (a container kept running after its job).
const DefaultLease = 6 * time.Hour

// DefaultMaxConns is how many connections one job may have open at once
// (job-max-connections): far more than Nix clients open, few enough that
// one job cannot take the daemon's descriptors from the others.
const DefaultMaxConns = 128

// Options configure a Manager.
type Options struct {
	// Lease is job-lease; zero means DefaultLease.
	Lease time.Duration
	// MaxConns is job-max-connections; zero means DefaultMaxConns.
	MaxConns int
	// Depth is job-namespace-depth: how many pid namespaces below the
	// daemon's the one that names a job is (1, a container's, when
	// zero); those deeper are its job's. 2 where jobs run in containers
	// of a container (a runner's own docker daemon in its container).
	Depth int
	// Proc is the procfs mount; "" means /proc. Tests point it elsewhere.
	Proc string
	// Now is the clock; nil means time.Now.
	Now    func() time.Time
	Logger *slog.Logger
}

// Manager tracks the live jobs of a store. It is safe for concurrent use.
type Manager struct {
	st       *store.Store
	lease    time.Duration
	maxConns int
	proc     string
	now      func() time.Time
	log      *slog.Logger
	depth    int
	selfNS   string // the daemon's pid namespace, as pidNS names it
	// selfNSDev and selfNSIno identify the daemon's pid namespace.
	selfNSDev, selfNSIno uint64
	// noParents warns once that the kernel cannot tell a namespace's
	// parent (see jobNS).
	noParents sync.Once

	mu sync.Mutex
	// journalLock is held while this Manager keeps the jobs' journals
	// (nil: it keeps none, yet).
	journalLock *os.File
	jobs        map[string]*job
	closed      bool
	// taken, if not nil, is closed once this Manager keeps the journals
	// (or is closed): collections wait for it (see New).
	taken chan struct{}
	// predecessor, if not nil, is closed once the daemon that kept the
	// journals when this Manager began has let them go.
	predecessor chan struct{}
	// beforeTakeOver run once this Manager has those journals, before
	// collections may run (BeforeTakeOver).
	beforeTakeOver []func(context.Context)
	// waitDir, while another daemon keeps the journals, is where this
	// one journals its jobs (waitingPrefix), locked by waitLock for as
	// long as it lives; "" until it journals one.
	waitDir  string
	waitLock *os.File
}

// BeforeTakeOver has f run once the daemon that kept the jobs' journals
// when m began (see Predecessor) has let them go, before this store's
// collections may run: what that daemon held (its push queue, say) is to
// be held here first. If there was no such daemon, or it has gone, f runs
// at once, with ctx; otherwise later, with New's context (without its
// cancellation), and with m's lock held: Attach waits for it.
func (m *Manager) BeforeTakeOver(ctx context.Context, f func(context.Context)) {
	m.mu.Lock()
	if m.taken != nil { // collections still wait: awaitJournals runs f
		m.beforeTakeOver = append(m.beforeTakeOver, f)
		m.mu.Unlock()
		return
	}
	m.mu.Unlock()
	f(ctx)
}

// Predecessor returns nil if m kept the jobs' journals from the start, or
// a channel closed once the daemon that kept them then (one still
// stopping) has let them go and they are m's: what else that daemon holds
// (its HTTP addresses, say) is about to be free.
func (m *Manager) Predecessor() <-chan struct{} {
	if m.predecessor == nil {
		return nil
	}
	return m.predecessor
}

// closeGate stops the store's collections until openGate: while another
// daemon keeps the journals, a collection here would not see the roots of
// its jobs once it has stopped. Called by New, before m is shared.
func (m *Manager) closeGate() {
	taken := make(chan struct{})
	m.taken = taken
	m.st.SetGCGate(func(ctx context.Context, log func(string)) error {
		select {
		case <-taken:
			return nil
		default:
		}
		log("waiting for the previous daemon to hand over its job sessions...")
		select {
		case <-taken:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
}

// openGate lets collections run: this Manager has the journals, or is
// closed. m.mu is held.
func (m *Manager) openGate() {
	if m.taken != nil {
		close(m.taken)
		m.taken = nil
		m.st.SetGCGate(nil)
	}
}

// job is one live job session.
type job struct {
	id       string
	ns       string
	initPID  int
	initTime uint64 // start time of initPID, in clock ticks after boot
	session  *store.Session
	journal  *os.File // nil: not journalled
	jpath    string   // the journal's path (among the journals, or in this daemon's waiting directory)
	conns    int
	idleFrom time.Time // when conns last dropped to zero
	started  time.Time
	tenant   string
}

// New returns a Manager for st. Taking up the jobs of an earlier daemon
// (now, or once a daemon still stopping lets them go) is not cancelled with
// ctx: a root left untaken would let a collection delete a path a live
// job uses.
func New(ctx context.Context, st *store.Store, opts Options) (*Manager, error) {
	ctx = context.WithoutCancel(ctx)
	m := &Manager{st: st, lease: opts.Lease, maxConns: opts.MaxConns, depth: max(opts.Depth, 1), proc: opts.Proc, now: opts.Now, log: opts.Logger, jobs: map[string]*job{}}
	if m.lease <= 0 {
		m.lease = DefaultLease
	}
	if m.maxConns <= 0 {
		m.maxConns = DefaultMaxConns
	}
	if m.proc == "" {
		m.proc = "/proc"
	}
	if m.now == nil {
		m.now = time.Now
	}
	if m.log == nil {
		m.log = slog.Default()
	}
	var nsStat unix.Stat_t
	if err := unix.Stat(filepath.Join(m.proc, "self", "ns", "pid"), &nsStat); err != nil {
		return nil, fmt.Errorf("jobs: reading the daemon's pid namespace: %w", err)
	}
	m.selfNS, m.selfNSDev, m.selfNSIno = pidNSName(nsStat.Ino), nsStat.Dev, nsStat.Ino
	// The journals are one daemon's: another process on the store (a
	// second daemon, say) keeps none, and leaves them alone.
	if err := os.MkdirAll(m.journalDir(), 0o700); err != nil {
		m.log.Warn("cannot keep the jobs' journals; job sessions will not outlive the daemon", "err", err)
	} else if lock, err := openJournalLock(m.journalDir()); err != nil {
		m.log.Warn("the jobs' journals are another daemon's (one still stopping?); this one takes them when it lets them go", "err", err)
		m.closeGate()
		m.predecessor = make(chan struct{})
		go m.awaitJournals(ctx)
	} else {
		m.journalLock = lock
		m.restore(ctx)
	}
	// Every collection first ends the jobs that are over, automatic ones
	// too: a job's roots should not outlive it by the reaping interval.
	st.SetBeforeRoots(func() { m.Reap() })
	return m, nil
}

// ErrNotJob is returned by Attach for a client in the daemon's own pid
// namespace: it gets Nix's per-connection temporary roots.
var ErrNotJob = errors.New("jobs: client is not in a job's pid namespace")

// TooManyConnsError is returned by Attach for a job that has as many
// connections open as it may.
type TooManyConnsError struct {
	Job string
	Max int
}

func (e *TooManyConnsError) Error() string {
	return fmt.Sprintf("too many connections: job %s already has %d open to the daemon (setting job-max-connections)", e.Job, e.Max)
}

// Conn is one connection's membership of a job. Release it when the
// connection ends.
type Conn struct {
	m    *Manager
	j    *job
	once sync.Once
}

// ID names the job, e.g. "pidns-4026532871-1234567".
func (c *Conn) ID() string { return c.j.id }

// Session is the job's temporary roots, shared by all its connections;
// do not close it.
func (c *Conn) Session() *store.Session { return c.j.session }

// Release ends the connection's membership; the job lives on.
func (c *Conn) Release() {
	c.once.Do(func() {
		c.m.mu.Lock()
		defer c.m.mu.Unlock()
		c.j.conns--
		if c.j.conns == 0 {
			c.j.idleFrom = c.m.now()
		}
	})
}

// Attach returns the job of the client process pid (in the daemon's pid
// namespace, as SO_PEERCRED gives it), starting a job session on its first
// connection. It returns ErrNotJob for a client in the daemon's namespace,
// and a *TooManyConnsError for a job with MaxConns connections open.
// tenant names the socket the job came through, for logs.
func (m *Manager) Attach(pid int, tenant string) (*Conn, error) {
	ns, err := m.jobNS(pid)
	if err != nil {
		return nil, fmt.Errorf("jobs: pid namespace of client pid %d: %w", pid, err)
	}
	if ns == m.selfNS {
		return nil, ErrNotJob
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, j := range m.jobs {
		if j.ns == ns && m.initAlive(j) {
			return m.joinLocked(j)
		}
	}
	initPID, err := m.findInit(pid, ns)
	if err != nil {
		return nil, err
	}
	st, err := m.stat(initPID)
	if err != nil {
		return nil, fmt.Errorf("jobs: init of pid namespace %s: %w", ns, err)
	}
	initTime := st.startTime
	id := jobID(ns, initTime)
	if old, ok := m.jobs[id]; ok {
		// The namespace's init is alive, yet initAlive failed above: only
		// possible if it exec'd in between; treat it as the same job.
		return m.joinLocked(old)
	}
	j := &job{id: id, ns: ns, initPID: initPID, initTime: initTime, session: m.st.OpenSession(), conns: 1, started: m.now(), tenant: tenant}
	m.jobs[id] = j
	m.openJournal(j)
	m.log.Info("job session started", "job", id, "tenant", tenant, "init_pid", initPID)
	return &Conn{m: m, j: j}, nil
}

// joinLocked adds a connection to job j, unless it has as many as it may.
func (m *Manager) joinLocked(j *job) (*Conn, error) {
	if j.conns >= m.maxConns {
		return nil, &TooManyConnsError{Job: j.id, Max: m.maxConns}
	}
	j.conns++
	return &Conn{m: m, j: j}, nil
}

// Reap ends the jobs that are over: no process left in their namespace, or
// idle for longer than the lease. Their temporary roots are dropped, so a
// later garbage collection may delete their paths. It returns the ids of
// the jobs it ended.
func (m *Manager) Reap() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var ended []string
	now := m.now()
	for id, j := range m.jobs {
		reason := ""
		switch {
		case !m.initAlive(j):
			reason = "no process left in its pid namespace"
		case j.conns == 0 && now.Sub(j.idleFrom) >= m.lease:
			reason = "lease expired"
		default:
			continue
		}
		if err := j.session.Close(); err != nil {
			m.log.Warn("closing job session", "job", id, "err", err)
		}
		m.dropJournal(j)
		delete(m.jobs, id)
		ended = append(ended, id)
		m.log.Info("job session ended", "job", id, "tenant", j.tenant, "reason", reason, "connections", j.conns, "duration", now.Sub(j.started).Round(time.Second))
	}
	return ended
}

// Live returns the ids of the live jobs (as of the last Reap).
func (m *Manager) Live() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]string, 0, len(m.jobs))
	for id := range m.jobs {
		out = append(out, id)
	}
	return out
}

// Run reaps every interval until ctx is done.
func (m *Manager) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			m.Reap()
		}
	}
}

// Close ends every job session (the daemon is stopping); their journals
// stay, for the next daemon to take the jobs up.
func (m *Manager) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	for id, j := range m.jobs {
		errs = append(errs, j.session.Close())
		if j.journal != nil {
			errs = append(errs, j.journal.Close())
		}
		delete(m.jobs, id)
	}
	if m.journalLock != nil {
		errs = append(errs, m.journalLock.Close())
		m.journalLock = nil
		m.st.SetBeforeCollect(nil)
	}
	if m.waitLock != nil {
		errs = append(errs, m.waitLock.Close()) // its journals stay, for the daemon that keeps the journals
		m.waitLock = nil
	}
	m.closed = true
	m.openGate()
	return errors.Join(errs...)
}

// initAlive reports whether j's init process still runs, with the same
// start time and in the same namespace.
func (m *Manager) initAlive(j *job) bool {
	st, err := m.stat(j.initPID)
	if err != nil || st.startTime != j.initTime || st.exited {
		return false
	}
	ns, err := m.pidNS(j.initPID)
	return err == nil && ns == j.ns
}

// jobID names the job of the pid namespace ns whose init started at
// initTime (clock ticks after boot): a namespace inode may be reused.
func jobID(ns string, initTime uint64) string {
	return fmt.Sprintf("pidns-%s-%d", nsInode(ns), initTime)
}
