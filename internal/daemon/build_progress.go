package daemon

import (
	"fmt"
	"sync"

	"github.com/nixyard/nixyard/internal/build"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// buildProgress turns the events of internal/build (build.Progress) into
// the logger messages a Nix 2.8 daemon sends while its Worker builds, as
// captured from a real 2.8 `nix-build` through nix-daemon:
//
//	START Realise(102), Builds(104), CopyPaths(103): level 0, empty text
//	on every change of the counters: RESULT Progress(105) on Builds and on
//	  CopyPaths, then SetExpected(106) [FileTransfer(101), 0] and
//	  [CopyPath(100), 0] on Realise
//	START Build(105), level Info, "building '<drv>'", [drv, "", 1, 1]
//	RESULT BuildLogLine(101) per line, SetPhase(104) per phase
//	STOP of the Build activity once the counters count the build done
//	  or failed
//	STOP CopyPaths, Builds, Realise (close)
//
// It is safe for concurrent use, as build.Progress requires, and never
// blocks: builds shared by several clients call it with their locks held,
// so a client that stops reading its socket must not hold up anyone's
// build. Events are queued and written by a goroutine of their own; a
// client that falls more than maxQueuedLines lines of output behind loses
// the lines beyond (counted, and said at the end), never the activities.
type buildProgress struct {
	tun *tunnel
	top map[string]bool // the derivations the client asked for

	// The writer's: only run and the functions it calls touch these.
	realise, builds, copyPaths uint64
	acts                       map[string]uint64 // running builds: drv -> activity
	hooks                      map[string]uint64 // running post-build hooks: drv -> activity
	remote                     map[remoteAct]uint64
	sent                       workerCounts // the counters last sent

	mu       sync.Mutex
	cond     *sync.Cond
	q        []progressEvent
	lines    int                            // droppable events in q
	dropped  int                            // droppable events not queued
	counts   workerCounts                   // the Worker's counters
	substs   map[storepath.Path]*substEntry // the paths in counts.substs
	failures int                            // exitStatus's bits
	pending  bool                           // a sendCounts is queued
	closed   bool
	exit     chan struct{}
}

// progressEvent is one queued write; droppable ones (lines of output) may
// be left out for a client that does not keep up.
type progressEvent struct {
	write     func()
	droppable bool
}

// maxQueuedLines bounds the lines of output waiting for one client.
const maxQueuedLines = 10000

// newBuildProgress starts the Worker's three activities and the writer.
func newBuildProgress(tun *tunnel, top map[string]bool) *buildProgress {
	p := &buildProgress{tun: tun, top: top, acts: map[string]uint64{}, hooks: map[string]uint64{}, remote: map[remoteAct]uint64{}, exit: make(chan struct{})}
	p.cond = sync.NewCond(&p.mu)
	p.realise = tun.StartActivity(lvlError, actRealise, "", nil, 0)
	p.builds = tun.StartActivity(lvlError, actBuilds, "", nil, 0)
	p.copyPaths = tun.StartActivity(lvlError, actCopyPaths, "", nil, 0)
	go p.run()
	return p
}

// post queues write, unless the progress is closed or, for a droppable
// event, the client is too far behind.
func (p *buildProgress) post(droppable bool, write func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	if droppable {
		if p.lines >= maxQueuedLines {
			p.dropped++
			return
		}
		p.lines++
	}
	p.q = append(p.q, progressEvent{write: write, droppable: droppable})
	p.cond.Signal()
}

// run writes the queued events, each burst in one flush, until close.
func (p *buildProgress) run() {
	defer close(p.exit)
	for {
		p.mu.Lock()
		for len(p.q) == 0 && !p.closed {
			p.cond.Wait()
		}
		batch, closed := p.q, p.closed
		p.q, p.lines = nil, 0
		p.mu.Unlock()
		end := p.tun.batch()
		for _, e := range batch {
			e.write()
		}
		end()
		if closed && len(batch) == 0 {
			return
		}
	}
}

// workerCounts are what Nix's Worker counts for its progress: builds and
// substitutions (done, expected, running, failed) and the bytes to
// download and to unpack.
type workerCounts struct {
	builds, substs     [4]int
	download, narBytes uint64
}

// update changes the counters with f; only the latest are sent, as often
// as the client takes them.
func (p *buildProgress) update(f func(c *workerCounts)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	f(&p.counts)
	if !p.pending {
		p.pending = true
		p.q = append(p.q, progressEvent{write: p.sendCounts})
		p.cond.Signal()
	}
}

// BuildsProgress implements build.Progress.
func (p *buildProgress) BuildsProgress(done, expected, running, failed int) {
	p.update(func(c *workerCounts) { c.builds = [4]int{done, expected, running, failed} })
}

// substEntry is what the counters hold of one path to substitute.
type substEntry struct {
	plans   int  // substitution calls that will fetch it and are not done with it
	running int  // attempts at fetching it that started and did not end
	done    bool // fetched
	// counted: in the expected counts, with these sizes.
	counted       bool
	nar, download uint64
}

// subst returns path's entry, made if new. Under p.mu.
func (p *buildProgress) subst(path storepath.Path) *substEntry {
	if p.substs == nil {
		p.substs = map[storepath.Path]*substEntry{}
	}
	s := p.substs[path]
	if s == nil {
		s = &substEntry{}
		p.substs[path] = s
	}
	return s
}

// expect counts s as expected, with these sizes, unless it is. Under p.mu.
func (s *substEntry) expect(c *workerCounts, narSize, fileSize uint64) {
	if s.counted {
		return
	}
	s.counted, s.nar, s.download = true, narSize, fileSize
	c.substs[1]++
	c.download += fileSize
	c.narBytes += narSize
}

// unexpect takes s out of the expected counts unless it was fetched or a
// call still plans to fetch it. Under p.mu.
func (s *substEntry) unexpect(c *workerCounts) {
	if !s.counted || s.done || s.plans > 0 {
		return
	}
	s.counted = false
	c.substs[1]--
	c.download -= s.download
	c.narBytes -= s.nar
}

// substPlanned counts path as expected before its substitution starts
// (substitute.EventPlanned): the whole copy is counted from the start.
func (p *buildProgress) substPlanned(path storepath.Path, narSize, fileSize uint64) {
	p.update(func(c *workerCounts) {
		s := p.subst(path)
		s.plans++
		s.expect(c, narSize, fileSize)
	})
}

// substSettled ends a call's plan to fetch path (substitute.EventSettled).
// Once no call plans it, an attempt still counted running is not (a call
// cancelled while it waited for a download hears no end of it), and
// unless fetched the path is no longer expected.
func (p *buildProgress) substSettled(path storepath.Path) {
	p.update(func(c *workerCounts) {
		s := p.subst(path)
		if s.plans > 0 {
			s.plans--
		}
		if s.plans == 0 {
			c.substs[2] -= s.running
			s.running = 0
		}
		s.unexpect(c)
	})
}

// substStarted counts an attempt at substituting path, of narSize bytes (a
// download of fileSize), as it starts: running, and expected unless it
// was planned.
func (p *buildProgress) substStarted(path storepath.Path, narSize, fileSize uint64) {
	p.update(func(c *workerCounts) {
		s := p.subst(path)
		s.expect(c, narSize, fileSize)
		s.running++
		c.substs[2]++
	})
}

// substEnded counts an attempt as it ends: done if ok; if not, no longer
// expected unless a call plans to fetch it still (it may try another
// cache; substsFailed counts the paths that none had).
func (p *buildProgress) substEnded(path storepath.Path, ok bool) {
	p.update(func(c *workerCounts) {
		s := p.subst(path)
		if s.running > 0 {
			s.running--
			c.substs[2]--
		}
		if ok {
			if !s.done {
				s.done = true
				c.substs[0]++
			}
			return
		}
		s.unexpect(c)
	})
}

// substsFailed counts n paths that could not be substituted.
func (p *buildProgress) substsFailed(n int) {
	if n > 0 {
		p.update(func(c *workerCounts) { c.substs[3] += n })
	}
}

// sendCounts sends the counters, as Nix's Worker::updateProgress: builds
// and substitutions on their activities, and the expected download and
// unpacked sizes on the Realise activity.
func (p *buildProgress) sendCounts() {
	p.mu.Lock()
	c := p.counts
	p.pending = false
	p.mu.Unlock()
	if c == p.sent {
		return
	}
	p.sent = c
	p.tun.Result(p.builds, resProgress, []field{c.builds[0], c.builds[1], c.builds[2], c.builds[3]})
	p.tun.Result(p.copyPaths, resProgress, []field{c.substs[0], c.substs[1], c.substs[2], c.substs[3]})
	p.tun.Result(p.realise, resSetExpected, []field{actFileTransfer, c.download})
	p.tun.Result(p.realise, resSetExpected, []field{actCopyPath, c.narBytes})
}

// BuildStarted implements build.Progress.
func (p *buildProgress) BuildStarted(drv, machine string, mode build.BuildMode, round build.Round) {
	p.post(false, func() {
		if id, ok := p.acts[drv]; ok { // another round (--check, repeat): a new activity
			p.tun.StopActivity(id)
		}
		text := fmt.Sprintf("building '%s'", drv)
		switch {
		case mode == build.ModeCheck:
			text = fmt.Sprintf("checking outputs of '%s'", drv)
		case mode == build.ModeRepair:
			text = fmt.Sprintf("repairing outputs of '%s'", drv)
		case round.Of > 1:
			text = fmt.Sprintf("building '%s' (round %d/%d)", drv, round.N, round.Of)
		}
		if machine != "" {
			text += fmt.Sprintf(" on '%s'", machine)
		}
		n, of := max(round.N, 1), max(round.Of, 1)
		p.acts[drv] = p.tun.StartActivity(lvlInfo, actBuild, text, []field{drv, machine, n, of}, 0)
	})
}

// BuildLogLine implements build.Progress. A line outside a running build
// (such as "note: keeping build directory …") becomes a log message.
func (p *buildProgress) BuildLogLine(drv, line string) {
	p.post(true, func() {
		if id, ok := p.acts[drv]; ok {
			p.tun.Result(id, resBuildLogLine, []field{line})
			return
		}
		p.tun.Log(lvlError, line)
	})
}

// BuildPhase implements build.Progress.
func (p *buildProgress) BuildPhase(drv, phase string) {
	p.post(true, func() {
		if id, ok := p.acts[drv]; ok {
			p.tun.Result(id, resSetPhase, []field{phase})
		}
	})
}

// BuildFinished implements build.Progress.
func (p *buildProgress) BuildFinished(drv string, err error) {
	p.post(false, func() {
		if id, ok := p.acts[drv]; ok {
			delete(p.acts, drv)
			p.tun.StopActivity(id)
		}
		for k, id := range p.remote { // a build hook that died with activities open
			if k.drv == drv {
				delete(p.remote, k)
				p.tun.StopActivity(id)
			}
		}
	})
}

// remoteAct names an activity of the build hook of drv.
type remoteAct struct {
	drv string
	id  uint64
}

// RemoteActivity implements build.Progress: the build hook's activities
// become the client's, under its Realise activity, as nix-daemon forwards
// them. A remote build's log lines may be dropped as the local builder's
// are.
func (p *buildProgress) RemoteActivity(drv string, ev build.RemoteEvent) {
	p.post(ev.Action == "result" && ev.Type == resBuildLogLine, func() {
		k := remoteAct{drv, ev.ID}
		fields := make([]field, len(ev.Fields))
		for i, f := range ev.Fields {
			fields[i] = f
		}
		switch ev.Action {
		case "start":
			if _, ok := p.remote[k]; !ok {
				p.remote[k] = p.tun.StartActivity(Verbosity(ev.Level), uint64(ev.Type), ev.Text, fields, p.realise)
			}
		case "stop":
			if id, ok := p.remote[k]; ok {
				delete(p.remote, k)
				p.tun.StopActivity(id)
			}
		case "result":
			if id, ok := p.remote[k]; ok {
				p.tun.Result(id, uint64(ev.Type), fields)
			}
		}
	})
}

// PostBuildHookStarted implements build.Progress.
func (p *buildProgress) PostBuildHookStarted(drv, hook string) {
	p.post(false, func() {
		p.hooks[drv] = p.tun.StartActivity(lvlInfo, actPostBuildHook, fmt.Sprintf("running post-build-hook '%s'", hook), []field{drv}, 0)
	})
}

// PostBuildHookLine implements build.Progress.
func (p *buildProgress) PostBuildHookLine(drv, line string) {
	p.post(true, func() {
		if id, ok := p.hooks[drv]; ok {
			p.tun.Result(id, resPostBuildLogLine, []field{line})
		}
	})
}

// PostBuildHookFinished implements build.Progress.
func (p *buildProgress) PostBuildHookFinished(drv string) {
	p.post(false, func() {
		if id, ok := p.hooks[drv]; ok {
			delete(p.hooks, drv)
			p.tun.StopActivity(id)
		}
	})
}

// Error implements build.Progress: msg goes to the client at error level.
func (p *buildProgress) Error(msg string) {
	p.post(false, func() { p.tun.Log(lvlError, msg) })
}

// Info implements build.Progress.
func (p *buildProgress) Info(msg string) {
	p.post(false, func() { p.tun.Log(lvlInfo, msg) })
}

// Chatty implements build.Progress.
func (p *buildProgress) Chatty(msg string) {
	p.post(false, func() { p.tun.Log(lvlChatty, msg) })
}

// addTop counts drv among the derivations the client asked for.
func (p *buildProgress) addTop(drv string) {
	p.post(false, func() { p.top[drv] = true })
}

// GoalFailed implements build.Progress: the failure of a derivation the
// client did not ask for is logged at once, as Nix logs the error of a
// goal that others wait for (Goal::amDone); that of one it asked for is
// the request's own error.
func (p *buildProgress) GoalFailed(drv string, r build.Result) {
	p.mu.Lock()
	switch {
	case r.HashMismatch:
		p.failures |= exitBuildFailure | exitHashMismatch
	case r.Status == build.PermanentFailure:
		p.failures |= exitBuildFailure
	case r.Status == build.TimedOut:
		p.failures |= exitBuildFailure | exitTimedOut
	case r.Status == build.NotDeterministic:
		p.failures |= exitCheckMismatch
	}
	p.mu.Unlock()
	p.post(false, func() {
		if !p.top[drv] {
			p.tun.Error(r.ErrorMsg)
		}
	})
}

// The bits of Nix's Worker::exitStatus, which clients before protocol
// 1.26 (Nix 2.3) exit with: 100 a build failed, 101 one timed out, 102 a
// fixed-output hash did not match, 104 a --check found a difference.
const (
	exitTimedOut      = 0x01
	exitHashMismatch  = 0x02
	exitBuildFailure  = 0x04
	exitCheckMismatch = 0x08
)

// exitStatus is the exit status Nix's Worker would give the failures so
// far: 1 for none of those above.
func (p *buildProgress) exitStatus() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failures == 0 {
		return 1
	}
	return uint64(p.failures | 0x60)
}

// close writes what is queued, stops the activities still open, then the
// Worker's three, in the order Nix destroys them, and waits for the
// writer to finish. Later events are dropped.
func (p *buildProgress) close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		<-p.exit
		return
	}
	p.q = append(p.q, progressEvent{write: func() {
		p.mu.Lock()
		dropped := p.dropped
		p.mu.Unlock()
		if dropped > 0 {
			p.tun.Warn(fmt.Sprintf("%d lines of build output were not sent: the client did not read them in time", dropped))
		}
		for _, m := range []map[string]uint64{p.hooks, p.acts} {
			for drv, id := range m {
				p.tun.StopActivity(id)
				delete(m, drv)
			}
		}
		p.tun.StopActivity(p.copyPaths)
		p.tun.StopActivity(p.builds)
		p.tun.StopActivity(p.realise)
	}})
	p.closed = true
	p.cond.Signal()
	p.mu.Unlock()
	<-p.exit
}
