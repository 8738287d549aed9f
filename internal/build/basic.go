package build

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// BuildBasic builds all outputs of drv, a derivation a client sent whole
// (the daemon's BuildDerivation), as Nix 2.8's Store::buildDerivation:
//
//   - drv has no input derivations: the outputs it needs are among its
//     input sources, which must be valid (or substitutable);
//   - drvPath names it (logs, messages) but need not be valid, and drv
//     need not be what drvPath holds;
//   - the output paths of an input-addressed drv are taken as given, since
//     they cannot be checked without the derivation closure: the caller
//     must allow that for trusted clients only (Nix: "you are not
//     privileged to build input-addressed derivations"). Fixed outputs are
//     checked against their hash as usual.
//
// A build from BuildBasic is not shared with other callers (what a client
// sent under a drvPath may differ from that path's derivation), but it
// takes the same slots and output locks, so the outputs are still built
// once. The error is for requests that cannot be served at all, as Build.
func (b *Builder) BuildBasic(ctx context.Context, drvPath storepath.Path, drv *derivation.Derivation, client ClientOptions, prog Progress) (Result, error) {
	if client.Mode == ModeRepair {
		return Result{}, fmt.Errorf("build: repairing is %w by nixyard", errNotSupported)
	}
	if client.Mode == ModeCheck && !b.sandboxed() {
		return Result{}, fmt.Errorf("build: checking (--check) without the sandbox is %w by nixyard", errNotSupported)
	}
	if len(drv.InputDrvs) > 0 {
		return Result{}, fmt.Errorf("build: derivation '%s' sent with input derivations", b.abs(drvPath))
	}
	names := slices.Sorted(maps.Keys(drv.Outputs))
	req := store.DerivedPath{Path: drvPath, Built: true, Outputs: names}
	// Fixed outputs are checked before anything else, as Nix does when it
	// reads the derivation: a wrong path must not pass as already valid.
	if kind, err := drv.Kind(); err != nil {
		return b.fail(req, MiscFailure, "derivation '%s': %v", b.abs(drvPath), err), nil
	} else if kind != derivation.InputAddressed {
		if err := b.st.DrvHashCache().CheckOutputPaths(ctx, drv, b.st.Dir(), b.loadDerivation); err != nil {
			return b.fail(req, MiscFailure, "derivation '%s': %v", b.abs(drvPath), err), nil
		}
	}
	c := b.newCall(client, prog)
	defer c.close()
	if client.Mode != ModeCheck {
		if outs, ok, err := b.validOutputs(ctx, drv, names); err != nil {
			return b.fail(req, MiscFailure, "%v", err), nil
		} else if ok {
			return b.withRoots(ctx, client, Result{Path: req, Status: AlreadyValid, BuiltOutputs: outs})
		}
		if r, ok := c.substituteWanted(ctx, drvPath, drv, names); ok {
			r.Path = req
			if !r.Status.Success() {
				return r, nil
			}
			return b.withRoots(ctx, client, r)
		}
	}
	gctx, cancel := context.WithCancel(context.Background())
	g := b.newGoal(drvPath, drv, c, client.Mode, cancel, fmt.Sprintf("building of '%s!%s' from in-memory derivation", b.abs(drvPath), strings.Join(names, ",")))
	g.basic = true
	g.subscribe(c)
	b.running.Add(1)
	go g.run(gctx)
	res := g.wait(ctx, c)
	if err := ctx.Err(); err != nil {
		return Result{}, err
	}
	if res.noLocalBuilds || c.noLocalBuilds.Load() {
		return Result{}, c.noLocalBuildsError() // as Nix: the request fails
	}
	res.Path = req
	res.BuiltOutputs = nil
	if res.Status.Success() {
		res.BuiltOutputs = map[string]storepath.Path{}
		for _, n := range names {
			res.BuiltOutputs[n] = g.outputs[n]
		}
	}
	return b.withRoots(ctx, client, res)
}

// withRoots gives the caller's session a temporary root on r's outputs.
func (b *Builder) withRoots(ctx context.Context, client ClientOptions, r Result) (Result, error) {
	if client.Session == nil {
		return r, nil
	}
	for _, p := range r.BuiltOutputs {
		if err := client.Session.AddTempRoot(ctx, p); err != nil {
			return Result{}, err
		}
	}
	return r, nil
}
