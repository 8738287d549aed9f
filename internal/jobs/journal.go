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
	"strings"
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

// waitingPrefix starts the names of the directories in which daemons
// that do not keep the journals yet (another, stopping, does) journal
// their own jobs, each locked by its daemon for as long as it lives: if
// it exits before it gets the journals, the daemon that has them takes
// these up too.
const waitingPrefix = "waiting-"

// openJournal writes j's journal afresh, with its roots so far, and has
// its session add each new root to it: among the journals if m keeps
// them, else in its waiting directory. A failure is logged: the job then
// lives as long as this daemon only.
func (m *Manager) openJournal(j *job) {
	dir := m.journalDir()
	if m.journalLock == nil {
		if err := m.openWaitDir(); err != nil {
			m.log.Warn("cannot journal a job session while another daemon keeps the journals; it will not outlive this daemon", "job", j.id, "err", err)
			return
		}
		dir = m.waitDir
	}
	if err := m.writeJournal(j, dir); err != nil {
		m.log.Warn("cannot journal a job session; it will not outlive the daemon", "job", j.id, "err", err)
	}
}

// openWaitDir makes and locks m's waiting directory, once: made under
// another name (makingPrefix) and locked there, so that the daemon with
// the journals never sees one that is not locked yet.
func (m *Manager) openWaitDir() error {
	if m.waitDir != "" {
		return nil
	}
	if err := os.MkdirAll(m.journalDir(), 0o700); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(m.journalDir(), makingPrefix)
	if err != nil {
		return err
	}
	lock, err := openJournalLock(tmp)
	if err == nil {
		dir := filepath.Join(m.journalDir(), waitingPrefix+strings.TrimPrefix(filepath.Base(tmp), makingPrefix))
		if err = os.Rename(tmp, dir); err == nil {
			m.waitDir, m.waitLock = dir, lock
			return nil
		}
		lock.Close()
	}
	os.RemoveAll(tmp)
	return err
}

// makingPrefix names a waiting directory being made (openWaitDir).
const makingPrefix = "making-"

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
// journals in the waiting directories of daemons that have gone, and
// this one's own; then every job is journalled among the journals, and
// each collection first takes up those of daemons gone since.
func (m *Manager) restore(ctx context.Context) {
	dir := m.journalDir()
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		m.log.Warn("cannot read the jobs' journals", "dir", dir, "err", err)
	}
	for _, e := range ents {
		path := filepath.Join(dir, e.Name())
		switch {
		case e.Name() == ".lock", strings.HasPrefix(e.Name(), waitingPrefix), strings.HasPrefix(e.Name(), makingPrefix):
		case strings.HasPrefix(e.Name(), "."):
			os.Remove(path) // a journal left half-written
		default:
			// Stays until openJournal writes the job's anew over it.
			m.takeUp(ctx, path, e.Name())
		}
	}
	m.takeUpWaiting(ctx)
	// Every job is journalled from now on, those that came meanwhile too.
	for _, j := range m.jobs {
		if j.journal == nil {
			m.openJournal(j)
		}
	}
	m.st.SetBeforeCollect(func(ctx context.Context) {
		m.mu.Lock()
		defer m.mu.Unlock()
		if m.journalLock != nil {
			m.takeUpWaiting(context.WithoutCancel(ctx)) // roots that must not be missed
		}
	})
}

// takeUpWaiting takes up the jobs journalled in waiting directories: this
// daemon's own, and those whose daemon has gone (its lock is free); it
// also removes what a daemon that died making one left. m keeps the
// journals; m.mu is held.
func (m *Manager) takeUpWaiting(ctx context.Context) {
	ents, _ := os.ReadDir(m.journalDir())
	for _, e := range ents {
		dir := filepath.Join(m.journalDir(), e.Name())
		switch {
		case !e.IsDir():
		case strings.HasPrefix(e.Name(), makingPrefix):
			// No journal is ever in one; its maker may be at it now.
			if lock, _ := openJournalLock(dir); lock != nil {
				os.RemoveAll(dir)
				lock.Close()
			}
		case dir == m.waitDir:
			lock := m.waitLock
			m.waitDir, m.waitLock = "", nil
			m.takeUpDir(ctx, dir, lock)
		case strings.HasPrefix(e.Name(), waitingPrefix):
			if lock, _ := openJournalLock(dir); lock != nil { // else its daemon runs
				m.takeUpDir(ctx, dir, lock)
			}
		}
	}
}

// takeUpDir takes up the jobs journalled in the waiting directory dir,
// whose lock m holds, and removes it. Each job is journalled among the
// journals before its waiting journal goes; a journal that cannot be (or
// whose roots could not all be taken up) stays, for the next try.
func (m *Manager) takeUpDir(ctx context.Context, dir string, lock *os.File) {
	files, _ := os.ReadDir(dir)
	for _, f := range files {
		path := filepath.Join(dir, f.Name())
		switch {
		case f.Name() == ".lock":
		case strings.HasPrefix(f.Name(), "."):
			os.Remove(path)
		default:
			if m.moveJournal(ctx, path, f.Name()) {
				os.Remove(path)
			}
		}
	}
	os.Remove(filepath.Join(dir, ".lock"))
	lock.Close()
	os.Remove(dir) // if a journal stays, so does dir
}

// moveJournal takes up the job of the waiting journal at path (this
// daemon's own, or another's) and journals it among the journals. It
// reports whether the waiting journal may go.
func (m *Manager) moveJournal(ctx context.Context, path, id string) bool {
	j, complete := m.jobs[id], true
	if j == nil || j.jpath != path { // not this daemon's own
		if j, complete = m.takeUp(ctx, path, id); j == nil {
			return false // ended, its journal gone
		}
	}
	if j.jpath == path || j.journal == nil {
		old := j.journal
		if err := m.writeJournal(j, m.journalDir()); err != nil {
			m.log.Warn("cannot journal a taken-up job session among the journals; left where it is", "job", j.id, "err", err)
			if old != nil { // detached by writeJournal: taken up again next time
				old.Close()
				j.journal, j.jpath = nil, ""
			}
			return false
		}
		if old != nil {
			old.Close()
		}
	}
	return complete
}

// takeUp takes up the job whose journal is at path (named by the job's
// id), and returns it, and whether it holds all of its roots now; for a
// job that has ended (or an unreadable journal) it deletes the journal and
// returns nil.
func (m *Manager) takeUp(ctx context.Context, path, id string) (_ *job, complete bool) {
	j, roots, err := m.readJournal(path, id)
	switch {
	case err != nil:
		m.log.Warn("dropping an unreadable job journal", "file", path, "err", err)
		os.Remove(path)
		return nil, false
	case !m.initAlive(j):
		m.log.Info("job ended while no daemon ran; its journal goes", "job", j.id)
		os.Remove(path)
		return nil, false
	}
	if cur, ok := m.jobs[j.id]; ok {
		j = cur // it reached this daemon before the journals did
	} else {
		j.session = m.st.OpenSession()
		j.idleFrom = m.now()
		m.jobs[j.id] = j
	}
	complete = true
	for _, p := range roots {
		if err := j.session.AddTempRoot(ctx, p); err != nil {
			m.log.Warn("cannot take up a job's root", "job", j.id, "path", p.String(), "err", err)
			complete = false
		}
	}
	m.log.Info("job session taken up from before the daemon started", "job", j.id, "tenant", j.tenant, "roots", len(roots))
	return j, complete
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
