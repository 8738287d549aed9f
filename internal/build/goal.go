package build

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// call is one Build invocation, i.e. one caller: its options, its share
// of the slots, its progress sink and its build counters.
type call struct {
	b      *Builder
	id     uint64 // for the hooks it uses (see hookKey)
	opts   ClientOptions
	client *slotClient

	mu     sync.Mutex
	prog   Progress // nil once closed
	counts counts   // its build counters (see count)

	noLocalBuilds atomic.Bool // a build it needed could not run here (ErrNoLocalBuilds)
	// stopping is set, without keep-going, once a build the caller needs
	// has failed: its builds that have not started yet will not (the
	// failure stops them once it has reached the request).
	stopping atomic.Bool
	noHook   atomic.Bool // the build hook declined for good, or cannot start (as Nix's worker.tryBuildHook)
}

// mayBuild reports whether c may run builds here (max-jobs is not 0).
func (c *call) mayBuild() bool { return !c.b.cfg.NoLocalBuilds && !c.opts.NoLocalBuilds }

func (b *Builder) newCall(opts ClientOptions, prog Progress) *call {
	return &call{b: b, id: b.calls.Add(1), opts: opts, client: b.slots.client(opts.MaxJobs, opts.SlotShare), prog: prog}
}

// close stops events to the caller; goals the caller started may go on
// for other callers and must not write to a finished request.
func (c *call) close() {
	c.mu.Lock()
	c.prog = nil
	c.mu.Unlock()
	c.b.dropHooks(c)
	c.b.slots.closeClient(c.client)
}

func (c *call) emit(f func(p Progress)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.prog != nil {
		f(c.prog)
	}
}

// counts are a caller's build counters, or changes to them: builds
// expected (not ended yet), running, done (built here) and failed.
type counts struct{ expected, running, done, failed int }

// count adds d to the caller's build counters and reports them as Nix's
// Worker does: builds done, of those done and still expected, running,
// failed.
func (c *call) count(d counts) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := &c.counts
	n.expected += d.expected
	n.running += d.running
	n.done += d.done
	n.failed += d.failed
	if c.prog != nil {
		c.prog.BuildsProgress(n.done, n.expected+n.done, n.running, n.failed)
	}
}

func (b *Builder) abs(p storepath.Path) string { return b.st.Dir().Abs(p) }

func (b *Builder) fail(req store.DerivedPath, st Status, format string, args ...any) Result {
	return Result{Path: req, Status: st, ErrorMsg: fmt.Sprintf(format, args...)}
}

// stoppedByFailure is the result of a goal that does not build because
// every caller waiting for it is being stopped by another build's failure.
func stoppedByFailure() Result {
	return Result{Status: MiscFailure, ErrorMsg: errStopped.Error(), Stopped: true}
}

// stoppedResult is the result of a request whose ctx ended before it did.
func stoppedResult(ctx context.Context) Result {
	cause := context.Cause(ctx)
	return Result{Status: MiscFailure, ErrorMsg: cause.Error(), Stopped: errors.Is(cause, errStopped)}
}

// realise makes one request valid for c.
func (c *call) realise(ctx context.Context, req store.DerivedPath, depth int) Result {
	b := c.b
	if ctx.Err() != nil {
		r := stoppedResult(ctx)
		r.Path = req
		return r
	}
	if !req.Built {
		return c.realiseOpaque(ctx, req)
	}
	if ok, err := b.st.IsValidPath(ctx, req.Path); err != nil {
		return b.fail(req, MiscFailure, "%v", err)
	} else if !ok {
		if r := c.realiseOpaque(ctx, store.DerivedPath{Path: req.Path}); !r.Status.Success() {
			r.Path = req
			return r
		}
	}
	drv, err := derivation.ParseFile(b.st.RealPath(req.Path))
	if err != nil {
		return b.fail(req, MiscFailure, "%v", err)
	}
	// As Nix's goals, which root their outputs as they start, before
	// looking at them: an output found valid, or built, for this caller
	// stays while the rest of its request runs (a collection meanwhile,
	// an automatic one before the next build, say, would take it).
	if s := c.opts.Session; s != nil {
		for _, o := range drv.Outputs {
			if p, err := b.st.Dir().Parse(o.Path); o.Path != "" && err == nil {
				// A caller whose client is gone (its session closed) may
				// still be how a goal others wait for realises its inputs:
				// it needs no roots.
				if err := s.AddTempRoot(ctx, p); err != nil && !errors.Is(err, store.ErrSessionClosed) {
					if ctx.Err() != nil {
						r := stoppedResult(ctx)
						r.Path = req
						return r
					}
					return b.fail(req, MiscFailure, "%v", err)
				}
			}
		}
	}
	wanted := req.Outputs
	if req.AllOutputs || len(wanted) == 0 {
		wanted = slices.Sorted(maps.Keys(drv.Outputs))
	}
	var unknown []string
	for _, n := range wanted {
		if _, ok := drv.Outputs[n]; !ok {
			unknown = append(unknown, n)
		}
	}
	if len(unknown) > 0 {
		return b.fail(req, MiscFailure, "derivation '%s' does not have wanted outputs '%s'", b.abs(req.Path), strings.Join(unknown, "', '"))
	}
	// --check applies to the requested derivations, not to their inputs,
	// as in Nix. So does --repair, unlike Nix, which repairs the inputs'
	// outputs too: the realiser has checked and repaired what it was
	// asked to, and inputs are realised as usual.
	mode := ModeNormal
	if depth == 0 {
		mode = c.opts.Mode
	}
	if mode == ModeNormal {
		if outs, ok, err := b.validOutputs(ctx, drv, wanted); err != nil {
			return b.fail(req, MiscFailure, "%v", err)
		} else if ok {
			return Result{Path: req, Status: AlreadyValid, BuiltOutputs: outs}
		}
		// As Nix's goal for some outputs of a derivation: those outputs
		// come from a cache if it has them, even when it lacks the others
		// (which the build, shared by all who need the derivation, would
		// make too). The requested derivations' outputs were looked for
		// by the realiser already: not a second download of one that
		// failed before a fallback.
		if depth > 0 {
			if r, ok := c.substituteWanted(ctx, req.Path, drv, wanted); ok {
				r.Path = req
				return r
			}
		}
	}
	g := b.joinGoal(req, drv, c, mode)
	res := g.waitFor(ctx, c)
	for tries := 0; tries < 3 && ctx.Err() == nil && c.rejoins(res); tries++ {
		g = b.joinGoal(req, drv, c, mode)
		res = g.waitFor(ctx, c)
	}
	if res.noLocalBuilds {
		c.noLocalBuilds.Store(true)
	}
	res.Path = req
	if res.Status.Success() {
		res.BuiltOutputs = map[string]storepath.Path{}
		for _, n := range wanted {
			res.BuiltOutputs[n] = g.outputs[n]
		}
	} else {
		res.BuiltOutputs = nil
	}
	return res
}

// rejoins reports whether c joins a goal of the same derivation again
// after the goal's result res: its callers when it had to build could not,
// and c can; or it stopped for its callers' failures as c, which none
// stops, joined it.
func (c *call) rejoins(res Result) bool {
	return res.noLocalBuilds && c.mayBuild() || res.Stopped && !c.stopping.Load()
}

// validOutputs returns the paths of the wanted outputs and whether they
// are all valid.
func (b *Builder) validOutputs(ctx context.Context, drv *derivation.Derivation, wanted []string) (map[string]storepath.Path, bool, error) {
	outs := map[string]storepath.Path{}
	for _, n := range wanted {
		o := drv.Outputs[n]
		if o.Path == "" {
			return nil, false, nil
		}
		p, err := b.st.Dir().Parse(o.Path)
		if err != nil {
			return nil, false, fmt.Errorf("output %s: %w", n, err)
		}
		ok, err := b.st.IsValidPath(ctx, p)
		if err != nil || !ok {
			return nil, false, err
		}
		outs[n] = p
	}
	return outs, true, nil
}

// goal is the single flight of one derivation's build, shared by every
// caller that needs it while it runs.
type goal struct {
	b       *Builder
	drvPath storepath.Path
	drv     *derivation.Derivation
	name    string // Nix's goal name, for timeout messages
	owner   *call  // whose options and slot share the build uses
	basic   bool   // drv came from a client (BuildBasic), not from drvPath
	// mode: ModeCheck builds again and compares with the valid outputs
	// (--check); ModeRepair builds again and replaces those missing or
	// damaged (--repair).
	mode   BuildMode
	after  *goal // a goal of the same derivation being stopped, to wait for
	attrs  *derivation.Attrs
	done   chan struct{}
	cancel context.CancelFunc
	// roots holds temporary roots on the inputs while the goal runs,
	// whichever callers come and go.
	roots *store.Session

	// mu guards the fields from subs to round. A goal is locked on its
	// own, never with another goal's lock held: what follows the links
	// between goals (waiters, inputsDeep, link) locks one goal at a time,
	// and a goal that tells the callers of others (each, setRunning,
	// tellFailure, run) finds them with its own lock not held. Builder.mu
	// may be held around it (joinGoal), and a caller's lock inside it
	// (call.emit, call.count).
	mu   sync.Mutex
	subs map[*call]int // waiting callers (count of their requests); the last to leave stops the goal
	// dependents are the goals waiting for this one as an input (count
	// of their waits): their callers wait for it too (see waiters);
	// inputs are the goals this one waits for, the other way round.
	dependents, inputs map[*goal]int
	// waitersCache is what waiters found when Builder.waitGen was
	// waitersGen.
	waitersCache []*call
	waitersGen   uint64
	// expectedFor are the callers whose expected builds count this goal's
	// (see countExpected): its own callers, and those waiting for it
	// through its dependents once shown its build (see show). runningFor
	// are those whose running builds count it, while it runs.
	expectedFor, runningFor map[*call]bool
	running                 bool
	// startTold: the callers were told that the builder started
	// (BuildStarted: see show), and not yet that it ended (see goal.run).
	startTold bool
	// failureTold are the callers told of the goal's failure (its
	// builder's) before it ended (see tellFailure).
	failureTold map[*call]bool
	stopping    bool   // cancelled once its last waiter left: joined by no one since
	machine     string // the machine that builds it (a remote build), set before it runs
	round       Round  // the builder's round, set before it runs
	// held is what a repeated build keeps from one round to the next (see
	// buildRounds); only the goal's own goroutine uses it.
	held roundHold

	// Set before done is closed.
	res     Result
	outputs map[string]storepath.Path
	// early is closed, with earlyRes set, when an input fails but the
	// goal goes on for a caller that keeps going (see wait).
	early     chan struct{}
	earlyOnce sync.Once
	earlyRes  Result
}

// goalKey names a goal in Builder.goals: a derivation is built once
// however many callers ask, but a check (--check) or a repair (--repair)
// is a goal of its own, so that no kind of caller gets another's outcome.
type goalKey struct {
	drv  storepath.Path
	mode BuildMode
}

// joinGoal makes c a waiter of the goal that builds req's derivation in
// mode, starting one if there is none (or only one being stopped, which
// the new one waits for): a derivation is built once for all who need it.
func (b *Builder) joinGoal(req store.DerivedPath, drv *derivation.Derivation, c *call, mode BuildMode) *goal {
	b.mu.Lock()
	defer b.mu.Unlock()
	key := goalKey{req.Path, mode}
	old := b.goals[key]
	if old != nil && old.subscribe(c) {
		// Its inputs being built are the new caller's too (see show).
		for _, in := range old.inputsDeep() {
			in.showTo([]*call{c})
		}
		return old
	}
	// None, or one being stopped (its last waiter left): a goal of its own,
	// which starts once the old one has finished (they would share the
	// build's chroot and output locks).
	ctx, cancel := context.WithCancel(context.Background())
	outs := "*"
	if !req.AllOutputs && len(req.Outputs) > 0 {
		outs = strings.Join(req.Outputs, ",")
	}
	g := b.newGoal(req.Path, drv, c, mode, cancel, fmt.Sprintf("building of '%s!%s' from .drv file", b.abs(req.Path), outs))
	g.after = old
	b.goals[key] = g
	// Subscribed before it runs: it asks its waiters whether it may build.
	g.subscribe(c)
	b.running.Add(1)
	go g.run(ctx)
	return g
}

// newGoal makes the goal of drv (at drvPath) in mode for its owner, with
// cancel to stop it; name is Nix's goal name. It has no waiter yet.
func (b *Builder) newGoal(drvPath storepath.Path, drv *derivation.Derivation, owner *call, mode BuildMode, cancel context.CancelFunc, name string) *goal {
	return &goal{
		b: b, drvPath: drvPath, drv: drv, owner: owner, cancel: cancel, mode: mode, name: name,
		done: make(chan struct{}), early: make(chan struct{}), subs: map[*call]int{}, dependents: map[*goal]int{}, inputs: map[*goal]int{},
		runningFor: map[*call]bool{}, expectedFor: map[*call]bool{}, round: Round{1, 1},
	}
}

// subscribe makes c one more waiter of g, unless g is being stopped.
func (g *goal) subscribe(c *call) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.stopping {
		return false
	}
	g.countExpected(c)
	if g.subs[c] == 0 {
		g.b.waitGen.Add(1)
	}
	g.subs[c]++
	if g.running {
		// Joining a build under way (as an input of another goal, say):
		// the caller sees it start too.
		g.show(c, g.b.abs(g.drvPath))
	}
	return true
}

type beforeWaitKey struct{}

// withBeforeWait returns ctx carrying f, which beforeWait calls before a
// wait that a held build slot could turn into a deadlock.
func withBeforeWait(ctx context.Context, f func()) context.Context {
	return context.WithValue(ctx, beforeWaitKey{}, f)
}

// beforeWait calls ctx's withBeforeWait function, if any.
func beforeWait(ctx context.Context) {
	if f, ok := ctx.Value(beforeWaitKey{}).(func()); ok {
		f()
	}
}

// dependentKey is the context key of the goal an input is realised for.
type dependentKey struct{}

// waitFor is wait, with the goal whose input g is (d, from ctx) linked
// to g meanwhile: d's callers wait for g too, and are shown the builds of
// g and of its inputs that are under way.
func (g *goal) waitFor(ctx context.Context, c *call) Result {
	if d, ok := ctx.Value(dependentKey{}).(*goal); ok {
		link(d, g, 1)
		defer link(d, g, -1)
		// Those waiting for d wait for g, and for what g waits for, now:
		// the builds among them are theirs to see.
		waiters := d.waiters()
		for _, in := range append(g.inputsDeep(), g) {
			in.showTo(waiters)
		}
	}
	return g.wait(ctx, c)
}

// limits are the max-silent-time and timeout the goal's builder runs
// under (0: none): the most generous of everyone who waits for it,
// directly or through the goals that need it as an input. One client's
// short limit does not stop a build that other clients wait for (with
// nix-daemon each client's build is its own); a build with one client
// has that client's limits, as with nix-daemon.
func (g *goal) limits() (maxSilent, timeout time.Duration) {
	calls := g.waiters()
	if len(calls) == 0 {
		return g.owner.limits()
	}
	maxSilent, timeout = calls[0].limits()
	for _, c := range calls[1:] {
		s, t := c.limits()
		maxSilent, timeout = moreGenerous(maxSilent, s), moreGenerous(timeout, t)
	}
	return maxSilent, timeout
}

// moreGenerous is the longer of two limits, where 0 is none.
func moreGenerous(a, b time.Duration) time.Duration {
	if a == 0 || b == 0 {
		return 0
	}
	return max(a, b)
}

// limits are the caller's max-silent-time and timeout: its own if it set
// them, else the daemon's; 0 means none.
func (c *call) limits() (maxSilent, timeout time.Duration) {
	maxSilent, timeout = c.b.cfg.MaxSilentTime, c.b.cfg.Timeout
	if c.opts.MaxSilentTime > 0 {
		maxSilent = c.opts.MaxSilentTime
	}
	if c.opts.Timeout > 0 {
		timeout = c.opts.Timeout
	}
	return maxSilent, timeout
}

// wait waits for the goal's result; if ctx ends first the caller leaves,
// and the goal is cancelled once no caller waits for it.
func (g *goal) wait(ctx context.Context, c *call) Result {
	var early <-chan struct{}
	if !c.opts.KeepGoing {
		early = g.early
	}
	select {
	case <-g.done:
		g.leave(c)
		return g.res
	case <-ctx.Done():
		g.leave(c)
		return stoppedResult(ctx)
	case <-early:
		// An input failed while a caller that keeps going has the goal go
		// on: this caller, which does not, fails now, as its own goal
		// would in Nix.
		g.leave(c)
		drvAbs := g.b.abs(g.drvPath)
		r := g.earlyRes
		c.emit(func(p Progress) { p.GoalFailed(drvAbs, r) })
		return r
	}
}

// leave ends one wait of c for g (see wait): the last of c's takes the
// build off c's counters if g has not ended, and once no caller waits g
// is stopped (cancelled, and joined by no one since).
func (g *goal) leave(c *call) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.subs[c]--
	if g.subs[c] == 0 {
		delete(g.subs, c)
		g.b.waitGen.Add(1)
		select {
		case <-g.done:
		default:
			// The caller stops waiting before the end: take the build off
			// its counters. One that still waits for it through a
			// dependent is shown it again by the next each (a log line).
			if g.expectedFor[c] {
				delete(g.expectedFor, c)
				c.count(counts{expected: -1, running: -g.stopRunningFor(c)})
			}
		}
	}
	if len(g.subs) == 0 {
		g.stopping = true
		g.cancel()
	}
}

// caller returns whose caches and options the goal uses for what it
// substitutes and the inputs it realises, chosen when it needs one: a
// caller that still waits (one that left may have closed its session),
// one that another failure is not stopping, one that may build if any may
// (so that its inputs can be built), the owner before others.
func (g *goal) caller() *call {
	g.mu.Lock()
	defer g.mu.Unlock()
	var best *call
	rank := func(c *call) int {
		r := 0
		if !c.stopping.Load() {
			r += 4 // one that another failure does not stop
		}
		if c.mayBuild() {
			r += 2
		}
		if c == g.owner {
			r++
		}
		return r
	}
	for c := range g.subs {
		if best == nil || rank(c) > rank(best) {
			best = c
		}
	}
	if best == nil {
		return g.owner
	}
	return best
}

// mayBuild reports whether some caller waiting for g may run builds here.
func (g *goal) mayBuild() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for c := range g.subs {
		if c.mayBuild() {
			return true
		}
	}
	return false
}

// keepGoing reports whether a caller waiting for g asked to keep going:
// then g waits for all its inputs even when one fails.
func (g *goal) keepGoing() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for c := range g.subs {
		if c.opts.KeepGoing {
			return true
		}
	}
	return false
}

// failing tells the callers that do not keep going that g's build has
// failed, before its slot is given to another: see unwanted.
func (g *goal) failing() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for c := range g.subs {
		if !c.opts.KeepGoing {
			c.stopping.Store(true)
		}
	}
}

// unwanted reports whether every caller waiting for g is being stopped
// by another build's failure: a build that has not started then does not
// start only to be stopped, as in Nix, whose worker handles a failure
// before it starts the next build.
func (g *goal) unwanted() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for c := range g.subs {
		if !c.stopping.Load() {
			return false
		}
	}
	return len(g.subs) > 0
}

// modeVerb names what a check or repair goal does, for messages.
func (g *goal) modeVerb() string {
	if g.mode == ModeRepair {
		return "repairing"
	}
	return "checking"
}

// run drives the goal to its result.
func (g *goal) run(ctx context.Context) {
	b := g.b
	defer b.running.Done()
	if g.after != nil {
		// Even when this goal is stopped too: a goal after it must not
		// start before the old one is gone.
		<-g.after.done
		g.after = nil
	}
	g.roots = b.st.OpenSession()
	res := g.realise(ctx)
	g.roots.Close()
	g.res = res
	b.mu.Lock()
	key := goalKey{g.drvPath, g.mode}
	if b.goals[key] == g { // BuildBasic's goals are not in the table
		delete(b.goals, key)
	}
	b.mu.Unlock()
	// As Nix's Worker (DerivationGoal::done, then Goal::amDone): the build
	// is no longer expected; done if it was built here, failed if it
	// failed by itself (not for a failed input); then each caller hears
	// of a failure. A goal that needed a build no one may run here says
	// so once, in the request's own error (a caller that may build takes
	// it over).
	var done, failed int
	ownFailure := !res.Status.Success() && !res.Stopped && !res.noLocalBuilds
	switch {
	case res.Status == Built:
		done = 1
	case ownFailure && res.Status != DependencyFailed:
		failed = 1
	}
	var buildErr error
	if !res.Status.Success() {
		buildErr = &Error{Status: res.Status, Msg: res.ErrorMsg}
	}
	drvAbs := b.abs(g.drvPath)
	waiters := g.waiters()
	g.mu.Lock()
	// tellEnd takes the build off c's counters and tells c how it ended.
	tellEnd := func(c *call) {
		expected := g.expectedFor[c]
		d := counts{running: -g.stopRunningFor(c), done: done, failed: failed}
		if expected {
			d.expected = -1
		}
		c.count(d)
		if ownFailure && res.ErrorMsg != "" && !g.failureTold[c] {
			c.emit(func(p Progress) { p.GoalFailed(drvAbs, res) })
		}
		// As Nix's goal's build activity, which ends with the goal,
		// after its counters: a progress bar never shows the build
		// neither running nor done.
		if g.startTold && expected {
			c.emit(func(p Progress) { p.BuildFinished(drvAbs, buildErr) })
		}
	}
	// Every caller that counts the build as expected (its own, and those
	// shown it through a dependent, whether they still wait or not), then
	// the others that wait for it through a dependent, which are counted
	// done or failed and told of its failure but have no activity to end.
	for c := range g.expectedFor {
		tellEnd(c)
	}
	for _, c := range waiters {
		if !g.expectedFor[c] {
			tellEnd(c)
		}
	}
	close(g.done)
	g.mu.Unlock()
	g.cancel()
}

// Test hooks, unset outside tests: testHookUnwanted runs when a goal that
// has its slot finds every caller stopped by another failure, and
// testHookChrootLocked when a goal has taken its sandbox root's name.
var testHookUnwanted, testHookChrootLocked atomic.Pointer[func(g *goal)]

// runTestHook runs the hook h, if set, for g.
func runTestHook(h *atomic.Pointer[func(g *goal)], g *goal) {
	if f := h.Load(); f != nil {
		(*f)(g)
	}
}

func (g *goal) failf(st Status, format string, args ...any) Result {
	return Result{Status: st, ErrorMsg: fmt.Sprintf(format, args...)}
}

// realise is the goal's work, as Nix's DerivationGoal: it checks the
// derivation and its output paths, substitutes what a check needs,
// realises the inputs (in parallel), substitutes the outputs after all
// if a cache had them without their closure, may offer the build to the
// build hook, and otherwise builds here (once, or in rounds with repeat)
// under a build slot and the outputs' locks. Its result is the goal's.
func (g *goal) realise(ctx context.Context) Result {
	b := g.b
	outPaths, fail := g.checkDerivation(ctx)
	if fail != nil {
		return *fail
	}
	g.outputs = outPaths
	// Substitutes are allowed unless the derivation says not to
	// (allowSubstitutes = false), as in Nix's haveDerivation.
	allowSubst, err := g.attrs.Bool("allowSubstitutes", true)
	if err != nil {
		return g.failf(MiscFailure, "%v", err)
	}
	// A check (--check) needs the outputs valid to compare with: it
	// substitutes the missing ones, then builds again. (Otherwise what
	// the callers want was looked for before the goal: see call.realise.)
	if caller := g.caller(); g.mode == ModeCheck && caller.opts.Substituter != nil && allowSubst {
		if r, ok := caller.trySubstitute(ctx, g.drvPath, outPaths); ok && !r.Status.Success() {
			return r
		}
	}

	// As Nix's retrySubstitution: outputs that a cache has without all of
	// their closure (a runtime dependency that is one of the inputs, say,
	// which will be built) are looked for again once the inputs are there,
	// and fetched rather than built.
	retry := false
	if caller := g.caller(); g.mode == ModeNormal && allowSubst && len(g.drv.InputDrvs) > 0 && caller.opts.Substituter != nil {
		if _, valid, err := b.validOutputs(ctx, g.drv, slices.Sorted(maps.Keys(outPaths))); err == nil && !valid {
			retry = caller.opts.Substituter.Incomplete(ctx, slices.Collect(maps.Values(outPaths)))
		}
	}

	closure, fail := g.realiseInputs(ctx)
	if fail != nil {
		return *fail
	}
	if retry {
		// The inputs are there now: the outputs may come from the cache
		// after all.
		if r, ok := g.caller().trySubstitute(ctx, g.drvPath, outPaths); ok {
			return r
		}
	}
	inputs, err := b.st.QueryClosure(ctx, closure)
	if err != nil {
		return g.failf(MiscFailure, "derivation '%s': closure of the inputs: %v", b.abs(g.drvPath), err)
	}
	return g.buildOutputs(ctx, inputs, outPaths)
}

// checkDerivation checks what realise needs of the derivation before
// anything is realised: a kind that nixyard builds, its attributes (it
// sets g.attrs) and its output paths, which it returns by output name.
func (g *goal) checkDerivation(ctx context.Context) (map[string]storepath.Path, *Result) {
	b := g.b
	drvAbs := b.abs(g.drvPath)
	fail := func(format string, args ...any) (map[string]storepath.Path, *Result) {
		r := g.failf(MiscFailure, format, args...)
		return nil, &r
	}
	kind, err := g.drv.Kind()
	if err != nil {
		return fail("derivation '%s': %v", drvAbs, err)
	}
	if kind != derivation.InputAddressed && kind != derivation.FixedOutput {
		return fail("derivation '%s' is %s: building it is %v by nixyard", drvAbs, kind, errNotSupported)
	}
	if g.attrs, err = g.drv.Attrs(g.drvPath.String()); err != nil {
		return fail("%v", err)
	}
	// The output paths of an input-addressed derivation sent whole
	// (BuildBasic) cannot be checked without its input derivations: they
	// are taken as given, from trusted clients only, as Nix does.
	if !g.basic || kind != derivation.InputAddressed {
		if err := b.st.DrvHashCache().CheckOutputPaths(ctx, g.drv, b.st.Dir(), b.loadDerivation); err != nil {
			return fail("derivation '%s': %v", drvAbs, err)
		}
	}
	outPaths := map[string]storepath.Path{}
	for n, o := range g.drv.Outputs {
		p, err := b.st.Dir().Parse(o.Path)
		if err != nil {
			return fail("derivation '%s': output %s: %v", drvAbs, n, err)
		}
		outPaths[n] = p
	}
	return outPaths, nil
}

// realiseInputs realises the derivation's inputs in parallel, for the
// goal's callers, and returns the paths they are (each input
// derivation's wanted outputs, and the input sources), held by the
// goal's temporary roots. Unless the caller keeps going, the first input
// that fails stops waiting for the others (as Nix's goals stop waiting
// for their other waitees).
func (g *goal) realiseInputs(ctx context.Context) ([]storepath.Path, *Result) {
	b := g.b
	drvAbs := b.abs(g.drvPath)
	result := func(r Result) ([]storepath.Path, *Result) { return nil, &r }
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		nFailed int
		closure []storepath.Path
	)
	inCtx, stopInputs := context.WithCancelCause(ctx)
	defer stopInputs(nil)
	noBuilds := false // an input needed a build that max-jobs 0 forbade
	nStopped := 0     // inputs stopped for callers that another failure stops
	inputFailed := func(r Result) {
		if errors.Is(context.Cause(inCtx), errStopped) {
			// Dropped after another input failed (a download cut short,
			// say): not a failure of its own, as Nix's goal stops
			// counting its waitees at the first failure.
			return
		}
		if r.Stopped {
			// Counted apart: the failure that stops the caller may be
			// told after it, and is the one the goal reports (as Nix's
			// goals stop counting at the first failure).
			nStopped++
			return
		}
		nFailed++
		noBuilds = noBuilds || r.noLocalBuilds
		switch {
		case stopsOthers(r) && !g.keepGoing():
			stopInputs(errStopped)
		case stopsOthers(r) && !g.basic:
			// Going on for a caller that keeps going: the others fail
			// at once (see wait).
			g.earlyOnce.Do(func() {
				g.earlyRes = g.failf(DependencyFailed, "%s", hint.Fmt("%d dependencies of derivation '%s' failed to build", nFailed, drvAbs))
				close(g.early)
			})
		}
	}
	// realiseInput realises an input derivation's outputs for a caller of
	// the goal. One that another of its builds' failure is stopping may
	// get the input back stopped while the goal has callers that are not:
	// it is realised again for one of those.
	depCtx := context.WithValue(inCtx, dependentKey{}, g)
	realiseInput := func(dp store.DerivedPath) Result {
		for {
			c := g.caller()
			r := c.realise(depCtx, dp, 1)
			if !r.Stopped || inCtx.Err() != nil || !c.stopping.Load() || g.caller().stopping.Load() {
				return r
			}
		}
	}
	// Every input's name is checked before any is realised: a goal that
	// fails leaves none of its goroutines behind.
	inDrvs := map[string]storepath.Path{}
	inSrcs := make([]storepath.Path, 0, len(g.drv.InputSrcs))
	for in := range g.drv.InputDrvs {
		ip, err := b.st.Dir().Parse(in)
		if err != nil {
			return result(g.failf(MiscFailure, "derivation '%s': input %s: %v", drvAbs, in, err))
		}
		inDrvs[in] = ip
	}
	for _, src := range g.drv.InputSrcs {
		sp, err := b.st.Dir().Parse(src)
		if err != nil {
			return result(g.failf(MiscFailure, "derivation '%s': input %s: %v", drvAbs, src, err))
		}
		inSrcs = append(inSrcs, sp)
	}
	for _, in := range slices.Sorted(maps.Keys(g.drv.InputDrvs)) {
		ip := inDrvs[in]
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := realiseInput(store.DerivedPath{Path: ip, Outputs: g.drv.InputDrvs[in], Built: true})
			if r.Status.Success() {
				for _, p := range r.BuiltOutputs {
					if err := g.roots.AddTempRoot(inCtx, p); err != nil {
						r = g.failf(MiscFailure, "derivation '%s': input %s: %v", drvAbs, b.abs(p), err)
					}
				}
			}
			mu.Lock()
			defer mu.Unlock()
			if !r.Status.Success() {
				inputFailed(r)
				return
			}
			for _, p := range r.BuiltOutputs {
				closure = append(closure, p)
			}
		}()
	}
	for i, src := range g.drv.InputSrcs {
		sp := inSrcs[i]
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := g.caller().realiseOpaque(inCtx, store.DerivedPath{Path: sp})
			if r.Status.Success() {
				if err := g.roots.AddTempRoot(inCtx, sp); err != nil {
					r = g.failf(MiscFailure, "derivation '%s': input %s: %v", drvAbs, src, err)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			if !r.Status.Success() {
				b.log.Warn("input source missing", "drv", drvAbs, "err", r.ErrorMsg)
				inputFailed(r)
				return
			}
			closure = append(closure, sp)
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return result(g.failf(MiscFailure, "building '%s': %v", drvAbs, err))
	}
	if nFailed == 0 && nStopped > 0 {
		// Every caller is being stopped by another failure: not a failure
		// of this goal's own.
		return result(stoppedByFailure())
	}
	if nFailed > 0 && g.basic {
		// As Nix for a derivation sent whole (BuildDerivation).
		return result(g.failf(MiscFailure, "%s", hint.Fmt("some dependencies of '%s' are missing", drvAbs)))
	}
	if nFailed > 0 {
		// noLocalBuilds travels up, so that a caller who may build, and
		// who joined a goal whose inputs were realised for one who may
		// not, tries again as the owner (see call.realise).
		r := g.failf(DependencyFailed, "%s", hint.Fmt("%d dependencies of derivation '%s' failed to build", nFailed, drvAbs))
		r.noLocalBuilds = noBuilds
		return result(r)
	}
	return closure, nil
}

// buildOutputs makes the outputs, for which the inputs (closed under
// references) are there: it may offer the build to the build hook, and
// otherwise builds here (once, or in rounds with repeat) under a build
// slot and the outputs' locks.
func (g *goal) buildOutputs(ctx context.Context, inputs []storepath.Path, outPaths map[string]storepath.Path) Result {
	b := g.b
	drvAbs := b.abs(g.drvPath)
	features, _, err := g.attrs.Strings("requiredSystemFeatures")
	if err != nil {
		return g.failf(MiscFailure, "%v", err)
	}
	// As Nix: a remote machine may take the build, unless the derivation
	// prefers to be built here and can be, or it is a check or a repair.
	// If the build hook declined it when this host had a slot free, the
	// build keeps that slot, unless laying out its sandbox has to wait
	// (for a build user, or for the sandbox's name, which a goal waiting
	// for a slot may hold): the slot is given back first, and taken again
	// afterwards.
	preferLocal, err := g.attrs.Bool("preferLocalBuild", false)
	if err != nil {
		return g.failf(MiscFailure, "%v", err)
	}
	if g.unwanted() {
		return stoppedByFailure()
	}
	var slot func() // a slot kept from the offer to the hook; nil once given back
	var slotMu sync.Mutex
	giveBack := func() {
		slotMu.Lock()
		defer slotMu.Unlock()
		if slot != nil {
			slot()
			slot = nil
		}
	}
	defer giveBack()
	if g.mode == ModeNormal && !(preferLocal && g.mayBuild() && b.canBuild(g.drv, features) == nil) {
		r, done, s := g.tryRemote(ctx, inputs, outPaths, features)
		if done {
			return r
		}
		slot = s
	}
	// With max-jobs 0 nothing is built here, whatever the derivation
	// needs: Nix says so before it would look at the platform.
	if !g.mayBuild() {
		// Unless another process made the outputs meanwhile.
		if _, ok, err := b.validOutputs(ctx, g.drv, slices.Collect(maps.Keys(outPaths))); err == nil && ok && g.mode == ModeNormal {
			return Result{Status: AlreadyValid}
		}
		return Result{Status: MiscFailure, ErrorMsg: g.caller().noLocalBuildsError().Error(), noLocalBuilds: true}
	}
	if err := b.canBuild(g.drv, features); err != nil {
		return g.failf(MiscFailure, "%v%s", err, hint.Fmt(" to build '%s', but I am a '%s' with features {%s}",
			drvAbs, b.cfg.System, strings.Join(b.cfg.SystemFeatures, ", ")))
	}

	// As Nix's worker, which checks between goals: a store that ran low
	// on space during the request collects in the background now, not
	// only when the next request starts.
	caller := g.caller()
	b.st.AutoGC(store.WithClientLog(ctx, func(msg string) { caller.emit(func(p Progress) { p.Info(msg) }) }), false)

	// The build directory and sandbox are laid out before taking a slot,
	// so slots are held only while builders run.
	j, fail := g.prepare(withBeforeWait(ctx, giveBack), inputs, outPaths)
	if fail != nil {
		return *fail
	}
	defer j.cleanup()

	// A slot, then the output locks, then check again: another caller or
	// process may have built it meanwhile.
	slotMu.Lock()
	release := slot
	slot = nil
	slotMu.Unlock()
	if release == nil {
		if release, err = b.slots.acquire(ctx, g.owner.client); err != nil {
			return g.failf(MiscFailure, "building '%s': %v", drvAbs, err)
		}
	}
	released := false
	releaseOnce := func() {
		if !released {
			released = true
			release()
		}
	}
	defer releaseOnce()
	if g.unwanted() {
		runTestHook(&testHookUnwanted, g)
		return stoppedByFailure()
	}
	// Another process (or a client still sending an output's path) may
	// hold them: the callers are told they wait.
	tell := func(msg string) { g.each(func(c *call) { c.emit(func(p Progress) { p.Info(msg) }) }) }
	locks, err := b.st.LockOutputs(store.WithClientLog(ctx, tell), slices.Collect(maps.Values(outPaths)))
	if err != nil {
		return g.failf(MiscFailure, "building '%s': %v", drvAbs, err)
	}
	defer locks.Unlock()
	missing := map[string]storepath.Path{}
	nValid := 0
	for n, p := range outPaths {
		ok, err := b.st.IsValidPathFresh(ctx, p) // under the outputs' locks
		if err != nil {
			return g.failf(MiscFailure, "building '%s': %v", drvAbs, err)
		}
		if ok {
			nValid++
		}
		// A check builds every output and compares those that are valid
		// (the wanted ones are: the realiser saw to it); a repair builds
		// every output and replaces those that are missing or damaged.
		if !ok || g.mode != ModeNormal {
			missing[n] = p
		}
	}
	if g.mode == ModeCheck && nValid == 0 {
		return g.failf(MiscFailure, "%s", hint.Fmt("some outputs of '%s' are not valid, so checking is not possible", drvAbs))
	}
	if len(missing) == 0 {
		return Result{Status: AlreadyValid}
	}
	if rounds := g.rounds(j); rounds > 1 {
		return g.buildRounds(ctx, j, inputs, missing, locks, releaseOnce, rounds)
	}
	return j.build(ctx, missing, locks, releaseOnce)
}

// keepFailed reports whether what a failed build leaves is kept
// (keep-failed: the owner's, or the daemon's).
func (g *goal) keepFailed() bool {
	return g.owner.opts.KeepFailed || g.b.cfg.KeepFailed
}

// loadDerivation is a derivation.Loader for valid .drv files of the store.
func (b *Builder) loadDerivation(ctx context.Context, abs string) (*derivation.Derivation, error) {
	p, err := b.st.Dir().Parse(abs)
	if err != nil {
		return nil, err
	}
	return derivation.ParseFile(b.st.RealPath(p))
}
