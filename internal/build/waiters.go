package build

import (
	"maps"
	"slices"
)

// Who a goal tells of its build: its waiters (its own callers, and those
// of the goals waiting for it as an input), shown its builder running,
// counted, and told of its failure. See goal.mu for the locking rule.

// link adds n (1 or -1) to dependent d's waits for its input in, on both
// sides (one goal locked at a time: see goal.mu).
func link(d, in *goal, n int) {
	in.mu.Lock()
	if in.dependents[d] += n; in.dependents[d] == 0 {
		delete(in.dependents, d)
	}
	in.mu.Unlock()
	d.mu.Lock()
	if d.inputs[in] += n; d.inputs[in] == 0 {
		delete(d.inputs, in)
	}
	d.mu.Unlock()
	d.b.waitGen.Add(1)
}

// inputsDeep returns the goals g waits for, and those they wait for,
// recursively, each once.
func (g *goal) inputsDeep() []*goal {
	var out []*goal
	seen := map[*goal]bool{g: true}
	var visit func(g *goal)
	visit = func(g *goal) {
		g.mu.Lock()
		ins := slices.Collect(maps.Keys(g.inputs))
		g.mu.Unlock()
		for _, in := range ins {
			if !seen[in] {
				seen[in] = true
				out = append(out, in)
				visit(in)
			}
		}
	}
	visit(g)
	return out
}

// waiters returns the callers that wait for g, each once: its own, and
// those of the goals waiting for it as an input, recursively. g.mu must
// not be held (see goal.mu). The result is cached until a goal's callers
// or dependents change (see Builder.waitGen), and is not to be modified.
func (g *goal) waiters() []*call {
	gen := g.b.waitGen.Load()
	g.mu.Lock()
	if g.waitersCache != nil && g.waitersGen == gen { // as for most log lines (see each)
		calls := g.waitersCache
		g.mu.Unlock()
		return calls
	}
	g.mu.Unlock()
	calls := g.findWaiters()
	g.mu.Lock()
	g.waitersCache, g.waitersGen = calls, gen
	g.mu.Unlock()
	return calls
}

// findWaiters is waiters, found afresh, following dependents.
func (g *goal) findWaiters() []*call {
	calls := []*call{}
	seenCall := map[*call]bool{}
	seen := map[*goal]bool{}
	var visit func(g *goal)
	visit = func(g *goal) {
		if seen[g] {
			return
		}
		seen[g] = true
		g.mu.Lock()
		for c := range g.subs {
			if !seenCall[c] {
				seenCall[c] = true
				calls = append(calls, c)
			}
		}
		deps := slices.Collect(maps.Keys(g.dependents))
		g.mu.Unlock()
		for _, d := range deps {
			visit(d)
		}
	}
	visit(g)
	return calls
}

// show tells c that g's builder runs (BuildStarted), once a run, and
// counts it among c's running builds, and, for a caller that waits for g
// only through its dependents, among its expected ones: a client waiting
// for a goal that another client's build needs too sees the builds of its
// inputs as it would see its own. g.mu must be held.
func (g *goal) show(c *call, drvAbs string) {
	if g.runningFor[c] {
		return
	}
	c.emit(func(p Progress) { p.BuildStarted(drvAbs, g.machine, g.mode, g.round) })
	g.countExpected(c)
	c.count(counts{running: 1})
	g.runningFor[c] = true
}

// showTo shows g's build to calls, if it runs (see show).
func (g *goal) showTo(calls []*call) {
	drvAbs := g.b.abs(g.drvPath)
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.running {
		for _, c := range calls {
			g.show(c, drvAbs)
		}
	}
}

// countExpected counts g's build among c's expected builds, once. g.mu
// must be held.
func (g *goal) countExpected(c *call) {
	if !g.expectedFor[c] {
		g.expectedFor[c] = true
		c.count(counts{expected: 1})
	}
}

// each calls f for every caller waiting for g (waiters), first showing
// the builder running to one that has not seen it start (one that came to
// wait while it ran).
func (g *goal) each(f func(c *call)) {
	waiters := g.waiters()
	g.showTo(waiters)
	for _, c := range waiters {
		f(c)
	}
}

// tellFailure tells the callers of the failure of the goal's builder,
// which will be the goal's result, before the goal ends.
func (g *goal) tellFailure(f *failure) {
	res := Result{Status: f.Status, ErrorMsg: f.Msg, HashMismatch: f.hashMismatch, TimesBuilt: f.timesBuilt}
	drvAbs := g.b.abs(g.drvPath)
	waiters := g.waiters()
	g.mu.Lock()
	defer g.mu.Unlock()
	g.failureTold = map[*call]bool{}
	for _, c := range waiters {
		g.failureTold[c] = true
		c.emit(func(p Progress) { p.GoalFailed(drvAbs, res) })
	}
}

// setRunning marks the goal's builder as running or not, counts it for
// every caller waiting for it and, when it starts, tells them (see show).
func (g *goal) setRunning(on bool) {
	g.mu.Lock()
	g.running = on
	g.startTold = g.startTold || on
	if !on {
		// Off the running builds as its slot goes back (the next build
		// may start while this one's outputs are registered: one build
		// at a time is never counted as two running); counted done or
		// failed when the goal ends, and its activity stops then.
		for c := range g.runningFor {
			c.count(counts{running: -1})
		}
		clear(g.runningFor)
		g.mu.Unlock()
		return
	}
	g.mu.Unlock()
	// Shown unlocked, as waiters locks other goals (see goal.mu): a caller
	// that subscribes meanwhile is shown it by subscribe, and show shows
	// each caller once a run.
	g.showTo(g.waiters())
}

// stopRunningFor takes the goal off c's running builds, if it is on them;
// it returns 1 if it was, else 0. g.mu must be held.
func (g *goal) stopRunningFor(c *call) int {
	if !g.runningFor[c] {
		return 0
	}
	delete(g.runningFor, c)
	return 1
}
