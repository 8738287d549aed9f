// Package jobs groups the connections of one CI job into a job session, so
// that the paths a job uses stay alive for the whole job rather than for
// one connection.
//
// A job is recognised from the peer of a connection, with no cooperation
// from the CI runner: SO_PEERCRED gives the client's pid in the daemon's
// pid namespace, and the client's pid namespace (/proc/<pid>/ns/pid) names
// the job when it differs from the daemon's own, as it does for a
// container. A client cannot claim another job's namespace, since it is
// read from the kernel. The namespace's init process (pid 1 inside it)
// together with its start time pins the identity, so a namespace inode the
// kernel reuses later is a new job.
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
// has ended is deleted.
package jobs

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
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
	selfNS   string

	mu sync.Mutex
	// journalLock is held while this Manager keeps the jobs' journals
	// (nil: it keeps none, yet).
	journalLock *os.File
	jobs        map[string]*job
	closed      bool
	// taken, if not nil, is closed once this Manager keeps the journals
	// (or is closed): collections wait for it (see New).
	taken chan struct{}
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
	conns    int
	idleFrom time.Time // when conns last dropped to zero
	started  time.Time
	tenant   string
}

// New returns a Manager for st.
func New(st *store.Store, opts Options) (*Manager, error) {
	m := &Manager{st: st, lease: opts.Lease, maxConns: opts.MaxConns, proc: opts.Proc, now: opts.Now, log: opts.Logger, jobs: map[string]*job{}}
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
	ns, err := os.Readlink(filepath.Join(m.proc, "self", "ns", "pid"))
	if err != nil {
		return nil, fmt.Errorf("jobs: reading the daemon's pid namespace: %w", err)
	}
	m.selfNS = ns
	// The journals are one daemon's: another process on the store (a
	// second daemon, say) keeps none, and leaves them alone.
	if err := os.MkdirAll(m.journalDir(), 0o700); err != nil {
		m.log.Warn("cannot keep the jobs' journals; job sessions will not outlive the daemon", "err", err)
	} else if lock, err := openJournalLock(m.journalDir()); err != nil {
		m.log.Warn("the jobs' journals are another daemon's (one still stopping?); this one takes them when it lets them go", "err", err)
		m.closeGate()
		go m.awaitJournals()
	} else {
		m.journalLock = lock
		m.restore()
	}
	return m, nil
}

// openJournalLock takes the journals' lock file in dir, without waiting.
func openJournalLock(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600) // Go opens close-on-exec
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", f.Name(), err)
	}
	return f, nil
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
	ns, err := m.pidNS(pid)
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
	}
	m.closed = true
	m.openGate()
	return errors.Join(errs...)
}

// journalDir holds the jobs' journals: a file per live job, named by its
// id, with a header line (journalHeader, JSON) and then a line per root
// (a store path's base name).
func (m *Manager) journalDir() string { return filepath.Join(m.st.StateDir(), "nixyard-jobs") }

// journalHeader is a job's identity, as its journal records it.
type journalHeader struct {
	NS       string `json:"ns"`
	InitPID  int    `json:"init_pid"`
	InitTime uint64 `json:"init_time"`
	Tenant   string `json:"tenant"`
	Started  int64  `json:"started"` // Unix seconds
}

// openJournal writes j's journal afresh, with its roots so far, and has
// its session add each new root to it. A failure is logged: the job
// then lives as long as this daemon only.
func (m *Manager) openJournal(j *job) {
	if m.journalLock == nil {
		return
	}
	if err := m.writeJournal(j); err != nil {
		m.log.Warn("cannot journal a job session; it will not outlive the daemon", "job", j.id, "err", err)
	}
}

func (m *Manager) writeJournal(j *job) error {
	dir := m.journalDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".new-")
	if err != nil {
		return err
	}
	hdr, err := json.Marshal(journalHeader{NS: j.ns, InitPID: j.initPID, InitTime: j.initTime, Tenant: j.tenant, Started: j.started.Unix()})
	if err == nil {
		// Written and attached at once: no root added meanwhile is lost.
		err = j.session.Journal(f, append(hdr, '\n'))
	}
	if err == nil {
		err = os.Rename(f.Name(), filepath.Join(dir, j.id))
	}
	if err != nil {
		j.session.Journal(io.Discard, nil)
		f.Close()
		os.Remove(f.Name())
		return err
	}
	j.journal = f
	return nil
}

// dropJournal deletes the journal of j, which has ended.
func (m *Manager) dropJournal(j *job) {
	if j.journal == nil {
		return
	}
	j.journal.Close()
	if err := os.Remove(filepath.Join(m.journalDir(), j.id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		m.log.Warn("cannot delete the journal of an ended job", "job", j.id, "err", err)
	}
}

// restore takes up the jobs whose journals an earlier daemon left and
// whose init still runs: their sessions hold their roots again, and their
// lease runs from now. Other journals are deleted.
func (m *Manager) restore() {
	dir := m.journalDir()
	ents, err := os.ReadDir(dir)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			m.log.Warn("cannot read the jobs' journals", "dir", dir, "err", err)
		}
		return
	}
	for _, e := range ents {
		if e.Name() == ".lock" {
			continue
		}
		path := filepath.Join(dir, e.Name())
		if strings.HasPrefix(e.Name(), ".") {
			os.Remove(path) // a journal left half-written
			continue
		}
		j, roots, err := m.readJournal(path, e.Name())
		switch {
		case err != nil:
			m.log.Warn("dropping an unreadable job journal", "file", path, "err", err)
			os.Remove(path)
			continue
		case !m.initAlive(j):
			m.log.Info("job ended while no daemon ran; its journal goes", "job", j.id)
			os.Remove(path)
			continue
		}
		if cur, ok := m.jobs[j.id]; ok {
			j = cur // it reached this daemon before the journals did
		} else {
			j.session = m.st.OpenSession()
			j.idleFrom = m.now()
			m.jobs[j.id] = j
		}
		for _, p := range roots {
			if err := j.session.AddTempRoot(context.Background(), p); err != nil {
				m.log.Warn("cannot take up a job's root", "job", j.id, "path", p.String(), "err", err)
			}
		}
		m.log.Info("job session taken up from before the daemon started", "job", j.id, "tenant", j.tenant, "roots", len(roots))
	}
	// Every job is journalled from now on, those that came meanwhile too.
	for _, j := range m.jobs {
		if j.journal == nil {
			m.openJournal(j)
		}
	}
}

// awaitJournals takes the journals once the daemon that keeps them (one
// still draining its connections, say) has let them go, polling until the
// Manager is closed.
func (m *Manager) awaitJournals() {
	for range time.Tick(100 * time.Millisecond) {
		m.mu.Lock()
		if m.closed {
			m.mu.Unlock()
			return
		}
		if lock, err := openJournalLock(m.journalDir()); err == nil {
			m.journalLock = lock
			m.restore()
			m.openGate()
			m.mu.Unlock()
			m.log.Info("the jobs' journals are this daemon's now")
			return
		}
		m.mu.Unlock()
	}
}

// readJournal reads the journal at path, of the job named id.
func (m *Manager) readJournal(path, id string) (*job, []storepath.Path, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	lines := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
	var h journalHeader
	if err := json.Unmarshal([]byte(lines[0]), &h); err != nil {
		return nil, nil, fmt.Errorf("header: %w", err)
	}
	j := &job{id: id, ns: h.NS, initPID: h.InitPID, initTime: h.InitTime, tenant: h.Tenant, started: time.Unix(h.Started, 0)}
	if want := jobID(h.NS, h.InitTime); want != id {
		return nil, nil, fmt.Errorf("the header is of job %s", want)
	}
	var roots []storepath.Path
	for _, l := range lines[1:] {
		// A line cut short by a crash is not a path.
		if p, err := storepath.ParseBase(l); err == nil {
			roots = append(roots, p)
		}
	}
	return j, roots, nil
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

// pidNS names pid's pid namespace ("pid:[4026531836]").
func (m *Manager) pidNS(pid int) (string, error) {
	return os.Readlink(filepath.Join(m.proc, strconv.Itoa(pid), "ns", "pid"))
}

// jobID names the job of the pid namespace ns whose init started at
// initTime (clock ticks after boot): a namespace inode may be reused.
func jobID(ns string, initTime uint64) string {
	return fmt.Sprintf("pidns-%s-%d", nsInode(ns), initTime)
}

// findInit returns the host pid of the init (pid 1) of namespace ns, which
// pid belongs to: first up pid's parents (processes of a namespace descend
// from its init, orphans are re-parented to it), else, for a process that
// joined the namespace with setns (docker exec), by scanning procfs.
func (m *Manager) findInit(pid int, ns string) (int, error) {
	for p, steps := pid, 0; p > 0 && steps < 4096; steps++ {
		st, err := m.status(p)
		if err != nil {
			break
		}
		if st.nsPID == 1 {
			if cur, err := m.pidNS(p); err == nil && cur == ns {
				return p, nil
			}
			break
		}
		p = st.ppid
	}
	ents, err := os.ReadDir(m.proc)
	if err != nil {
		return 0, fmt.Errorf("jobs: scanning %s: %w", m.proc, err)
	}
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if cur, err := m.pidNS(p); err != nil || cur != ns {
			continue
		}
		if st, err := m.status(p); err == nil && st.nsPID == 1 {
			return p, nil
		}
	}
	return 0, fmt.Errorf("jobs: no init process found for pid namespace %s of client pid %d", ns, pid)
}

type procStatus struct {
	ppid  int
	nsPID int // the pid in the innermost namespace (last NSpid field)
}

// status reads PPid and NSpid from /proc/<pid>/status.
func (m *Manager) status(pid int) (procStatus, error) {
	f, err := os.Open(filepath.Join(m.proc, strconv.Itoa(pid), "status"))
	if err != nil {
		return procStatus{}, err
	}
	defer f.Close()
	st := procStatus{ppid: -1, nsPID: -1}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) == 0 {
			continue
		}
		switch k {
		case "PPid":
			st.ppid, _ = strconv.Atoi(fs[0])
		case "NSpid":
			st.nsPID, _ = strconv.Atoi(fs[len(fs)-1])
		}
	}
	if err := sc.Err(); err != nil {
		return procStatus{}, fmt.Errorf("reading status of pid %d: %w", pid, err)
	}
	return st, nil
}

// procStat is what the jobs use of /proc/<pid>/stat.
type procStat struct {
	// exited: the process has exited and waits to be reaped (a pid
	// namespace whose init is a zombie has no live process left).
	exited    bool
	startTime uint64 // field 22, in clock ticks after boot
}

// stat reads /proc/<pid>/stat.
func (m *Manager) stat(pid int) (procStat, error) {
	b, err := os.ReadFile(filepath.Join(m.proc, strconv.Itoa(pid), "stat"))
	if err != nil {
		return procStat{}, err
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("malformed stat of pid %d", pid)
	}
	fs := strings.Fields(string(b[i+1:]))
	// fs[0] is field 3 (state); start time is field 22.
	if len(fs) < 20 {
		return procStat{}, fmt.Errorf("malformed stat of pid %d", pid)
	}
	t, err := strconv.ParseUint(fs[19], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("stat of pid %d: start time: %w", pid, err)
	}
	return procStat{exited: fs[0] == "Z" || fs[0] == "X", startTime: t}, nil
}

// nsInode turns "pid:[4026531836]" into "4026531836".
func nsInode(link string) string {
	s := strings.TrimPrefix(link, "pid:[")
	return strings.TrimSuffix(s, "]")
}
