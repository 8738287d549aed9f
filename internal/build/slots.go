package build

import (
	"context"
	"sync"
)

// slots hands out the host-wide build slots. Callers (slotClients) that
// wait for a slot form a ring; a freed slot goes to the next client in the
// ring that has a waiter and is below its own cap, so free slots are
// shared round-robin between callers whatever their number of builds.
type slots struct {
	mu      sync.Mutex
	max     int
	running int
	ring    []*slotClient // clients with waiters, in round-robin order
	next    int           // ring index served next
	freed   chan struct{} // closed and replaced when a slot is given back
}

// slotClient is one caller's share of the slots.
type slotClient struct {
	max     int // <= 0: no own cap
	running int
	waiting []*slotWaiter
}

type slotWaiter struct {
	ready chan struct{} // closed when the slot is granted
}

func newSlots(max int) *slots { return &slots{max: max, freed: make(chan struct{})} }

func newSlotClient(max int) *slotClient { return &slotClient{max: max} }

// tryAcquire takes a slot for c if one is free now and no one waits for
// one; release is as for acquire.
func (s *slots) tryAcquire(c *slotClient) (release func(), ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running >= s.max || len(s.ring) > 0 || (c.max > 0 && c.running >= c.max) {
		return nil, false
	}
	s.running++
	c.running++
	return s.releaser(c), true
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
		s.running--
		c.running--
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
		s.running--
		c.running--
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

// dispatchLocked grants free slots round-robin.
func (s *slots) dispatchLocked() {
	for s.running < s.max && len(s.ring) > 0 {
		granted := false
		for range len(s.ring) {
			if s.next >= len(s.ring) {
				s.next = 0
			}
			c := s.ring[s.next]
			if c.max > 0 && c.running >= c.max {
				s.next++
				continue
			}
			w := c.waiting[0]
			c.waiting = c.waiting[1:]
			c.running++
			s.running++
			close(w.ready)
			granted = true
			if len(c.waiting) == 0 {
				s.removeLocked(c) // keeps s.next pointing at the following client
			} else {
				s.next++
			}
			break
		}
		if !granted {
			return // every waiting client is at its own cap
		}
	}
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
