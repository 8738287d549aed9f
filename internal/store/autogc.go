package store

import (
	"context"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// autoGC is the state of automatic garbage collection (nix.conf min-free,
// max-free), as Nix's LocalStore::autoGC keeps it.
type autoGC struct {
	mu           sync.Mutex
	lastCheck    time.Time
	running      chan struct{} // closed when the running collection ends; nil if none
	availAfterGC uint64        // space available after the last collection
	collected    bool          // availAfterGC is set
	// sizeAfterGC is the valid paths' NAR size after the last collection
	// for the size budget (at budgetGCAt), if it could not get down to
	// 90 % of the budget (the rest is alive); 0 otherwise. Until the store
	// grows by 1 % of the budget beyond it, or budgetRetry passes (paths
	// may have died since), no collection is started for the budget.
	sizeAfterGC uint64
	budgetGCAt  time.Time
	// lastSave is when the last uses were last saved (see lastUseSave).
	lastSave time.Time
	// onDone, if set, is told of each automatic collection's end.
	onDone func(freed uint64, err error)
}

// OnAutoGC has f told, at the end of each automatic collection, what it
// freed or why it failed (for metrics). Call it before the store is used.
func (s *Store) OnAutoGC(f func(freed uint64, err error)) { s.autoGC.onDone = f }

const (
	budgetRetry   = 10 * time.Minute
	lastUseSave   = time.Minute // how often last uses are saved, at most
	budgetPercent = 90          // what a size-budget collection brings the store down to
)

// AutoGC collects garbage when the store's file system has less than
// Config.MinFree bytes available, until Config.MaxFree are (Nix's
// autoGC): at most once per Config.MinFreeCheckInterval, and not again
// while the last collection freed too little to matter (less than 3 % of
// space since). With Config.SizeBudget it also collects, least recently
// used first, when the valid paths' NAR sizes sum to more than the
// budget, until they sum to 90 % of it. The collection runs in the
// background, honouring every root and temporary root; with wait, AutoGC
// waits for a running one to end, as Nix does before adding a path.
// Errors are logged.
func (s *Store) AutoGC(ctx context.Context, wait bool) {
	if s.cfg.MinFree == 0 && s.cfg.SizeBudget == 0 {
		return
	}
	if s.gcGate.Load() != nil {
		// Collections wait for the gate (a daemon still stopping keeps
		// the jobs' journals): an automatic one is not worth holding up
		// the request that would start it; it runs at a later check.
		return
	}
	a := &s.autoGC
	a.mu.Lock()
	done := a.running
	var started string
	if done == nil {
		cc, _ := ctx.Value(autoGCCheckKey{}).(*AutoGCCheck)
		done, started = a.startLocked(s, cc)
	}
	a.mu.Unlock()
	if started != "" {
		clientLog(ctx)(started) // not under a.mu: the client may be slow to read
	}
	if wait && done != nil {
		select {
		case <-done:
		case <-ctx.Done():
		}
	}
}

// startLocked starts a collection if one is due and returns its done
// channel (nil if none) and what Nix tells the client whose request
// starts it. The free space is checked once per MinFreeCheckInterval for
// the daemon, and as often for each connection (cc, if not nil), as with
// nix-daemon, whose every connection's process checks on its first
// request: a burst of short clients adding paths does not fill the disk
// between two checks. The size budget is checked at the daemon's pace.
func (a *autoGC) startLocked(s *Store, cc *AutoGCCheck) (done chan struct{}, msg string) {
	now := time.Now()
	global := now.Sub(a.lastCheck) >= s.cfg.MinFreeCheckInterval
	conn := cc != nil && s.cfg.MinFree > 0 && now.Sub(cc.last) >= s.cfg.MinFreeCheckInterval
	if !global && !conn {
		return nil, ""
	}
	if cc != nil {
		cc.last = now
	}
	if global {
		a.lastCheck = now
	}
	if global && s.cfg.SizeBudget > 0 && now.Sub(a.lastSave) >= lastUseSave && s.lastUse.saving.CompareAndSwap(false, true) {
		a.lastSave = now
		if !s.bg.start(func(context.Context) {
			defer s.lastUse.saving.Store(false)
			if err := s.saveLastUses(); err != nil {
				s.log.Warn("auto-GC: cannot save the last uses of paths", "err", err)
			}
		}) {
			s.lastUse.saving.Store(false)
		}
	}
	toFree := uint64(0)
	if s.cfg.MinFree > 0 {
		avail, err := s.availableBytes()
		if err != nil {
			s.log.Warn("auto-GC: cannot tell the free space", "err", err)
			return nil, ""
		}
		maxFree := s.cfg.MaxFree
		if maxFree == 0 {
			maxFree = math.MaxUint64
		}
		if avail < s.cfg.MinFree && avail < maxFree && !(a.collected && float64(avail) > float64(a.availAfterGC)*0.97) {
			toFree = maxFree - avail
		}
	}
	budget := s.cfg.SizeBudget
	if budget > 0 && global {
		_, size, err := s.Stats(context.Background())
		if err != nil {
			s.log.Warn("auto-GC: cannot tell the store's size", "err", err)
		} else if size > budget && (a.sizeAfterGC == 0 || size > a.sizeAfterGC+budget/100 || now.Sub(a.budgetGCAt) >= budgetRetry) {
			toFree = max(toFree, size-budget/100*budgetPercent)
		}
	}
	if toFree == 0 {
		return nil, ""
	}
	done = make(chan struct{})
	started := s.bg.start(func(ctx context.Context) {
		defer func() {
			a.mu.Lock()
			a.running, a.lastCheck = nil, time.Now()
			a.mu.Unlock()
			close(done)
		}()
		s.log.Info("running auto-GC", "to_free", toFree, "lru", budget > 0)
		res, err := s.CollectGarbage(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: toFree, LRU: budget > 0}, nil)
		var freed uint64
		if err != nil {
			s.log.Warn("auto-GC failed", "err", err)
		} else {
			freed = res.BytesFreed
			s.log.Info("auto-GC done", "freed", res.BytesFreed, "paths", len(res.Paths))
		}
		if f := a.onDone; f != nil {
			f(freed, err)
		}
		after, err := s.availableBytes()
		a.mu.Lock()
		if err == nil {
			a.availAfterGC, a.collected = after, true
		}
		a.sizeAfterGC = 0
		if budget > 0 {
			a.budgetGCAt = time.Now()
			if _, size, err := s.Stats(ctx); err == nil && size > budget/100*budgetPercent {
				a.sizeAfterGC = size
			}
		}
		a.mu.Unlock()
	})
	if !started { // the store is closing
		return nil, ""
	}
	a.running = done
	return done, fmt.Sprintf("running auto-GC to free %d bytes", toFree)
}

// forgetHoldOff ends the hold-off after an automatic collection that
// freed too little (availAfterGC, sizeAfterGC): another collection of dead
// paths (a client's, say) has freed space since, so the store's free space
// and size no longer say how much is alive. An automatic collection sets
// it again once it ends.
func (a *autoGC) forgetHoldOff() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.collected, a.sizeAfterGC = false, 0
}

// background runs the store's own goroutines (automatic collections,
// saving last uses) with a context that Close cancels, and lets Close
// wait for them.
type background struct {
	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

// start runs f in a goroutine of its own, unless the store is closing;
// it reports whether it did.
func (b *background) start(f func(ctx context.Context)) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		f(b.ctx)
	}()
	return true
}

// stop cancels the goroutines' context and waits for them to end.
func (b *background) stop() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	b.cancel()
	b.wg.Wait()
}

// AvailableBytes is the space available to unprivileged users on the
// store's file system (see availableBytes).
func (s *Store) AvailableBytes() (uint64, error) { return s.availableBytes() }

// availableBytes is the space available to unprivileged users on the
// store's file system. The environment variable _NIX_TEST_FREE_SPACE_FILE
// names a file that says it instead, as for Nix's tests.
func (s *Store) availableBytes() (uint64, error) {
	if f := os.Getenv("_NIX_TEST_FREE_SPACE_FILE"); f != "" {
		data, err := os.ReadFile(f)
		if err != nil {
			return 0, err
		}
		return strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(s.realDir, &st); err != nil {
		return 0, err
	}
	return st.Bavail * uint64(st.Frsize), nil
}

// AutoGCCheck is when a connection last had the free space checked (see
// WithAutoGCCheck).
type AutoGCCheck struct{ last time.Time }

type autoGCCheckKey struct{}

// WithAutoGCCheck returns ctx carrying a connection's AutoGCCheck: the
// automatic collection checks the free space for each connection at most
// once per min-free-check-interval, besides its daemon-wide check.
func WithAutoGCCheck(ctx context.Context, cc *AutoGCCheck) context.Context {
	return context.WithValue(ctx, autoGCCheckKey{}, cc)
}

type clientLogKey struct{}

// WithClientLog returns ctx carrying log, which is told what the store
// does on behalf of ctx's request that Nix tells its client: the start of
// an automatic collection.
func WithClientLog(ctx context.Context, log func(msg string)) context.Context {
	return context.WithValue(ctx, clientLogKey{}, log)
}

// clientLog is WithClientLog's log, or one that drops what it is told.
func clientLog(ctx context.Context) func(msg string) {
	if log, ok := ctx.Value(clientLogKey{}).(func(msg string)); ok {
		return log
	}
	return func(string) {}
}
