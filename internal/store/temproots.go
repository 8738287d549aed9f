package store

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// tempRoots are the temporary roots of this process: those of every open
// Session and of additions in progress. They are kept in memory (counted,
// since several holders may root one path) and in the file
// <state>/temproots/<pid> that real Nix's garbage collector reads: store
// paths each followed by a NUL byte, the file write-locked by its owner for
// as long as it lives (Nix 2.8 gc.cc createTempRootsFile/addTempRoot).
//
// A root is appended to the file while holding gc.lock shared, or, when a
// garbage collector holds gc.lock exclusively, after the collector has
// acknowledged it on its socket (<state>/gc-socket/socket), so no collector
// can miss it. Roots whose holders are gone stay in the file until it is
// compacted, which is rewritten (under the shared gc.lock, so no collector
// is reading it) once enough of its entries are stale (see compactRatio).
type tempRoots struct {
	s *Store

	mu     sync.Mutex
	counts map[storepath.Path]int  // live holders per root
	inFile map[storepath.Path]bool // roots written to the file (a superset of counts)
	stale  int                     // entries of inFile no longer in counts
	file   *os.File                // temproots/<pid>, write-locked; nil until the first root
	gcLock *os.File                // our descriptor of gc.lock for shared locking
	conn   net.Conn                // connection to a foreign collector's socket
	gc     *gcRun                  // our own collection, while it runs
	closed bool
}

// compactRatio bounds the stale entries of the roots file: it is rewritten
// once they are at least a quarter of the live ones, so that a collector in
// another process keeps few paths that nobody roots any more, while the
// rewrite (O(live roots)) stays rare when many roots are live.
const compactRatio = 4

func (r *tempRoots) init(s *Store) {
	r.s = s
	r.counts = map[storepath.Path]int{}
	r.inFile = map[storepath.Path]bool{}
}

func (r *tempRoots) fileName() string {
	return r.s.stateFile("temproots", strconv.Itoa(os.Getpid()))
}

// openFile creates temproots/<pid> as Nix does: delete a stale file of a
// dead process with our pid, create, write-lock, and start again if a
// collector deleted it (and wrote a byte into it) before we locked it.
func (r *tempRoots) openFile(ctx context.Context) error {
	name := r.fileName()
	for {
		if err := os.Remove(name); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("removing stale temporary roots file %s: %w", name, err)
		}
		f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("creating temporary roots file %s: %w", name, err)
		}
		if err := lockFD(ctx, f, unix.LOCK_EX, nil); err != nil {
			f.Close()
			return fmt.Errorf("locking temporary roots file %s: %w", name, err)
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return fmt.Errorf("stat %s: %w", name, err)
		}
		if st.Size() == 0 {
			r.file = f
			return nil
		}
		f.Close()
	}
}

// add makes p a temporary root until a matching remove.
func (r *tempRoots) add(ctx context.Context, p storepath.Path) error {
	ps := []storepath.Path{p}
	if err := r.record(ctx, ps); err != nil {
		return err
	}
	r.await(ps)
	return nil
}

// await tells this process's collector, if one runs, of the roots ps, and
// waits until it is deleting none of them. The caller holds no lock that
// the collector, or other holders of roots, might need.
func (r *tempRoots) await(ps []storepath.Path) {
	r.mu.Lock()
	g := r.gc
	r.mu.Unlock()
	if g != nil {
		g.addRoots(ps)
	}
}

// record makes each of ps a temporary root until a matching remove,
// without await; the roots new to the file are written to it at once.
func (r *tempRoots) record(ctx context.Context, ps []storepath.Path) error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return errors.New("store: closed")
	}
	var fresh []storepath.Path
	for _, p := range ps {
		if !r.inFile[p] {
			fresh = append(fresh, p)
			r.inFile[p] = true // undone below if the write fails
		} else if r.counts[p] == 0 {
			// In the file already (visible to other processes'
			// collectors), with no holder: no longer stale.
			r.stale--
		}
		r.counts[p]++
	}
	if len(fresh) > 0 {
		if err := r.publish(ctx, fresh); err != nil {
			for _, p := range fresh {
				delete(r.inFile, p)
			}
			for _, p := range ps {
				if r.counts[p]--; r.counts[p] == 0 {
					delete(r.counts, p)
					if r.inFile[p] {
						r.stale++
					}
				}
			}
			r.mu.Unlock()
			return fmt.Errorf("store: adding temporary root %s: %w", r.s.abs(fresh[0]), err)
		}
	}
	r.mu.Unlock()
	return nil
}

// publish writes ps to the roots file under the collector protocol.
// Called with r.mu held.
func (r *tempRoots) publish(ctx context.Context, ps []storepath.Path) error {
	if r.file == nil {
		if err := r.openFile(ctx); err != nil {
			return err
		}
	}
	if r.gcLock == nil {
		f, err := openLockFile(r.s.stateFile("gc.lock"))
		if err != nil {
			return err
		}
		r.gcLock = f
	}
	var entries []byte
	for _, p := range ps {
		entries = append(append(entries, r.s.abs(p)...), 0)
	}
	if r.gc == nil {
		for sent := 0; sent < len(ps); {
			ok, err := tryLockFD(r.gcLock, unix.LOCK_SH)
			if err != nil {
				return err
			}
			if ok {
				err := r.appendRoots(entries)
				return errors.Join(err, unlockFD(r.gcLock))
			}
			// A collector in another process is running: tell it of
			// each (it acknowledges each), then write them.
			for sent < len(ps) {
				ok, err := r.sendToCollector(ctx, r.s.abs(ps[sent]))
				if err != nil {
					return err
				}
				if !ok {
					// That collector has gone: the next one, which read
					// the roots files before these were written, must
					// hear of every one.
					sent = 0
					break
				}
				sent++
			}
			if sent == len(ps) {
				break
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	return r.appendRoots(entries)
}

// appendRoots writes entries (absolute paths, each ended by a NUL) to the
// roots file.
func (r *tempRoots) appendRoots(entries []byte) error {
	if _, err := r.file.Write(entries); err != nil {
		return fmt.Errorf("writing %s: %w", r.file.Name(), err)
	}
	return nil
}

// sendToCollector sends a root to the collector's socket and waits for
// its acknowledgement. It returns false (and no error) when the collector
// went away, so that the caller starts again.
func (r *tempRoots) sendToCollector(ctx context.Context, abs string) (bool, error) {
	if r.conn == nil {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", r.s.stateFile("gc-socket", "socket"))
		if err != nil {
			if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, os.ErrNotExist) {
				return false, nil
			}
			return false, fmt.Errorf("connecting to the garbage collector: %w", err)
		}
		r.conn = c
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Time{}
	}
	_ = r.conn.SetDeadline(deadline)
	_, err := r.conn.Write([]byte(abs + "\n"))
	var ack [1]byte
	if err == nil {
		_, err = io.ReadFull(r.conn, ack[:])
	}
	if err != nil {
		r.conn.Close()
		r.conn = nil
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		return false, nil // the collector exited: start again
	}
	if ack[0] != '1' {
		return false, fmt.Errorf("garbage collector answered %q to root %s", ack[0], abs)
	}
	return true, nil
}

// remove drops one holder of p, and compacts the file when worthwhile.
func (r *tempRoots) remove(p storepath.Path) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.counts[p] == 0 {
		return
	}
	r.counts[p]--
	if r.counts[p] > 0 {
		return
	}
	delete(r.counts, p)
	r.stale++
	if r.stale*compactRatio >= len(r.counts) && r.gc == nil && !r.closed {
		r.compact()
	}
}

// compact rewrites the roots file with the live roots only, under the
// shared gc.lock so that no collector reads it meanwhile. Called with r.mu
// held; skipped if a collector is running.
func (r *tempRoots) compact() {
	ok, err := tryLockFD(r.gcLock, unix.LOCK_SH)
	if err != nil || !ok {
		return
	}
	defer unlockFD(r.gcLock)
	buf := make([]byte, 0, 64*len(r.counts))
	for p := range r.counts {
		buf = append(buf, r.s.abs(p)...)
		buf = append(buf, 0)
	}
	if err := r.file.Truncate(0); err != nil {
		r.s.log.Warn("cannot compact temporary roots file", "path", r.file.Name(), "err", err)
		return
	}
	if _, err := r.file.Write(buf); err != nil {
		// The file may now lack live roots: keep every root in it by
		// writing them again one by one is impossible here; fail loudly.
		r.s.log.Error("rewriting temporary roots file failed; roots may be unprotected", "path", r.file.Name(), "err", err)
		return
	}
	r.inFile = make(map[storepath.Path]bool, len(r.counts))
	for p := range r.counts {
		r.inFile[p] = true
	}
	r.stale = 0
}

// snapshotLocked returns the roots a collector of this process must
// respect: those with holders now (later ones are sent to the collector).
func (r *tempRoots) snapshotLocked() map[storepath.Path]bool {
	out := make(map[storepath.Path]bool, len(r.counts))
	for p := range r.counts {
		out[p] = true
	}
	return out
}

// live returns the roots with holders now.
func (r *tempRoots) live() []storepath.Path {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]storepath.Path, 0, len(r.counts))
	for p := range r.counts {
		out = append(out, p)
	}
	return out
}

func (r *tempRoots) close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	var errs []error
	if r.conn != nil {
		errs = append(errs, r.conn.Close())
		r.conn = nil
	}
	if r.file != nil {
		if err := os.Remove(r.file.Name()); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		errs = append(errs, r.file.Close())
		r.file = nil
	}
	if r.gcLock != nil {
		errs = append(errs, r.gcLock.Close())
		r.gcLock = nil
	}
	return errors.Join(errs...)
}

// ErrSessionClosed is returned by AddTempRoot after Close.
var ErrSessionClosed = errors.New("store: session closed")

// Session is the temporary roots of one client connection: they keep their
// paths (and closures) from any garbage collector, ours or real Nix's,
// until Close. A Session is safe for concurrent use.
type Session struct {
	s       *Store
	mu      sync.Mutex
	roots   map[storepath.Path]bool
	closed  bool
	passive bool      // the store's own (optimising): its roots are no use of the paths
	journal io.Writer // where each new root is written too, a line each (see Journal)
}

// Journal writes header and the session's roots to w, a line each (the
// path's base name), and makes the session write each root it gets from
// then on too, so that the roots can be taken up again by another process
// (a daemon started after this one: see internal/jobs). No root added
// meanwhile is missed. A failed write later is logged, and ends the
// journal.
func (ss *Session) Journal(w io.Writer, header []byte) error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	bw := bufio.NewWriter(w)
	bw.Write(header)
	for p := range ss.roots {
		bw.WriteString(p.String() + "\n")
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	ss.journal = w
	return nil
}

// OpenSession starts a session; Close it when the connection ends.
func (s *Store) OpenSession() *Session {
	return &Session{s: s, roots: map[storepath.Path]bool{}}
}

// AddTempRoot makes p a temporary root of the session. It returns once any
// running garbage collector knows about the root (and has finished deleting
// p, if it was doing so).
func (ss *Session) AddTempRoot(ctx context.Context, p storepath.Path) error {
	return ss.AddTempRoots(ctx, []storepath.Path{p})
}

// AddTempRoots is AddTempRoot for each of ps; those new to the roots file
// are written to it at once.
func (ss *Session) AddTempRoots(ctx context.Context, ps []storepath.Path) error {
	ss.mu.Lock()
	if ss.closed {
		ss.mu.Unlock()
		return ErrSessionClosed
	}
	if !ss.passive {
		ss.s.Touch(ps...)
	}
	var fresh []storepath.Path
	for _, p := range ps {
		if !ss.roots[p] {
			ss.roots[p] = true
			fresh = append(fresh, p)
		}
	}
	if len(fresh) > 0 {
		if err := ss.s.roots.record(ctx, fresh); err != nil {
			for _, p := range fresh {
				delete(ss.roots, p)
			}
			ss.mu.Unlock()
			return err
		}
		ss.journalRoots(fresh)
	}
	ss.mu.Unlock()
	// Not under ss.mu: the session's other users need not wait while a
	// collection finishes deleting one of these. All of ps, not only
	// the fresh ones: another caller may have added one a moment ago and
	// still be waiting for the collector.
	ss.s.roots.await(ps)
	return nil
}

// journalRoots appends roots to the session's journal, if it keeps one.
// ss.mu is held.
func (ss *Session) journalRoots(roots []storepath.Path) {
	if ss.journal == nil {
		return
	}
	var b strings.Builder
	for _, p := range roots {
		b.WriteString(p.String() + "\n")
	}
	if _, err := io.WriteString(ss.journal, b.String()); err != nil {
		ss.s.log.Warn("cannot write a session's root to its journal; its later roots will not outlive the daemon", "err", err)
		ss.journal = nil
	}
}

// Close drops the session's temporary roots.
func (ss *Session) Close() error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.closed {
		return nil
	}
	ss.closed = true
	for p := range ss.roots {
		ss.s.roots.remove(p)
	}
	ss.roots = nil
	return nil
}

// readTempRootsFiles reads the temporary roots of other processes, as
// Nix's findTempRoots: a file whose write lock can be taken belongs to a
// dead process and is deleted (with a byte written into it, so that a
// process about to use it starts over). Our own file is skipped: the
// caller has our roots in memory. Each file is read up to maxTempRootsFile
// bytes (a million roots; no real process holds more).
func (s *Store) readTempRootsFiles(visit func(p storepath.Path, pid int), log func(msg string)) error {
	const maxTempRootsFile = 64 << 20
	dir := s.stateFile("temproots")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("store: reading %s: %w", dir, err)
	}
	self := os.Getpid()
	for _, e := range ents {
		if e.Name()[0] == '.' {
			continue
		}
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		path := dir + "/" + e.Name()
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("store: opening temporary roots file %s: %w", path, err)
		}
		ok, err := tryLockFD(f, unix.LOCK_EX)
		if err != nil {
			f.Close()
			return err
		}
		if ok {
			s.log.Info("removing stale temporary roots file", "path", path)
			if log != nil {
				log(fmt.Sprintf("removing stale temporary roots file '%s'", path))
			}
			os.Remove(path)
			f.Write([]byte("d"))
			f.Close()
			continue
		}
		br := bufio.NewReader(io.LimitReader(f, maxTempRootsFile))
		for {
			line, err := br.ReadString(0)
			if err != nil {
				break // a partial last entry is still being written
			}
			if p, err := s.dir.Parse(line[:len(line)-1]); err == nil {
				visit(p, pid)
			}
		}
		f.Close()
	}
	return nil
}
