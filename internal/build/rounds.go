package build

import (
	"context"
	"maps"
	"os"
	"slices"
	"time"

	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// enforceDeterminism reports whether rounds of a repeated build that
// differ fail it (enforce-determinism: the owner's, or the daemon's).
func (g *goal) enforceDeterminism() bool {
	if e := g.owner.opts.EnforceDeterminism; e != nil {
		return *e
	}
	return !g.b.cfg.NoEnforceDeterminism
}

// rounds is how many times the goal's builder runs here (Nix's repeat +
// 1): once for a check or repair, a fixed-output derivation (its hash is
// checked) or a builtin builder (run in the daemon). (A build sent to a
// remote machine does not come here: see tryRemote.)
func (g *goal) rounds(j *job) int {
	if g.mode != ModeNormal || j.builtin {
		return 1
	}
	if kind, _ := g.drv.Kind(); kind == derivation.FixedOutput {
		return 1
	}
	repeat := g.b.cfg.Repeat
	if r := g.owner.opts.Repeat; r != 0 {
		repeat = max(r, 0)
	}
	return repeat + 1
}

// roundHold is what a repeated build keeps between rounds, besides its
// build slot and output locks: its build user and its sandbox root's
// name. Taking them again, while holding the slot and locks, could wait
// for a goal that holds them and waits for the slot.
type roundHold struct {
	user         *buildUser
	unlockChroot func()
}

// keep takes j's build user and sandbox root name for the next round.
func (h *roundHold) keep(j *job) {
	h.user, j.user = j.user, nil
	h.unlockChroot, j.unlockChroot = j.unlockChroot, nil
}

func (h *roundHold) takeUser() *buildUser {
	u := h.user
	h.user = nil
	return u
}

func (h *roundHold) takeChroot() func() {
	f := h.unlockChroot
	h.unlockChroot = nil
	return f
}

// release gives back what is still held.
func (h *roundHold) release() {
	if u := h.takeUser(); u != nil {
		u.release()
	}
	if f := h.takeChroot(); f != nil {
		f()
	}
}

// buildRounds builds the missing outputs rounds times, as Nix's repeat:
// each round's outputs are compared with the previous round's, and only
// the last round's are registered. first is the prepared job of the
// first round. The build slot (given back by release), the output locks,
// the build user and the sandbox root's name are held throughout: taking
// one again while holding the others could wait for a goal that holds it
// and waits for another.
// A difference fails the build (with enforce-determinism, Nix's default)
// or ends the rounds with that round's outputs registered.
func (g *goal) buildRounds(ctx context.Context, first *job, inputs []storepath.Path, missing map[string]storepath.Path, locks *store.OutputLocks, release func(), rounds int) Result {
	defer release()
	defer g.held.release()
	var prev map[string]hash.Hash
	var start time.Time
	times := 0
	for n := 1; ; n++ {
		j := first
		if n > 1 {
			var fail *Result
			if j, fail = g.prepare(ctx, inputs, g.outputs); fail != nil {
				return *fail
			}
		}
		g.mu.Lock()
		g.round = Round{n, rounds}
		g.mu.Unlock()
		j.prev, j.trial = prev, n < rounds
		res := j.build(ctx, missing, locks, func() {}) // the slot is released once, at the end
		if n == 1 {
			start = res.StartTime
		}
		times += res.TimesBuilt
		res.StartTime, res.TimesBuilt, res.NonDeterministic = start, times, j.differs
		done := !res.Status.Success() || !j.trial || j.differs
		switch {
		case done && res.Status.Success():
			j.dropPreviousRound()
		case !done:
			prev = j.hashes
			if n == 1 {
				j.keepPreviousRound()
			}
			g.held.keep(j)
		}
		j.cleanup() // before the next round lays out the same sandbox
		if done {
			return res
		}
	}
}

// compareRound hashes the outputs of a round of a repeated build and
// compares them with the previous round's, as Nix's repeat does. A
// difference runs the diff hook and fails the build (enforce-determinism)
// or, without that, is reported to the callers and ends the rounds
// (j.differs) with this round's outputs.
func (j *job) compareRound(ctx context.Context) *failure {
	g := j.g
	b := g.b
	j.hashes = map[string]hash.Hash{}
	for _, name := range slices.Sorted(maps.Keys(j.outputs)) {
		loc := j.outputLocation(j.outputs[name])
		if _, err := os.Lstat(loc); err != nil {
			return j.failf(OutputRejected, 1, "%s", hint.Fmt("builder for '%s' failed to produce output path for output '%s' at '%s'", j.drvAbs, name, loc))
		}
		h, err := canonicalNarHash(loc)
		if err != nil {
			return j.failf(MiscFailure, 1, "output '%s' of '%s': %v", name, j.drvAbs, err)
		}
		j.hashes[name] = h
	}
	for _, name := range slices.Sorted(maps.Keys(j.prev)) {
		if j.hashes[name].Equal(j.prev[name]) {
			continue
		}
		j.differs = true
		p := j.outputs[name]
		prev := b.abs(p) + checkSuffix
		msg := hint.Fmt("output '%s' of '%s' differs from previous round", b.abs(p), j.drvAbs)
		if _, err := os.Lstat(b.st.RealPath(p) + checkSuffix); err == nil {
			msg = hint.Fmt("output '%s' of '%s' differs from '%s' from previous round", b.abs(p), j.drvAbs, prev)
		}
		j.diffHook(ctx, b.st.RealPath(p)+checkSuffix, j.outputLocation(p))
		if g.enforceDeterminism() {
			return j.failf(NotDeterministic, 1, "%s", msg)
		}
		g.each(func(c *call) { c.emit(func(p Progress) { p.Error(msg) }) })
		return nil
	}
	return nil
}

// keepsRounds reports whether the first round of a repeated build is
// kept at <path>.check for the diff hook and whoever looks (keep-failed
// or run-diff-hook, as Nix's keepPreviousRound).
func (j *job) keepsRounds() bool {
	return j.g.keepFailed() || j.g.b.cfg.RunDiffHook
}

// keepPreviousRound moves the outputs of a repeated build's first round
// to <path>.check, if keepsRounds.
func (j *job) keepPreviousRound() {
	if !j.keepsRounds() {
		return
	}
	b := j.g.b
	for _, p := range j.outputs {
		dst := b.st.RealPath(p) + checkSuffix
		if _, err := moveAside(j.outputLocation(p), dst); err != nil {
			b.log.Warn("cannot keep the output of the previous round", "drv", j.drvAbs, "path", dst, "err", err)
		}
	}
}

// dropPreviousRound removes what keepPreviousRound kept, once the rounds
// agreed.
func (j *job) dropPreviousRound() {
	if !j.keepsRounds() {
		return
	}
	for _, p := range j.outputs {
		removeTree(j.g.b.st.RealPath(p) + checkSuffix)
	}
}
