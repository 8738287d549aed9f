package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Group commit of single-path additions (AddToStoreNar, and the text and
// file additions of AddToStoreContent).
//
// Substitution runs many AddToStoreNar calls at once. Rather than each
// making its path durable and registering it in a transaction of its own,
// a path that is unpacked and checked joins the store's commit queue. If
// no group is being committed, its caller becomes the leader: it takes
// the whole queue as one group, makes it durable at once (one syncfs, as
// a rule: syncTrees) and registers it in one transaction. Paths that
// arrive meanwhile queue up; when the leader is done, the first of them
// leads the next group. Nothing waits on a timer for more paths.
//
// The references of a single-path addition were valid when it was
// checked under its path lock (batch.add, addUnpacked), so the members of
// a group never depend on each other's registration and their order in
// the transaction does not matter.

// commitQueue is a store's queue of paths waiting for the next group.
type commitQueue struct {
	mu      sync.Mutex
	running bool // a leader is committing a group
	queued  []*groupMember
}

// groupMember is one caller's path in the commit queue. wake gets one
// token when the member's result (err) is set or when it is to lead the
// next group (lead set).
type groupMember struct {
	pp   *pendingPath
	lead bool
	err  error
	wake chan struct{}
}

// commitPath makes pp durable and registers it, together with whatever
// other paths are queued at the same time, then releases its lock. On
// error pp's files are deleted and its lock released. Once queued, the
// path is committed whatever happens to ctx (as a flush always was):
// cancelling one caller does not disturb the group it is in.
func (s *Store) commitPath(ctx context.Context, pp *pendingPath) error {
	m := &groupMember{pp: pp, wake: make(chan struct{}, 1)}
	q := &s.commits
	q.mu.Lock()
	running := q.running
	q.running = true
	q.queued = append(q.queued, m)
	q.mu.Unlock()
	if running {
		<-m.wake
		if !m.lead {
			return m.err
		}
	}
	// Leader: m is the first queued path and no other group runs.
	q.mu.Lock()
	group := q.queued
	q.queued = nil
	q.mu.Unlock()

	s.commitGroup(context.WithoutCancel(ctx), group)

	q.mu.Lock()
	if len(q.queued) > 0 {
		next := q.queued[0]
		next.lead = true
		next.wake <- struct{}{}
	} else {
		q.running = false
	}
	q.mu.Unlock()
	for _, o := range group {
		if o != m {
			o.wake <- struct{}{}
		}
	}
	return m.err
}

// commitGroup makes the group's paths durable, registers them and sets
// each member's err. It registers them all in one transaction; if that
// fails, it registers each on its own, so that one path whose registration
// is refused (a reference collected meanwhile, say) fails alone. Failed
// paths are deleted; all are unlocked.
func (s *Store) commitGroup(ctx context.Context, group []*groupMember) {
	t0 := time.Now()
	paths := make([]*pendingPath, len(group))
	for i, m := range group {
		paths[i] = m.pp
	}
	// One syncfs after the last write to any member makes all durable,
	// unless other data waits to be written back (syncTrees).
	if err := s.syncPending(paths); err != nil {
		for _, m := range group {
			m.err = fmt.Errorf("store: making %s durable: %w", s.abs(m.pp.info.Path), err)
		}
	} else {
		t1 := time.Now()
		if err := s.register(ctx, paths); err != nil {
			if len(group) == 1 {
				group[0].err = registerError(err)
			} else {
				for _, m := range group {
					if err := s.register(ctx, []*pendingPath{m.pp}); err != nil {
						m.err = registerError(err)
					}
				}
			}
		}
		if addTiming {
			timingf("group commit: %d paths: sync %v, register %v", len(group),
				t1.Sub(t0).Round(time.Microsecond), time.Since(t1).Round(time.Microsecond))
		}
	}
	for _, m := range group {
		if m.err != nil {
			removeAll(s.RealPath(m.pp.info.Path))
		}
		m.pp.lock.unlock()
	}
}

// registerError is the error of a failed registration: a reference that
// is not valid says so itself.
func registerError(err error) error {
	if errors.Is(err, ErrNotValid) {
		return err
	}
	return fmt.Errorf("store: registering: %w", err)
}
