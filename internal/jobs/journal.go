package jobs

// The jobs' journals: a file per live job under <state>/nixyard-jobs, so
// that the next daemon takes up the jobs still running, with their roots.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

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

// waitingPrefix names the directory (waiting-PID) in which a daemon that
// does not keep the journals yet (another, stopping, does) journals its
// own jobs: if it exits before it gets them, the daemon that has them next
// takes these up too.
const waitingPrefix = "waiting-"

// waitingDir is this daemon's waiting directory.
func (m *Manager) waitingDir() string {
	return filepath.Join(m.journalDir(), waitingPrefix+strconv.Itoa(os.Getpid()))
}

// openJournal writes j's journal afresh, with its roots so far, and has
// its session add each new root to it: among the journals if m keeps
// them, else in its waiting directory. A failure is logged: the job then
// lives as long as this daemon only.
func (m *Manager) openJournal(j *job) {
	dir := m.journalDir()
	if m.journalLock == nil {
		dir = m.waitingDir()
	}
	if err := m.writeJournal(j, dir); err != nil {
		m.log.Warn("cannot journal a job session; it will not outlive the daemon", "job", j.id, "err", err)
	}
}

func (m *Manager) writeJournal(j *job, dir string) error {
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
	j.journal, j.jpath = f, filepath.Join(dir, j.id)
	return nil
}

// dropJournal deletes the journal of j, which has ended.
func (m *Manager) dropJournal(j *job) {
	if j.journal == nil {
		return
	}
	j.journal.Close()
	if err := os.Remove(j.jpath); err != nil && !errors.Is(err, os.ErrNotExist) {
		m.log.Warn("cannot delete the journal of an ended job", "job", j.id, "err", err)
	}
}

// restore takes up the jobs whose journals an earlier daemon left and
// whose init still runs: their sessions hold their roots again, and their
// lease runs from now. Other journals are deleted. So are taken up the
// journals a daemon that never got the journals kept in its waiting
// directory, once it has gone (or it is this one).
func (m *Manager) restore(ctx context.Context) {
	dir := m.journalDir()
	ents, err := os.ReadDir(dir)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			m.log.Warn("cannot read the jobs' journals", "dir", dir, "err", err)
		}
		return
	}
	for _, e := range ents {
		path := filepath.Join(dir, e.Name())
		switch {
		case e.Name() == ".lock":
		case strings.HasPrefix(e.Name(), "."):
			os.Remove(path) // a journal left half-written
		case strings.HasPrefix(e.Name(), waitingPrefix):
			m.restoreWaiting(ctx, path, strings.TrimPrefix(e.Name(), waitingPrefix))
		default:
			m.takeUp(ctx, path, e.Name(), false)
		}
	}
	// Every job is journalled from now on, those that came meanwhile too.
	for _, j := range m.jobs {
		if j.journal == nil {
			m.openJournal(j)
		}
	}
}

// restoreWaiting takes up the journals in the waiting directory dir of the
// daemon pid, unless that daemon still runs (and is not this one): then
// it takes them up itself, with the journals, or the daemon after it.
func (m *Manager) restoreWaiting(ctx context.Context, dir, pid string) {
	n, err := strconv.Atoi(pid)
	if err == nil && n != os.Getpid() && syscall.Kill(n, 0) != syscall.ESRCH {
		return
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		path := filepath.Join(dir, e.Name())
		if strings.HasPrefix(e.Name(), ".") {
			os.Remove(path)
			continue
		}
		if j, ok := m.jobs[e.Name()]; ok && j.jpath == path {
			// This daemon's own: journalled again among the journals.
			j.session.Journal(io.Discard, nil)
			j.journal.Close()
			j.journal, j.jpath = nil, ""
			os.Remove(path)
			continue
		}
		m.takeUp(ctx, path, e.Name(), true)
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		m.log.Warn("cannot remove a waiting daemon's journal directory", "dir", dir, "err", err)
	}
}

// takeUp takes up the job whose journal is at path (named by the job's
// id). A journal among the journals stays until openJournal replaces it;
// one from a waiting directory (moved, true) goes, as does that of a job
// that has ended.
func (m *Manager) takeUp(ctx context.Context, path, id string, moved bool) {
	j, roots, err := m.readJournal(path, id)
	switch {
	case err != nil:
		m.log.Warn("dropping an unreadable job journal", "file", path, "err", err)
		os.Remove(path)
		return
	case !m.initAlive(j):
		m.log.Info("job ended while no daemon ran; its journal goes", "job", j.id)
		os.Remove(path)
		return
	}
	if moved {
		defer os.Remove(path)
	}
	if cur, ok := m.jobs[j.id]; ok {
		j = cur // it reached this daemon before the journals did
	} else {
		j.session = m.st.OpenSession()
		j.idleFrom = m.now()
		m.jobs[j.id] = j
	}
	for _, p := range roots {
		if err := j.session.AddTempRoot(ctx, p); err != nil {
			m.log.Warn("cannot take up a job's root", "job", j.id, "path", p.String(), "err", err)
		}
	}
	m.log.Info("job session taken up from before the daemon started", "job", j.id, "tenant", j.tenant, "roots", len(roots))
}

// awaitJournals takes the journals once the daemon that keeps them (one
// still draining its connections, say) has let them go, polling until the
// Manager is closed: a daemon told to stop meanwhile still serves its
// jobs while it drains, and journals them once it can.
func (m *Manager) awaitJournals(ctx context.Context) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for range tick.C {
		m.mu.Lock()
		if m.closed {
			m.mu.Unlock()
			return
		}
		if lock, err := openJournalLock(m.journalDir()); err == nil {
			m.journalLock = lock
			m.restore(ctx)
			for _, f := range m.beforeTakeOver {
				f(ctx)
			}
			m.openGate()
			close(m.predecessor)
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
