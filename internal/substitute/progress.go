package substitute

import (
	"context"
	"sync"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// ActivityType says what an activity is. The values are Nix's ActivityType
// numbers, so the daemon can put them on the wire unchanged.
type ActivityType int

// The activity types a Substituter reports.
const (
	ActCopyPath     ActivityType = 100 // the NAR flowing into the store; Done/Expected are NAR bytes
	ActFileTransfer ActivityType = 101 // one download attempt; Done/Expected are bytes on the wire
	ActSubstitute   ActivityType = 108 // the substitution of one path, parent of the other two
	// ActQueryPathInfo is one lookup of a path's narinfo on an upstream
	// (a cache miss of the daemon's narinfo cache); no Done/Expected.
	ActQueryPathInfo ActivityType = 109
)

// EventKind says what happened: to an activity, or to a path that a call
// substitutes.
type EventKind int

// The event kinds. An activity starts, makes progress any number of times,
// and stops exactly once.
const (
	EventStart EventKind = iota
	EventProgress
	EventStop
	// EventPlanned and EventSettled are about a path, not an activity
	// (Type and ID are zero). A call that substitutes paths sends
	// EventPlanned for each, with the NarSize and FileSize of the narinfo
	// it chose, before it fetches any, and EventSettled for each once it
	// is done with it, fetched or not: the caller can count the whole
	// copy from its start, as Nix's Worker counts a substitution as soon
	// as it knows of it.
	EventPlanned
	EventSettled
)

// Event is one change of an activity, or one step of a call's plan
// (EventPlanned, EventSettled). IDs are unique within a Substituter;
// Parent is 0 for a top-level (ActSubstitute) activity.
type Event struct {
	Kind     EventKind
	Type     ActivityType
	ID       uint64
	Parent   uint64
	Path     storepath.Path
	Upstream string // base URL of the upstream, for ActSubstitute/ActFileTransfer
	URL      string // full URL, for ActFileTransfer
	Done     uint64
	Expected uint64 // 0 if unknown
	Err      error  // on EventStop: nil on success
	// NarSize and FileSize, on an ActSubstitute's events and on
	// EventPlanned, are the path's NAR size and the size of the file
	// downloaded for it (the compressed NAR), for the caller's totals.
	NarSize, FileSize uint64
}

// Progress receives activity events. Implementations must be safe for
// concurrent use, must not block (events are delivered under a lock that
// keeps them in order) and must not call back into the Substituter.
//
// A caller that joins a download already under way first gets an
// EventStart (with the current Done) for each of its open activities,
// then the live events. EventPlanned and EventSettled go to the Progress
// of the call they are about only, never to those that join its
// downloads.
type Progress interface {
	Event(Event)
}

// ProgressFunc adapts a function to Progress.
type ProgressFunc func(Event)

// Event calls f(e).
func (f ProgressFunc) Event(e Event) { f(e) }

// hub fans the events of one flight out to every caller waiting on it and
// remembers the open activities so late joiners can be caught up.
type hub struct {
	mu   sync.Mutex
	subs map[int]Progress
	next int
	open map[uint64]Event // last event of each open activity, in start order below
	ord  []uint64
}

func (h *hub) emit(e Event) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.open == nil {
		h.open = map[uint64]Event{}
	}
	switch e.Kind {
	case EventStart:
		h.open[e.ID] = e
		h.ord = append(h.ord, e.ID)
	case EventProgress:
		if s, ok := h.open[e.ID]; ok {
			s.Done, s.Expected = e.Done, e.Expected
			h.open[e.ID] = s
		}
	case EventStop:
		delete(h.open, e.ID)
		for i, id := range h.ord {
			if id == e.ID {
				h.ord = append(h.ord[:i], h.ord[i+1:]...)
				break
			}
		}
	}
	for _, p := range h.subs {
		p.Event(e)
	}
}

// subscribe adds p and replays the open activities to it; the returned
// function removes it. A nil p subscribes nothing.
func (h *hub) subscribe(p Progress) func() {
	if p == nil {
		return func() {}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.subs == nil {
		h.subs = map[int]Progress{}
	}
	for _, id := range h.ord {
		e := h.open[id]
		e.Kind = EventStart
		p.Event(e)
	}
	id := h.next
	h.next++
	h.subs[id] = p
	return func() {
		h.mu.Lock()
		delete(h.subs, id)
		h.mu.Unlock()
	}
}

type progressKey struct{}

// WithProgress returns ctx carrying p, which receives the QueryPathInfo
// activities of the narinfo lookups made on ctx's behalf (QueryPathInfo,
// QueryMissing, Realise), as Nix reports its lookups to the client whose
// request made them. A caller that joins a lookup another started sees no
// activity for it (as with a narinfo Nix finds in its cache). Realise and
// the other calls that take a Progress use theirs for lookups as well.
func WithProgress(ctx context.Context, p Progress) context.Context {
	if p == nil {
		return ctx
	}
	return context.WithValue(ctx, progressKey{}, p)
}

// ProgressFrom returns the Progress of WithProgress, or nil.
func ProgressFrom(ctx context.Context) Progress {
	p, _ := ctx.Value(progressKey{}).(Progress)
	return p
}

// callerProgress passes events to p (if not nil) until close.
type callerProgress struct {
	mu  sync.Mutex
	p   Progress
	off bool
}

// Event implements Progress.
func (g *callerProgress) Event(e Event) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.off && g.p != nil {
		g.p.Event(e)
	}
}

func (g *callerProgress) close() {
	g.mu.Lock()
	g.off = true
	g.mu.Unlock()
}
