package daemon

import (
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/realise"
	"github.com/nixyard/nixyard/internal/substitute"
)

// realiser returns the connection's view of the host's substitution and
// build state: the daemon's caches, or those the client chose with
// SetOptions (already filtered for trust by filterOverrides).
func (c *conn) realiser() (*realise.Realiser, error) {
	m := c.srv.opts.Realise
	if m == nil {
		m = realise.NoCaches(c.st)
	}
	ov := c.settings.Overrides
	var sel realise.Selection
	if v, ok := ov["substituters"]; ok {
		sel.Substituters = strings.Fields(v)
		if sel.Substituters == nil {
			sel.Substituters = []string{} // --option substituters '': caches off
		}
	} else if v, ok := ov["binary-caches"]; ok {
		sel.Substituters = append([]string{}, strings.Fields(v)...)
	}
	sel.ExtraSubstituters = strings.Fields(ov["extra-substituters"])
	for _, k := range []string{"trusted-public-keys", "binary-cache-public-keys"} {
		if v, ok := ov[k]; ok {
			sel.TrustedPublicKeys = append([]string{}, strings.Fields(v)...)
		}
	}
	sel.ExtraTrustedPublicKeys = strings.Fields(ov["extra-trusted-public-keys"])
	sel.NoSubstitutes = !c.settings.UseSubstitutes
	sel.Fallback = c.settings.TryFallback
	r, err := m.For(sel, c.session)
	if err != nil {
		return nil, fmt.Errorf("substituters: %w", err)
	}
	return r, nil
}

// substProgress is what a request's realiser reports to (build requests
// pair it with a buildProgress for the builds). It turns a Substituter's
// activity events into logger messages of one connection, with Nix's
// activity types, texts and fields (Nix's PathSubstitutionGoal,
// copyStorePath and curl file transfer), and sends the realiser's
// warnings and messages in order with them. Events are queued and
// written by a goroutine, so a slow client never holds up a download
// other connections share; progress results are dropped while the queue
// is long, starts and stops never.
type substProgress struct {
	c       *conn
	mu      sync.Mutex
	cond    *sync.Cond
	q       []substitute.Event
	done    bool
	ids     map[uint64]uint64 // substituter activity id -> wire activity id
	closing chan struct{}     // closed by close: write what is queued at once
	exit    chan struct{}
	warn    func(error) // the request's warnings (conn.warnFunc)
	// counts, if set, counts the substitutions for the Worker's progress
	// (a build request's); substFailed are the paths whose last attempt
	// failed, counted as failed at the end, as Nix counts a path that no
	// cache could give.
	counts      *buildProgress
	substFailed map[storepath.Path]bool

	// Flush's bookkeeping: events queued and written so far; urgent, a
	// buffered channel, cuts the writer's wait short.
	queued, written uint64
	flushed         *sync.Cond
	urgent          chan struct{}
}

// progressInterval is the least time between two writes of progress
// events to a client: events that come in meanwhile go out together. Every
// write wakes the client process: a `nix-store -r` client of a 400-path
// closure used ~0.10 s of CPU with a write per event and ~0.07 s with this
// (8 such clients at once: 0.13–0.14 s → 0.10–0.13 s each). Nothing is held
// back when the request ends.
const progressInterval = 20 * time.Millisecond

// maxQueuedProgress is how many events may wait before progress results
// are dropped.
const maxQueuedProgress = 4096

// newSubstProgress starts the writer; call close before stopWork. counts
// (nil for none) gets the substitutions' counts, for a build request.
func (c *conn) newSubstProgress(counts *buildProgress) *substProgress {
	p := &substProgress{c: c, ids: map[uint64]uint64{}, closing: make(chan struct{}), exit: make(chan struct{}),
		warn: c.warnFunc(), urgent: make(chan struct{}, 1), substFailed: map[storepath.Path]bool{}, counts: counts}
	p.cond = sync.NewCond(&p.mu)
	p.flushed = sync.NewCond(&p.mu)
	go p.run()
	return p
}

// Event implements substitute.Progress.
func (p *substProgress) Event(e substitute.Event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done || e.Kind == substitute.EventProgress && len(p.q) >= maxQueuedProgress {
		return
	}
	p.q = append(p.q, e)
	p.queued++
	p.cond.Signal()
}

// Flush implements realise.Flusher: it returns once every event queued
// before the call is written to the client, or after flushWait: goals
// that other clients wait for substitute in this client's name, and a
// client that does not read (a suspended nix-build) must not hold them.
func (p *substProgress) Flush() {
	p.mu.Lock()
	defer p.mu.Unlock()
	target := p.queued
	if p.written >= target {
		return
	}
	select {
	case p.urgent <- struct{}{}:
	default:
	}
	late := false
	t := time.AfterFunc(flushWait, func() {
		p.mu.Lock()
		late = true
		p.flushed.Broadcast()
		p.mu.Unlock()
	})
	defer t.Stop()
	for p.written < target && !p.done && !late {
		p.flushed.Wait()
	}
}

// flushWait bounds Flush's wait for a client to read.
const flushWait = time.Second

// Warn implements realise.Warner: the client gets each distinct failure
// once per connection, as a warning (see warnFunc).
//
// After close (the request has ended) it does nothing: a log line after
// the request's last would corrupt the stream.
func (p *substProgress) Warn(err error) {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if !done {
		p.warn(err)
	}
}

// Info implements realise.Messenger: msg goes to the client at info
// level after the events so far. After close it does nothing.
func (p *substProgress) Info(msg string) { p.message(lvlInfo, msg) }

// Error implements realise.Messenger, at error level.
func (p *substProgress) Error(msg string) { p.message(lvlError, msg) }

func (p *substProgress) message(lvl Verbosity, msg string) {
	p.Flush()
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if !done {
		p.c.tun.Log(lvl, msg)
	}
}

func (p *substProgress) run() {
	defer close(p.exit)
	var last time.Time
	for {
		p.mu.Lock()
		for len(p.q) == 0 && !p.done {
			p.cond.Wait()
		}
		p.mu.Unlock()
		if wait := progressInterval - time.Since(last); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-p.closing:
			case <-p.urgent:
			}
			t.Stop()
		}
		p.mu.Lock()
		q := p.q
		p.q = nil
		done := p.done
		p.mu.Unlock()
		last = time.Now()
		end := p.c.tun.batch()
		for _, e := range q {
			p.write(e)
		}
		end()
		p.mu.Lock()
		p.written += uint64(len(q))
		p.flushed.Broadcast()
		p.mu.Unlock()
		if done && len(q) == 0 {
			return
		}
	}
}

// close writes what is queued, stops the activities still open (the
// request ended without waiting for them) and returns when done.
func (p *substProgress) close() {
	p.mu.Lock()
	p.done = true
	p.cond.Signal()
	p.flushed.Broadcast()
	p.mu.Unlock()
	close(p.closing)
	<-p.exit
	for _, id := range p.ids {
		p.c.tun.StopActivity(id)
	}
	p.ids = nil
	if p.counts != nil {
		p.counts.substsFailed(len(p.substFailed))
	}
}

// write sends one event. Only the run goroutine calls it.
func (p *substProgress) write(e substitute.Event) {
	tun := p.c.tun
	abs := p.c.dir.Abs(e.Path)
	switch e.Kind {
	case substitute.EventPlanned:
		if p.counts != nil {
			p.counts.substPlanned(e.Path, e.NarSize, e.FileSize)
		}
	case substitute.EventSettled:
		if p.counts != nil {
			p.counts.substSettled(e.Path)
		}
	case substitute.EventStart:
		if _, ok := p.ids[e.ID]; ok {
			return
		}
		parent := p.ids[e.Parent]
		var id uint64
		switch e.Type {
		case substitute.ActSubstitute:
			id = tun.StartActivity(lvlError, actSubstitute, "", []field{abs, e.Upstream}, parent)
			if p.counts != nil {
				p.counts.substStarted(e.Path, e.NarSize, e.FileSize)
				delete(p.substFailed, e.Path)
			}
		case substitute.ActCopyPath:
			id = tun.StartActivity(lvlInfo, actCopyPath, fmt.Sprintf("copying path '%s' from '%s'", abs, e.Upstream), []field{abs, e.Upstream, "local"}, parent)
		case substitute.ActFileTransfer:
			id = tun.StartActivity(lvlTalkative, actFileTransfer, fmt.Sprintf("downloading '%s'", e.URL), []field{e.URL}, parent)
		case substitute.ActQueryPathInfo:
			id = tun.StartActivity(lvlTalkative, actQueryPathInfo, fmt.Sprintf("querying info about '%s' on '%s'", abs, e.Upstream), []field{abs, e.Upstream}, parent)
		default:
			return
		}
		p.ids[e.ID] = id
		if e.Done > 0 || e.Expected > 0 {
			tun.Result(id, resProgress, []field{e.Done, e.Expected, uint64(0), uint64(0)})
		}
	case substitute.EventProgress:
		if id, ok := p.ids[e.ID]; ok {
			tun.Result(id, resProgress, []field{e.Done, e.Expected, uint64(0), uint64(0)})
		}
	case substitute.EventStop:
		id, ok := p.ids[e.ID]
		if !ok {
			return
		}
		delete(p.ids, e.ID)
		switch {
		case e.Type == substitute.ActSubstitute && e.Err != nil:
			tun.Error(clientText(fmt.Sprintf("substituting '%s' from '%s': %v", abs, e.Upstream, e.Err)))
		case e.Type == substitute.ActSubstitute:
			tun.Log(lvlChatty, fmt.Sprintf("substitution of path '%s' succeeded", abs))
		}
		if e.Type == substitute.ActSubstitute && p.counts != nil {
			p.counts.substEnded(e.Path, e.Err == nil)
			if e.Err != nil {
				p.substFailed[e.Path] = true
			}
		}
		tun.StopActivity(id)
	}
}
