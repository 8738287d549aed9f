package daemon

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/nixyard/nixyard/internal/build"
	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/realise"
	"github.com/nixyard/nixyard/internal/store"
)

// Build modes and result statuses (§4).
const (
	buildModeNormal    = 0
	buildModeRepair    = 1
	buildModeCheck     = 2
	statusAlreadyValid = 2
)

// dummyDrvHash stands for the derivation hash modulo in builtOutputs keys
// where it is not known (BuildDerivation's derivations, which have no
// .drv in the store to hash from); 2.8 clients read only the output name
// and outPath (§5.2).
const dummyDrvHash = "sha256:0000000000000000000000000000000000000000000000000000000000000000"

// readDerivedPaths reads a list of DerivedPath strings (§5.3).
func (c *conn) readDerivedPaths() []store.DerivedPath {
	ss := c.in.Strings("derived paths", wire.MaxSmallString)
	out := make([]store.DerivedPath, 0, len(ss))
	for _, s := range ss {
		dp, err := c.parseDerivedPath(s)
		if err != nil {
			c.in.SetErr("derived paths", err)
			return nil
		}
		out = append(out, dp)
	}
	return out
}

func (c *conn) parseDerivedPath(s string) (store.DerivedPath, error) {
	base, outs, hasOutputs := strings.Cut(s, "!")
	p, err := c.dir.Parse(base)
	if err != nil {
		return store.DerivedPath{}, err
	}
	switch {
	case !hasOutputs && c.minor < 30 && p.IsDerivation():
		// StorePathWithOutputs: a bare .drv means all its outputs.
		return store.DerivedPath{Path: p, Built: true, AllOutputs: true}, nil
	case !hasOutputs:
		return store.DerivedPath{Path: p}, nil
	case strings.Contains(outs, "!"):
		return store.DerivedPath{}, fmt.Errorf("derived path %q: dynamic derivations are not supported", s)
	case outs == "*", outs == "" && c.minor < 30:
		return store.DerivedPath{Path: p, Built: true, AllOutputs: true}, nil
	}
	names := strings.Split(outs, ",")
	for _, n := range names {
		if err := storepath.CheckName(n); err != nil {
			return store.DerivedPath{}, fmt.Errorf("derived path %q: output name %q: %v", s, n, err)
		}
	}
	slices.Sort(names)
	return store.DerivedPath{Path: p, Built: true, Outputs: slices.Compact(names)}, nil
}

func (c *conn) formatDerivedPath(dp store.DerivedPath) string {
	s := c.dir.Abs(dp.Path)
	switch {
	case !dp.Built:
		return s
	case dp.AllOutputs:
		return s + "!*"
	}
	return s + "!" + strings.Join(dp.Outputs, ",")
}

// readBuildMode reads the mode of BuildPaths and BuildPathsWithResults.
func (c *conn) readBuildMode() uint64 { return c.in.U64Max("buildMode", 2) }

func (c *conn) checkBuildMode(mode uint64) error {
	if mode == buildModeRepair && !c.peer.trusted {
		return c.untrusted("repairing is not allowed because you are not in 'trusted-users'")
	}
	return nil
}

// realiseTargets realises targets for the client in build mode mode:
// valid paths as they are, the rest by substitution or, on a daemon that
// builds, by building, with the progress of both sent to the client.
//
// exit is the exit status Nix's Worker would give the failures (see
// buildProgress.exitStatus), for clients before protocol 1.26.
func (c *conn) realiseTargets(ctx context.Context, targets []store.DerivedPath, mode uint64) (_ *realise.Realiser, _ []realise.Result, exit uint64, _ error) {
	if err := c.checkBuildMode(mode); err != nil {
		return nil, nil, 0, err
	}
	r, err := c.realiser()
	if err != nil {
		return nil, nil, 0, err
	}
	c.st.AutoGC(ctx, false) // as Nix's Worker: free space in the background if the store is low on it
	top := map[string]bool{}
	for _, t := range targets {
		top[c.dir.Abs(t.Path)] = true
	}
	bprog := newBuildProgress(c.tun, top)
	prog := c.newSubstProgress(bprog)
	run, opts := r.Realise, c.buildOptions(mode)
	switch mode {
	case buildModeCheck:
		run = r.Check
	case buildModeRepair:
		// What is missing is built as usual; what is corrupt is fetched again.
		run, opts = r.Repair, c.buildOptions(buildModeNormal)
	}
	results, err := run(withBuildRequest(ctx, opts, bprog), targets, prog)
	if err == nil {
		r.RecordRealisations(ctx, results)
	}
	prog.close()
	bprog.close()
	if err != nil {
		return nil, nil, 0, err
	}
	return r, results, bprog.exitStatus(), nil
}

func opBuildPathsHandler(ctx context.Context, c *conn) error {
	targets := c.readDerivedPaths()
	var mode uint64
	if c.minor >= 15 {
		mode = c.readBuildMode()
	}
	if err := c.begin(wire.OpBuildPaths); err != nil {
		return err
	}
	r, results, exit, err := c.realiseTargets(ctx, targets, mode)
	if err != nil {
		return err
	}
	if err := r.CombinedError(results); err != nil {
		// As Nix: each target's own failure is logged, then the list.
		var cf *realise.CombinedFailure
		if errors.As(err, &cf) {
			for _, m := range cf.Failures {
				c.tun.Error(m)
			}
		}
		return &exitError{err: err, status: exit}
	}
	c.stopWork()
	c.out.U64(1)
	return nil
}

func opBuildPathsWithResultsHandler(ctx context.Context, c *conn) error {
	targets := c.readDerivedPaths()
	mode := c.readBuildMode()
	if err := c.begin(wire.OpBuildPathsWithResults); err != nil {
		return err
	}
	_, results, _, err := c.realiseTargets(ctx, targets, mode)
	if err != nil {
		return err
	}
	c.stopWork()
	results = c.resultsByGoal(results)
	// Nix 2.8's client reports the first failure in the list: failures of
	// their own come first, and a target stopped because another failed
	// has no message (as with nix-daemon), so that the cause is what the
	// user sees.
	slices.SortStableFunc(results, func(a, b realise.Result) int {
		return cmp.Compare(ownFailureRank(a), ownFailureRank(b))
	})
	c.out.U64(uint64(len(results)))
	for _, r := range results {
		if r.Stopped {
			r.ErrorMsg = ""
		}
		c.out.String(c.formatDerivedPath(r.Target))
		c.writeBuildResult(realisedResult(r), r.DrvHash, r.Target.Built)
	}
	return nil
}

// resultsByGoal groups results as Nix's buildPathsWithResults returns
// them: one per goal, that is per derivation (with the outputs of every
// request of it) or per path, named as the first request of it, in the
// order of the goals' keys: paths to fetch, then derivations, each by
// name, then by path. `nix build A B` makes its out-links (result,
// result-1, …) and its --json in this order.
func (c *conn) resultsByGoal(results []realise.Result) []realise.Result {
	key := func(t store.DerivedPath) string {
		kind := "a"
		if t.Built {
			kind = "b"
		}
		return kind + "$" + t.Path.Name() + "$" + c.dir.Abs(t.Path)
	}
	byKey := map[string]int{} // key -> index in out
	var out []realise.Result
	for _, r := range results {
		k := key(r.Target)
		i, ok := byKey[k]
		if !ok {
			byKey[k] = len(out)
			out = append(out, r)
			continue
		}
		first := &out[i]
		switch {
		case first.Status.Success() && !r.Status.Success():
			target := first.Target
			*first = r
			first.Target = target
		case first.Status.Success():
			outs := maps.Clone(first.Outputs)
			if outs == nil {
				outs = map[string]storepath.Path{}
			}
			maps.Copy(outs, r.Outputs)
			first.Outputs = outs
			if r.Status == realise.Built {
				first.Status = r.Status // the goal built (one output was valid already)
			}
		}
	}
	slices.SortStableFunc(out, func(a, b realise.Result) int { return cmp.Compare(key(a.Target), key(b.Target)) })
	return out
}

// ownFailureRank is 0 for a target that failed by a failure of its own,
// else 1.
func ownFailureRank(r realise.Result) int {
	if !r.Status.Success() && !r.Stopped {
		return 0
	}
	return 1
}

// realisedResult is r as the Builder's Result, for writeBuildResult: the
// statuses are the same wire codes.
func realisedResult(r realise.Result) build.Result {
	return build.Result{Status: build.Status(r.Status), ErrorMsg: r.ErrorMsg, BuiltOutputs: r.Outputs,
		TimesBuilt: r.TimesBuilt, StartTime: r.StartTime, StopTime: r.StopTime, NonDeterministic: r.NonDeterministic}
}
