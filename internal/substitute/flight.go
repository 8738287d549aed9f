package substitute

import (
	"context"
	"sync"
)

// flight is one piece of work shared by every caller that asks for the same
// key while it runs.
type flight[V any] struct {
	done   chan struct{}
	val    V
	err    error
	refs   int // callers still waiting
	cancel context.CancelFunc
	hub    hub
}

// group runs at most one flight per key. The work runs on a context that
// carries the first caller's values but not its cancellation; it is
// cancelled only when every waiting caller has gone. A finished flight is
// forgotten, so a later call starts afresh (results are cached elsewhere).
type group[V any] struct {
	mu sync.Mutex
	m  map[string]*flight[V]
}

// do runs fn once for key among concurrent callers. prog (may be nil)
// receives the flight's events while this caller waits.
func (g *group[V]) do(ctx context.Context, key string, prog Progress, fn func(ctx context.Context, h *hub) (V, error)) (V, error) {
	g.mu.Lock()
	if g.m == nil {
		g.m = map[string]*flight[V]{}
	}
	f, ok := g.m[key]
	var fctx context.Context
	if !ok {
		var cancel context.CancelFunc
		fctx, cancel = context.WithCancel(context.WithoutCancel(ctx))
		f = &flight[V]{done: make(chan struct{}), cancel: cancel}
		g.m[key] = f
	}
	f.refs++
	// Subscribe before fn starts: the first caller must see every event of
	// the flight, even of one that finishes at once.
	unsub := f.hub.subscribe(prog)
	defer unsub()
	g.mu.Unlock()
	if !ok {
		go func() {
			v, err := fn(fctx, &f.hub)
			g.mu.Lock()
			f.val, f.err = v, err
			if g.m[key] == f {
				delete(g.m, key)
			}
			g.mu.Unlock()
			close(f.done)
			f.cancel()
		}()
	}

	select {
	case <-f.done:
		return f.val, f.err
	case <-ctx.Done():
		g.mu.Lock()
		f.refs--
		if f.refs == 0 {
			// Nobody wants the result any more: stop the work, and let a
			// later caller start a fresh flight rather than join a dying one.
			f.cancel()
			if g.m[key] == f {
				delete(g.m, key)
			}
		}
		g.mu.Unlock()
		var zero V
		return zero, ctx.Err()
	}
}
