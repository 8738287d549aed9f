package store

import (
	"bufio"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// gcRun is the state of a running collection that temporary roots added
// meanwhile (by our sessions or through the socket) must reach.
type gcRun struct {
	mu   sync.Mutex
	cond *sync.Cond
	temp map[string]bool // hash parts of temporary roots
	// pending are the hash parts of the paths of the closure the
	// collector is looking at, then deleting: a root added for one of
	// them waits until the closure is deleted or found alive. (Nix's
	// collector holds only the path it looks at: a root added for a path
	// it looked at before in the same closure did not stop its deletion,
	// and the holder's path went under it.)
	pending map[string]bool
	// waiting counts the roots waiting for pending paths: the collector
	// deletes what it has queued at once when one does.
	waiting int
}

func newGCRun() *gcRun {
	g := &gcRun{temp: map[string]bool{}, pending: map[string]bool{}}
	g.cond = sync.NewCond(&g.mu)
	return g
}

// addRoots records temporary roots and waits, counted in waiting, until
// the collector is deleting none of those paths.
func (g *gcRun) addRoots(ps []storepath.Path) {
	hashes := make([]string, len(ps))
	for i, p := range ps {
		hashes[i] = p.HashPart()
	}
	pending := func() bool { return slices.ContainsFunc(hashes, func(h string) bool { return g.pending[h] }) }
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, h := range hashes {
		g.temp[h] = true
	}
	if !pending() {
		return
	}
	g.waiting++
	for pending() {
		g.cond.Wait()
	}
	g.waiting--
}

// hasWaiting reports whether a root waits for a pending path.
func (g *gcRun) hasWaiting() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.waiting > 0
}

// unpend says that the collector is done with ps (deleted, kept, or not
// dead), waking the roots waiting for them.
func (g *gcRun) unpend(ps []storepath.Path) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, p := range ps {
		delete(g.pending, p.HashPart())
	}
	g.cond.Broadcast()
}

// clearPending says that the collector is done with every path it was
// looking at or deleting, waking the roots waiting for them.
func (g *gcRun) clearPending() {
	g.mu.Lock()
	defer g.mu.Unlock()
	clear(g.pending)
	g.cond.Broadcast()
}

// errGCLimit stops a collection once MaxFreed is passed.
var errGCLimit = errors.New("garbage collection limit reached")

type collector struct {
	s          *Store
	opts       GCOptions
	logf       func(string)
	run        *gcRun
	roots      map[storepath.Path]bool
	alive      map[storepath.Path]bool
	dead       map[storepath.Path]bool
	toDelete   map[storepath.Path]bool
	referrers  map[storepath.Path][]storepath.Path
	res        *GCResult
	del        bool
	keepDrvs   bool
	keepOutput bool
	// batch are dead paths not deleted yet, referrers first; they stay
	// pending (see gcRun) until they are. A collection without a limit
	// deletes up to gcBatch of them in one transaction, once the batch is
	// full, gcBatchAge old, or a root waits for one of them; one with a
	// limit (or of given paths) deletes each as it is found, to stop at
	// the limit.
	batch      []storepath.Path
	batchStart time.Time
}

// gcBatch bounds the dead paths invalidated in one transaction: a write
// transaction per path was most of the time a collection of many small
// paths took. gcBatchAge bounds how long one waits.
const (
	gcBatch    = 64
	gcBatchAge = 50 * time.Millisecond
)

// batchSize is how many dead paths the collection deletes at once.
func (c *collector) batchSize() int {
	if c.opts.Action == GCDeleteDead && c.opts.MaxFreed == math.MaxUint64 && !c.opts.LRU {
		return gcBatch
	}
	return 1
}

// CollectGarbage runs the garbage collector as Nix 2.8's collectGarbage:
// under gc.lock held exclusively, serving the GC socket for roots that
// other processes add meanwhile; roots are the permanent roots, runtime
// roots and temporary roots of all live processes; a path is live if a
// root reaches it through references, or (keep-derivations, on by default)
// a live output reaches its deriver's .drv, or (keep-outputs) a live .drv
// its outputs. Paths are deleted referrers first. DeleteDead stops once more than MaxFreed bytes were freed (0 frees
// nothing, as Nix); DeleteSpecific refuses a live path.
func (s *Store) CollectGarbage(ctx context.Context, opts GCOptions, log func(msg string)) (*GCResult, error) {
	if log == nil {
		log = func(string) {}
	}
	if g := s.gcGate.Load(); g != nil {
		if err := (*g)(ctx, log); err != nil {
			return nil, err
		}
	}
	// One collection at a time in this process, then gc.lock against
	// other processes; the wait for either is told once, as Nix tells it.
	log = onceWaiting(log)
	select {
	case s.gcSem <- struct{}{}:
	default:
		log(waitingForGCLock)
		select {
		case s.gcSem <- struct{}{}:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	defer func() { <-s.gcSem }()
	// After the wait for another collection here (jobs may end meanwhile),
	// before the roots are read (gc.lock takes this process's own).
	if f := s.beforeRoots.Load(); f != nil {
		(*f)()
	}

	c := s.newCollector(opts, log)
	if c.del {
		// As Nix: the reserve goes first, so that a full disk leaves the
		// collector room to work; it is made again once it is done (Nix
		// makes it for each connection), before gc.lock is released.
		os.Remove(s.reservedPath())
	}

	ourRoots, release, err := s.acquireGCLock(ctx, c.run, log)
	if err != nil {
		return nil, err
	}
	defer func() {
		if c.del {
			s.reserveSpace()
		}
		release()
	}()

	stopServer, err := s.serveGCSocket(c.run)
	if err != nil {
		return nil, err
	}
	defer stopServer()

	if err := c.findRoots(ctx, ourRoots); err != nil {
		return nil, err
	}
	if f := s.beforeCollect.Load(); f != nil {
		(*f)(ctx) // roots it adds reach this collection: nothing is pending yet
	}

	if opts.Action == GCDeleteSpecific {
		for _, p := range opts.Paths {
			if err := c.deleteReferrersClosure(ctx, p); err != nil {
				return nil, err
			}
			if err := c.flush(ctx); err != nil {
				return nil, err
			}
			if !c.dead[p] {
				return nil, errors.New(hint.Fmt("Cannot delete path '%s' since it is still alive. To find out why, use: nix-store --query --roots", s.abs(p)))
			}
		}
	} else if opts.MaxFreed > 0 {
		if c.del {
			log("deleting garbage...")
		} else {
			log("determining live/dead paths...")
		}
		err := c.sweep(ctx)
		if err == nil {
			err = c.flush(ctx)
		}
		if err != nil && !errors.Is(err, errGCLimit) {
			return nil, err
		}
	}

	switch opts.Action {
	case GCReturnLive:
		for p := range c.alive {
			c.res.Paths = append(c.res.Paths, s.abs(p))
		}
	case GCReturnDead:
		for p := range c.dead {
			c.res.Paths = append(c.res.Paths, s.abs(p))
		}
	default:
		log("deleting unused links...")
		saved, err := s.deleteUnusedLinks(ctx)
		if err != nil {
			return nil, err
		}
		if saved != nil {
			log(fmt.Sprintf("note: currently hard linking saves %.2f MiB", float64(*saved)/(1<<20)))
		}
	}
	slices.Sort(c.res.Paths)
	if opts.Action == GCDeleteDead && c.res.BytesFreed > 0 {
		// Not for a deletion of some paths (nix-store --delete): the
		// hold-off is against collections that free too little.
		s.autoGC.forgetHoldOff()
	}
	return c.res, nil
}

// findRoots gathers the roots: the permanent and runtime ones (unless
// liveness is ignored), ours (this process's temporary roots, given) and
// the other processes' temporary roots.
func (c *collector) findRoots(ctx context.Context, ours map[storepath.Path]bool) error {
	s := c.s
	c.logf("finding garbage collector roots...")
	if !c.opts.IgnoreLiveness {
		rs := rootSet{}
		if err := s.findRootsNoTemp(ctx, rs, true, c.logf); err != nil {
			return err
		}
		for p := range rs {
			c.roots[p] = true
		}
	}
	c.run.mu.Lock()
	for p := range ours {
		c.run.temp[p.HashPart()] = true
		c.roots[p] = true
	}
	c.run.mu.Unlock()
	return s.readTempRootsFiles(func(p storepath.Path, _ int) {
		c.run.mu.Lock()
		c.run.temp[p.HashPart()] = true
		c.run.mu.Unlock()
		c.roots[p] = true
	}, c.logf)
}

// onceWaiting passes log's messages on, except that it says
// waitingForGCLock only once.
func onceWaiting(log func(string)) func(string) {
	said := false
	return func(msg string) {
		if msg == waitingForGCLock {
			if said {
				return
			}
			said = true
		}
		log(msg)
	}
}

// newCollector is the state of a collection with opts, telling log.
func (s *Store) newCollector(opts GCOptions, log func(string)) *collector {
	c := &collector{
		s: s, opts: opts, logf: log, run: newGCRun(),
		roots: map[storepath.Path]bool{}, alive: map[storepath.Path]bool{},
		dead: map[storepath.Path]bool{}, toDelete: map[storepath.Path]bool{},
		referrers: map[storepath.Path][]storepath.Path{}, res: &GCResult{},
		del:      opts.Action == GCDeleteDead || opts.Action == GCDeleteSpecific,
		keepDrvs: !s.cfg.DiscardDerivations, keepOutput: s.cfg.KeepOutputs,
	}
	if opts.KeepOutputs != nil {
		c.keepOutput = *opts.KeepOutputs
	}
	if opts.KeepDerivations != nil {
		c.keepDrvs = *opts.KeepDerivations
	}
	for _, p := range opts.Paths {
		c.toDelete[p] = true
	}
	if opts.Action == GCDeleteSpecific && opts.IgnoreLiveness {
		c.keepDrvs, c.keepOutput = false, false
	}
	return c
}

// SetGCGate has every collection (automatic ones too) wait for gate
// first; gate may tell the collection's client why with log. nil removes
// it. The job sessions use it while another daemon still keeps their
// journals, whose roots no collection may miss.
func (s *Store) SetGCGate(gate func(ctx context.Context, log func(string)) error) {
	if gate == nil {
		s.gcGate.Store(nil)
		return
	}
	s.gcGate.Store(&gate)
}

// SetBeforeRoots has every collection (automatic ones too) call f first,
// before it reads the roots; nil removes it. The job sessions use it to end
// the jobs that are over, whose temporary roots would otherwise keep their
// paths from the collection.
func (s *Store) SetBeforeRoots(f func()) {
	if f == nil {
		s.beforeRoots.Store(nil)
		return
	}
	s.beforeRoots.Store(&f)
}

// SetBeforeCollect has every collection (automatic ones too) call f once
// it has read the roots, before it deletes anything; nil removes it. The
// job sessions use it to take up the roots of jobs that a daemon gone
// since journalled.
func (s *Store) SetBeforeCollect(f func(ctx context.Context)) {
	if f == nil {
		s.beforeCollect.Store(nil)
		return
	}
	s.beforeCollect.Store(&f)
}

// waitingForGCLock is what a collection says when it waits for another.
const waitingForGCLock = "waiting for the big garbage collector lock..."

// acquireGCLock takes gc.lock exclusively and publishes run to our own
// temporary-roots code in one step, so that no root is added in between
// without the collector seeing it. It returns the roots of this process.
func (s *Store) acquireGCLock(ctx context.Context, run *gcRun, log func(string)) (map[storepath.Path]bool, func(), error) {
	lockPath := s.stateFile("gc.lock")
	f, err := openLockFile(lockPath)
	if err != nil {
		return nil, nil, err
	}
	delay := time.Millisecond
	for first := true; ; first = false {
		s.roots.mu.Lock()
		ok, err := tryLockFD(f, unix.LOCK_EX)
		if err != nil {
			s.roots.mu.Unlock()
			f.Close()
			return nil, nil, err
		}
		if ok {
			s.roots.gc = run
			ours := s.roots.snapshotLocked()
			s.roots.mu.Unlock()
			release := func() {
				s.roots.mu.Lock()
				s.roots.gc = nil
				s.roots.mu.Unlock()
				f.Close()
			}
			return ours, release, nil
		}
		s.roots.mu.Unlock()
		if first {
			log(waitingForGCLock)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, nil, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 100*time.Millisecond)
	}
}

// serveGCSocket listens on <state>/gc-socket/socket for temporary roots of
// other processes, as Nix's collector does: each line is a store path,
// answered with "1" once the collector is not deleting it.
func (s *Store) serveGCSocket(run *gcRun) (func(), error) {
	dir := s.stateFile("gc-socket")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("store: creating %s: %w", dir, err)
	}
	sock := dir + "/socket"
	os.Remove(sock)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("store: listening on %s: %w", sock, err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(sock, 0o666); err != nil {
		ln.Close()
		return nil, fmt.Errorf("store: chmod %s: %w", sock, err)
	}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  = map[net.Conn]bool{}
		closed bool // the stop has closed the connections
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				// Accepted as the stop closed the others: its reader
				// would wait for a root that no one reads any more.
				mu.Unlock()
				conn.Close()
				return
			}
			conns[conn] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() {
					mu.Lock()
					delete(conns, conn)
					mu.Unlock()
					conn.Close()
				}()
				// A line is one store path: at most the store dir, a
				// slash, the hash, a dash and a 211-byte name.
				br := bufio.NewReaderSize(conn, 4096)
				for {
					line, err := br.ReadSlice('\n')
					if err != nil {
						return
					}
					abs := string(line[:len(line)-1])
					if p, err := s.dir.Parse(abs); err == nil {
						run.addRoots([]storepath.Path{p})
					} else {
						s.log.Error("received garbage instead of a root from client", "line", abs)
					}
					if _, err := conn.Write([]byte("1")); err != nil {
						return
					}
				}
			}()
		}
	}()
	return func() {
		ln.Close()
		mu.Lock()
		closed = true
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		run.clearPending()
		wg.Wait()
	}, nil
}

// sweep reads the store directory and deletes whatever is invalid or
// unreachable: in the directory's order, or with LRU the least recently
// used first.
func (c *collector) sweep(ctx context.Context) error {
	f, err := os.Open(c.s.realDir)
	if err != nil {
		return fmt.Errorf("store: opening %s: %w", c.s.realDir, err)
	}
	defer f.Close()
	n := 1024
	if c.opts.LRU {
		n = -1 // all of them, to sort
	}
	for {
		names, rerr := f.Readdirnames(n)
		if c.opts.LRU {
			if rerr != nil {
				return fmt.Errorf("store: reading %s: %w", c.s.realDir, rerr)
			}
			if names, err = c.s.lruOrder(ctx, names); err != nil {
				return err
			}
		}
		for _, name := range names {
			if name == ".links" {
				continue
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			if p, err := storepath.ParseBase(name); err == nil {
				err = c.deleteReferrersClosure(ctx, p)
				if err != nil {
					return err
				}
			} else if err := c.deleteFromStore(name); err != nil {
				return err
			}
		}
		if rerr != nil || n < 0 {
			return nil
		}
	}
}

func (c *collector) deleteFromStore(base string) error {
	c.logf(fmt.Sprintf("deleting '%s'", string(c.s.dir)+"/"+base))
	c.res.Paths = append(c.res.Paths, string(c.s.dir)+"/"+base)
	freed, err := removeAllCount(c.s.realDir + "/" + base)
	c.res.BytesFreed += freed
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	counted := c.res.BytesFreed
	if c.opts.LRU {
		counted = c.res.NarBytesFreed
	}
	if counted > c.opts.MaxFreed && c.opts.Action != GCDeleteSpecific {
		c.logf(fmt.Sprintf("deleted more than %d bytes; stopping", c.opts.MaxFreed))
		return errGCLimit
	}
	return nil
}

// deleteReferrersClosure visits start and everything that refers to it
// (and, per keep-derivations/keep-outputs, derivations and outputs); if
// none is a root, all of them are garbage and are deleted, referrers first.
func (c *collector) deleteReferrersClosure(ctx context.Context, start storepath.Path) error {
	closure, dead, err := c.visitReferrers(ctx, start)
	if err != nil || !dead {
		c.run.unpend(c.notDead(closure))
		if err != nil {
			return err
		}
		return c.flushDue(ctx)
	}
	return c.deleteDead(ctx, closure)
}

// visitReferrers walks from start through referrers and the derivation
// links the collector follows; dead reports that nothing it reached is
// alive (a root, a temporary root, or known alive), and closure is what it
// reached. Each path reached is pending (see gcRun) until the caller is
// done with it.
func (c *collector) visitReferrers(ctx context.Context, start storepath.Path) (closure map[storepath.Path]bool, dead bool, err error) {
	visited := map[storepath.Path]bool{start: true}
	todo := []storepath.Path{start}
	markAlive := func(p storepath.Path) {
		c.alive[p] = true
		c.alive[start] = true
		// An error leaves the closure unmarked: a path of it is then
		// visited on its own, and found alive through its referrers.
		if closure, err := c.s.QueryClosure(ctx, []storepath.Path{p}); err == nil {
			for _, q := range closure {
				c.alive[q] = true
			}
		}
	}
	for len(todo) > 0 {
		if err := ctx.Err(); err != nil {
			return visited, false, err
		}
		p := todo[0]
		todo = todo[1:]
		if c.alive[p] {
			c.alive[start] = true
			return visited, false, nil
		}
		if c.dead[p] {
			continue
		}
		if c.roots[p] {
			markAlive(p)
			return visited, false, nil
		}
		if c.opts.Action == GCDeleteSpecific && !c.toDelete[p] {
			return visited, false, nil
		}
		c.run.mu.Lock()
		if c.run.temp[p.HashPart()] {
			c.run.mu.Unlock()
			markAlive(p)
			return visited, false, nil
		}
		c.run.pending[p.HashPart()] = true
		c.run.mu.Unlock()

		valid, err := c.s.IsValidPathFresh(ctx, p)
		if err != nil {
			return visited, false, err
		}
		if !valid {
			continue
		}
		next, err := c.linked(ctx, p)
		if err != nil {
			return visited, false, err
		}
		for _, q := range next {
			if !visited[q] {
				visited[q] = true
				todo = append(todo, q)
			}
		}
	}
	return visited, true, nil
}

// linked returns what keeps the valid path p alive if it is alive: its
// referrers, and per keep-derivations and keep-outputs the outputs of a
// derivation and the derivations of an output.
func (c *collector) linked(ctx context.Context, p storepath.Path) ([]storepath.Path, error) {
	refs, ok := c.referrers[p]
	if !ok {
		var err error
		if refs, err = c.s.QueryReferrers(ctx, p); err != nil {
			return nil, err
		}
		c.referrers[p] = refs
	}
	next := slices.Clone(refs)
	if c.keepDrvs && p.IsDerivation() {
		outs, err := c.s.QueryDerivationOutputMap(ctx, p)
		if err != nil && !errors.Is(err, ErrNotValid) {
			return nil, err
		}
		for _, o := range outs {
			info, err := c.s.queryPathInfoDB(ctx, o) // not the cache: the collector's decision
			if err == nil && info.Deriver == p {
				next = append(next, o)
			}
		}
	}
	if c.keepOutput {
		ds, err := c.s.QueryValidDerivers(ctx, p)
		if err != nil {
			return nil, err
		}
		next = append(next, ds...)
	}
	return next, nil
}

// deleteDead marks the paths of a dead closure dead and, if the
// collection deletes, queues them for deletion, referrers first, and
// deletes the queue once it has batchSize paths.
func (c *collector) deleteDead(ctx context.Context, closure map[storepath.Path]bool) error {
	order, err := c.s.topoSort(ctx, closure)
	if err != nil {
		c.run.unpend(c.notDead(closure))
		return err
	}
	for _, p := range order {
		if c.dead[p] {
			continue
		}
		c.dead[p] = true
		if !c.del {
			continue
		}
		if len(c.batch) == 0 {
			c.batchStart = time.Now()
		}
		c.batch = append(c.batch, p)
		if len(c.batch) >= c.batchSize() {
			if err := c.flush(ctx); err != nil {
				return err
			}
		}
	}
	if len(c.batch) == 0 {
		c.run.clearPending() // the closure is done with
		return nil
	}
	return c.flushDue(ctx)
}

// notDead lists the paths of closure not found dead: they are no longer
// pending once the collector has looked at them (dead ones are, until
// deleted).
func (c *collector) notDead(closure map[storepath.Path]bool) []storepath.Path {
	var ps []storepath.Path
	for p := range closure {
		if !c.dead[p] {
			ps = append(ps, p)
		}
	}
	return ps
}

// flushDue deletes the queued dead paths if a root waits for one of them
// or the oldest has waited gcBatchAge.
func (c *collector) flushDue(ctx context.Context) error {
	if len(c.batch) > 0 && (c.run.hasWaiting() || time.Since(c.batchStart) >= gcBatchAge) {
		return c.flush(ctx)
	}
	return nil
}

// flush deletes the queued dead paths: invalidated in one transaction,
// then their files removed, each then no longer pending. One that a
// valid path has come to refer to meanwhile is alive after all, and kept.
func (c *collector) flush(ctx context.Context) error {
	if len(c.batch) == 0 {
		return nil
	}
	batch := c.batch
	c.batch = nil
	defer c.run.unpend(batch)
	runTestHook(&testHookClosureDead)
	narSize := make([]uint64, len(batch))
	for i, p := range batch {
		if info, err := c.s.queryPathInfoDB(ctx, p); err == nil {
			narSize[i] = info.NarSize
		}
	}
	kept, err := c.s.invalidatePathsChecked(ctx, batch)
	if err != nil {
		return err
	}
	for i, p := range batch {
		if kept[p] {
			delete(c.dead, p)
			c.alive[p] = true
			continue
		}
		c.res.NarBytesFreed += narSize[i]
		if _, ok := c.s.lastUse.m.LoadAndDelete(p); ok {
			c.s.lastUse.dirty.Store(true)
		}
		delete(c.referrers, p)
		if err := c.deleteFromStore(p.String()); err != nil {
			return err
		}
	}
	return nil
}

// SortByReferences orders paths so that the paths each refers to (among
// them) come first: the order in which a closure can be copied.
func (s *Store) SortByReferences(ctx context.Context, paths []storepath.Path) ([]storepath.Path, error) {
	set := make(map[storepath.Path]bool, len(paths))
	for _, p := range paths {
		set[p] = true
	}
	order, err := s.topoSort(ctx, set)
	if err != nil {
		return nil, err
	}
	slices.Reverse(order)
	return order, nil
}

// topoSort orders a set of paths so that referrers come before the paths
// they refer to. Invalid paths have no references.
func (s *Store) topoSort(ctx context.Context, set map[storepath.Path]bool) ([]storepath.Path, error) {
	refs := map[storepath.Path][]storepath.Path{}
	for p := range set {
		info, err := s.QueryPathInfo(ctx, p)
		if errors.Is(err, ErrNotValid) {
			continue
		}
		if err != nil {
			return nil, err
		}
		refs[p] = info.References
	}
	keys := make([]storepath.Path, 0, len(set))
	for p := range set {
		keys = append(keys, p)
	}
	storepath.Sort(keys)
	done := map[storepath.Path]bool{}
	var post []storepath.Path
	var visit func(p storepath.Path)
	visit = func(p storepath.Path) {
		if done[p] {
			return
		}
		done[p] = true
		for _, r := range refs[p] {
			if r != p && set[r] {
				visit(r)
			}
		}
		post = append(post, p)
	}
	for _, p := range keys {
		visit(p)
	}
	slices.Reverse(post)
	return post, nil
}

// invalidatePathsChecked removes ps from the database in one
// transaction, in their order, except those that valid paths other than
// themselves refer to then (a path added meanwhile that refers to one):
// kept names them.
func (s *Store) invalidatePathsChecked(ctx context.Context, ps []storepath.Path) (kept map[storepath.Path]bool, err error) {
	kept = map[storepath.Path]bool{}
	err = s.db.write(ctx, ps, func(tx *sql.Tx) error {
		clear(kept) // a retried transaction starts again
		referrersOf, invalidate := tx.StmtContext(ctx, s.db.wReferrers), tx.StmtContext(ctx, s.db.wInvalidate)
		for _, p := range ps {
			rows, err := referrersOf.QueryContext(ctx, s.abs(p))
			if err != nil {
				return err
			}
			referrers, err := s.scanPaths(rows, "referrers of "+s.abs(p))
			if err != nil {
				return err
			}
			if slices.ContainsFunc(referrers, func(r storepath.Path) bool { return r != p }) {
				kept[p] = true
				continue
			}
			if _, err := invalidate.ExecContext(ctx, s.abs(p)); err != nil {
				return fmt.Errorf("invalidating %s: %w", s.abs(p), err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("store: invalidating dead paths: %w", err)
	}
	return kept, nil
}

// deleteUnusedLinks removes files in .links that nothing else links to,
// and returns how many bytes the remaining links save, as Nix counts them
// (the bytes of the extra links less those of .links itself), or nil if
// there is no .links.
func (s *Store) deleteUnusedLinks(ctx context.Context) (saved *int64, err error) {
	links := s.realDir + "/.links"
	f, err := os.Open(links)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("store: opening %s: %w", links, err)
	}
	defer f.Close()
	var actual, unshared int64
	for {
		names, rerr := f.Readdirnames(1024)
		for _, n := range names {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			var st unix.Stat_t
			p := links + "/" + n
			if err := unix.Lstat(p, &st); err != nil {
				continue
			}
			if st.Nlink != 1 {
				actual += st.Size
				unshared += int64(st.Nlink-1) * st.Size
				continue
			}
			if err := unix.Unlink(p); err != nil && !errors.Is(err, unix.ENOENT) {
				return nil, fmt.Errorf("store: deleting %s: %w", p, err)
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return nil, fmt.Errorf("store: reading %s: %w", links, rerr)
		}
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("store: statting %s: %w", links, err)
	}
	n := unshared - actual - st.Blocks*512
	return &n, nil
}

// testHookClosureDead, set only by tests, runs when the collector has
// found a closure dead, before it deletes it.
var testHookClosureDead atomic.Pointer[func()]

func runTestHook(h *atomic.Pointer[func()]) {
	if f := h.Load(); f != nil {
		(*f)()
	}
}
