package daemon

import (
	"context"
	"errors"
	"fmt"

	"github.com/nixyard/nixyard/internal/build"
	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/nix/derivation"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/store"
)

// errNoBuilder is the failure of build ops on a daemon without a Builder.
var errNoBuilder = errors.New("this nixyard daemon does not build (no builder configured)")

// opBuildDerivationHandler is BuildDerivation (op 36): build a derivation
// the client sends whole (§5.6), as remote builders and `nix-store
// --serve` callers do. As nix-daemon, untrusted clients may only build
// content-addressed derivations, whose outputs are checked against their
// content; an input-addressed output path cannot be checked without the
// derivation closure.
func opBuildDerivationHandler(ctx context.Context, c *conn) error {
	drvPath := c.in.Path("drvPath", c.dir)
	var drv *derivation.Derivation
	if c.in.Err() == nil {
		drv = c.readBasicDerivation(drvPath)
	}
	mode := c.readBuildMode()
	if err := c.begin(wire.OpBuildDerivation); err != nil {
		return err
	}
	b := c.srv.opts.Builder
	if b == nil {
		return errNoBuilder
	}
	if err := c.checkBuildMode(mode); err != nil {
		return err
	}
	if !c.peer.trusted {
		kind, err := drv.Kind()
		if err != nil {
			return fmt.Errorf("derivation '%s': %w", c.dir.Abs(drvPath), err)
		}
		if kind == derivation.InputAddressed || kind == derivation.Deferred {
			return c.untrusted("you are not privileged to build input-addressed derivations")
		}
	}
	c.st.AutoGC(ctx, false)
	opts := c.buildOptions(mode)
	// Outputs and input sources that a cache has are fetched, as Nix's
	// goal for the derivation does.
	var sprog *substProgress
	if r, err := c.realiser(); err == nil && r.HasSubstituters() {
		sprog = c.newSubstProgress(nil)
		opts.Substituter = r.Substituter(ctx, sprog)
	}
	prog := newBuildProgress(c.tun, map[string]bool{c.dir.Abs(drvPath): true})
	res, err := b.BuildBasic(ctx, drvPath, drv, opts, prog)
	if sprog != nil {
		sprog.close()
	}
	prog.close()
	if err != nil {
		return err
	}
	c.stopWork()
	c.writeBuildResult(res, "", true)
	return nil
}

// writeBuildResult writes an unkeyed BuildResult (§5.2), with its times
// and builtOutputs in the old, dummy-hash form. ofDerivation is set for
// a derivation's result, unset for a path's (a substitution's).
func (c *conn) writeBuildResult(r build.Result, drvHash string, ofDerivation bool) {
	c.out.U64(uint64(r.Status))
	msg := r.ErrorMsg
	if msg != "" && ofDerivation {
		// As nix-daemon: a derivation's message starts in normal text,
		// so that the client's highlighting of the whole error (`nix
		// build` shows it as one value) ends at once; a substitution's
		// stays highlighted.
		msg = hint.Normal + msg
	}
	c.out.String(msg)
	if c.minor >= 29 {
		var start, stop uint64
		if !r.StartTime.IsZero() {
			start, stop = uint64(r.StartTime.Unix()), uint64(r.StopTime.Unix())
		}
		c.out.U64(uint64(r.TimesBuilt))
		c.out.Bool(r.NonDeterministic)
		c.out.U64(start)
		c.out.U64(stop)
	}
	if c.minor >= 37 {
		c.out.U64(0) // cpuUser: none
		c.out.U64(0) // cpuSystem: none
	}
	if c.minor >= 28 {
		m := map[string]string{}
		if r.Status.Success() {
			for name, p := range r.BuiltOutputs { // StringMap sorts
				h := drvHash
				if h == "" {
					h = dummyDrvHash
				}
				rl := store.Realisation{DrvHash: h, Output: name, Path: p}
				m[rl.ID()] = realisationJSON(rl)
			}
		}
		c.out.StringMap(m)
	}
}
