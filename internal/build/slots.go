package build

import (
	"context"
	"sync"
)

// slots hands out the host-wide build slots. Callers (slotClients) that
// wait for a slot form a ring; a freed slot goes to a client in the ring
// that has a waiter and is below its own cap, of the share (see
// slotShare) that runs the fewest builds, and among those of the share
// served longest ago, the next in the ring: free slots are shared between
// callers, and between the CI jobs they belong to, whatever their number
// of builds and requests.
type slots struct {
	mu      sync.Mutex
	max     int
	running int
	ring    []*slotClient // clients with waiters, in round-robin order
	next    int           // ring index served next
	freed   chan struct{} // closed and replaced when a slot is given back
	shares  map[string]*slotShare
	grants  uint64 // slots granted so far
}

// slotClient is one caller's share of the slots.
type slotClient struct {
	max     int // <= 0: no own cap
	running int
	waiting []*slotWaiter
	share   *slotShare
}

// slotShare is what several callers count as one for the slots: the
// requests of one CI job (a job that runs six nix-builds at once gets
// slots as one that asks for six builds in one request would). A caller
// of no job has a share of its own.
type slotShare struct {
	key     string // "" for a caller's own
	running int
	served  uint64 // s.grants when it was last granted a slot, or made
	clients int    // open clients (see slots.client); shared ones only
}

type slotWaiter struct {
	ready chan struct{} // closed when the slot is granted
}

func newSlots(max int) *slots {
	return &slots{max: max, freed: make(chan struct{}), shares: map[string]*slotShare{}}
}

// client returns a new caller's share of the slots, capped at max builds
// (<= 0: no own cap), counted with the other open clients of share (""
// for none). close ends it (see closeClient).
func (s *slots) client(max int, share string) *slotClient {
	s.mu.Lock()
	defer s.mu.Unlock()
	// A new share counts as served now: among equals, those that came
	// first go first (counting it as never served would put every
	// newcomer ahead of a share that had one slot, for ever).
	if share == "" {
		return &slotClient{max: max, share: &slotShare{served: s.grants}}
	}
	sh := s.shares[share]
	if sh == nil {
		sh = &slotShare{key: share, served: s.grants}
		s.shares[share] = sh
	}
	sh.clients++
	return &slotClient{max: max, share: sh}
}

// closeClient ends c's part in its share: once no open client has the
// share and it runs nothing, it is forgotten. (c's builds already asked
// for may still take and give back slots, counted in the share.)
func (s *slots) closeClient(c *slotClient) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.share.key == "" {
		return
	}
	c.share.clients--
	s.forgetShareLocked(c.share)
}

func (s *slots) forgetShareLocked(sh *slotShare) {
	if sh.key != "" && sh.clients <= 0 && sh.running == 0 && s.shares[sh.key] == sh {
		delete(s.shares, sh.key)
	}
}

// takeLocked counts a slot taken by c. Under s.mu.
func (s *slots) takeLocked(c *slotClient) {
	s.running++
	c.running++
	c.share.running++
	s.grants++
	c.share.served = s.grants
}

// giveBackLocked counts a slot given back by c. Under s.mu.
func (s *slots) giveBackLocked(c *slotClient) {
	s.running--
	c.running--
	c.share.running--
	s.forgetShareLocked(c.share)
}

// tryAcquire takes a slot for c if one is free now and no one waits for
// one; release is as for acquire.
func (s *slots) tryAcquire(c *slotClient) (release func(), ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running >= s.max || len(s.ring) > 0 || (c.max > 0 && c.running >= c.max) {
		return nil, false
	}
	s.takeLocked(c)
	return s.releaser(c), true
}

// waiting returns how many builds wait for a slot.
func (s *slots) waiting() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.ring {
		n += len(c.waiting)
	}
	return n
}

// freedCh returns a channel that is closed when a slot is next given back.
func (s *slots) freedCh() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.freed
}

func (s *slots) releaser(c *slotClient) func() {
	return func() {
		s.mu.Lock()
		s.giveBackLocked(c)
		close(s.freed)
		s.freed = make(chan struct{})
		s.dispatchLocked()
		s.mu.Unlock()
	}
}

// acquire waits for a slot for c. The returned release must be called
// exactly once, when the builder has exited.
func (s *slots) acquire(ctx context.Context, c *slotClient) (release func(), err error) {
	w := &slotWaiter{ready: make(chan struct{})}
	s.mu.Lock()
	if len(c.waiting) == 0 {
		s.ring = append(s.ring, c)
	}
	c.waiting = append(c.waiting, w)
	s.dispatchLocked()
	s.mu.Unlock()

	release = s.releaser(c)
	select {
	case <-w.ready:
		return release, nil
	case <-ctx.Done():
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-w.ready: // granted meanwhile: give it back
		s.giveBackLocked(c)
	default:
		for i, x := range c.waiting {
			if x == w {
				c.waiting = append(c.waiting[:i], c.waiting[i+1:]...)
				break
			}
		}
		if len(c.waiting) == 0 {
			s.removeLocked(c)
		}
	}
	s.dispatchLocked()
	return nil, ctx.Err()
}

// dispatchLocked grants free slots, each to a waiting client below its own
// cap whose share runs the fewest builds and, among those, was served
// longest ago; the first from s.next in the ring among equals.
func (s *slots) dispatchLocked() {
	for s.running < s.max && len(s.ring) > 0 {
		best := -1
		for k := range len(s.ring) {
			i := (s.next + k) % len(s.ring)
			c := s.ring[i]
			if c.max > 0 && c.running >= c.max {
				continue
			}
			if best < 0 || before(c.share, s.ring[best].share) {
				best = i
			}
		}
		if best < 0 {
			return // every waiting client is at its own cap
		}
		c := s.ring[best]
		w := c.waiting[0]
		c.waiting = c.waiting[1:]
		s.takeLocked(c)
		close(w.ready)
		s.next = best + 1
		if len(c.waiting) == 0 {
			s.removeLocked(c) // keeps s.next pointing at the following client
		}
	}
}

// before reports whether share a comes before b for the next slot.
func before(a, b *slotShare) bool {
	if a.running != b.running {
		return a.running < b.running
	}
	return a.served < b.served
}

func (s *slots) removeLocked(c *slotClient) {
	for i, x := range s.ring {
		if x == c {
			s.ring = append(s.ring[:i], s.ring[i+1:]...)
			if i < s.next {
				s.next--
			}
			return
		}
	}
}
