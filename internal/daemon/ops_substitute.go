package daemon

import (
	"context"
	"fmt"
	"strings"

	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/realise"
	"github.com/nixyard/nixyard/internal/substitute"
)

// warnFunc reports failed cache lookups to the client as warnings, as Nix
// does with --fallback (without it, Nix fails the query; nixyard treats
// an upstream that keeps failing as not having the path), and narinfos
// that no trusted key signed. Each distinct message goes once per
// connection: a cache that cannot be reached fails every lookup of it
// with the same words, and a client asks QueryMissing, then BuildPaths,
// about the same paths.
func (c *conn) warnFunc() func(error) {
	return func(err error) {
		// Failures joined (one per cache) are a warning each.
		for _, msg := range strings.Split(err.Error(), "\n") {
			if msg != "" && c.firstWarning(msg) {
				c.tun.Warn(msg)
			}
		}
	}
}

// firstWarning reports whether msg was not sent on this connection
// before, and remembers it.
func (c *conn) firstWarning(msg string) bool {
	c.warnMu.Lock()
	defer c.warnMu.Unlock()
	if c.warned[msg] {
		return false
	}
	if len(c.warned) < maxWarned {
		if c.warned == nil {
			c.warned = map[string]bool{}
		}
		c.warned[msg] = true
	}
	return true
}

// maxWarned bounds the warnings a connection remembers having sent.
const maxWarned = 1024

// querySubstitutable asks the substituters which of ps they have, with
// failed lookups sent as warnings, and stops the work started by the
// caller once it has the answer.
func (c *conn) querySubstitutable(ctx context.Context, ps []storepath.Path) (map[storepath.Path]realise.SubstitutableInfo, error) {
	r, err := c.realiser()
	if err != nil {
		return nil, err
	}
	prog := c.newSubstProgress(nil)
	infos, err := r.QuerySubstitutable(substitute.WithProgress(ctx, prog), ps, prog.Warn)
	prog.close()
	if err != nil {
		return nil, err
	}
	c.stopWork()
	return infos, nil
}

// substitutablePaths returns the paths of infos, sorted.
func substitutablePaths(infos map[storepath.Path]realise.SubstitutableInfo) []storepath.Path {
	ps := make([]storepath.Path, 0, len(infos))
	for p := range infos {
		ps = append(ps, p)
	}
	return storepath.Sort(ps)
}

// writeSubstitutableInfo writes a SubstitutablePathInfo without its path:
// deriver, references, download size and NAR size.
func (c *conn) writeSubstitutableInfo(info realise.SubstitutableInfo) {
	c.out.OptPath(c.dir, info.Deriver)
	c.out.Paths(c.dir, info.References)
	c.out.U64(info.DownloadSize)
	c.out.U64(info.NarSize)
}

// opHasSubstitutesHandler (obsolete, protocol < 1.12).
func opHasSubstitutesHandler(ctx context.Context, c *conn) error {
	p, err := c.pathOp(wire.OpHasSubstitutes)
	if err != nil {
		return err
	}
	infos, err := c.querySubstitutable(ctx, []storepath.Path{p})
	if err != nil {
		return err
	}
	_, ok := infos[p]
	c.out.Bool(ok)
	return nil
}

func opQuerySubstitutablePathsHandler(ctx context.Context, c *conn) error {
	ps := c.in.Paths("paths", c.dir)
	if err := c.begin(wire.OpQuerySubstitutablePaths); err != nil {
		return err
	}
	infos, err := c.querySubstitutable(ctx, ps)
	if err != nil {
		return err
	}
	c.out.Paths(c.dir, substitutablePaths(infos))
	return nil
}

func opQuerySubstitutablePathInfoHandler(ctx context.Context, c *conn) error {
	p, err := c.pathOp(wire.OpQuerySubstitutablePathInfo)
	if err != nil {
		return err
	}
	infos, err := c.querySubstitutable(ctx, []storepath.Path{p})
	if err != nil {
		return err
	}
	info, ok := infos[p]
	if !ok {
		c.out.U64(0)
		return nil
	}
	c.out.U64(1)
	c.writeSubstitutableInfo(info)
	return nil
}

func opQuerySubstitutablePathInfosHandler(ctx context.Context, c *conn) error {
	var ps []storepath.Path
	if c.minor >= 22 {
		n := c.in.Count("paths")
		for i := 0; i < n && c.in.Err() == nil; i++ {
			ps = append(ps, c.in.Path("path", c.dir))
			c.in.String("ca", wire.MaxSmallString)
		}
	} else {
		ps = c.in.Paths("paths", c.dir)
	}
	if err := c.begin(wire.OpQuerySubstitutablePathInfos); err != nil {
		return err
	}
	infos, err := c.querySubstitutable(ctx, ps)
	if err != nil {
		return err
	}
	keys := substitutablePaths(infos)
	c.out.U64(uint64(len(keys)))
	for _, p := range keys {
		c.out.Path(c.dir, p)
		c.writeSubstitutableInfo(infos[p])
	}
	return nil
}

func opQueryValidPathsHandler(ctx context.Context, c *conn) error {
	ps := c.in.Paths("paths", c.dir)
	substitute := false
	if c.minor >= 27 {
		substitute = c.in.Bool("substitute")
	}
	if err := c.begin(wire.OpQueryValidPaths); err != nil {
		return err
	}
	if substitute {
		// Downloads for a client that hangs up stop (see perform).
		var stop func()
		ctx, stop = c.hup.watch(ctx)
		defer stop()
		// As Nix's Store::substitutePaths: what fails to download is a
		// warning; the answer is whatever is valid afterwards.
		r, err := c.realiser()
		if err != nil {
			return err
		}
		prog := c.newSubstProgress(nil)
		err = r.SubstitutePaths(ctx, ps, prog)
		if err != nil && ctx.Err() == nil {
			prog.Warn(err) // deduplicated with the lookups' warnings
		}
		prog.close()
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	valid, err := c.st.QueryValidPaths(ctx, ps)
	if err != nil {
		return err
	}
	if valid, err = c.holdValid(ctx, valid); err != nil {
		return err
	}
	c.stopWork()
	c.out.Paths(c.dir, valid)
	return nil
}

// holdValid makes the valid paths ps temporary roots of the connection
// and returns those still valid once held. A client told that a path is
// valid relies on it: `nix copy --to` the daemon sends only the paths
// missing, which refer to the others, and a collection meanwhile (one
// for the size budget, say) must not delete those (nix-daemon holds
// nothing here: its copy then fails).
func (c *conn) holdValid(ctx context.Context, ps []storepath.Path) ([]storepath.Path, error) {
	if len(ps) == 0 || c.session == nil {
		return ps, nil
	}
	if err := c.session.AddTempRoots(ctx, ps); err != nil {
		return nil, fmt.Errorf("holding the valid paths: %w", err)
	}
	// A collection may have taken one before it was held.
	return c.st.QueryValidPaths(ctx, ps)
}

func opQueryMissingHandler(ctx context.Context, c *conn) error {
	targets := c.readDerivedPaths()
	if err := c.begin(wire.OpQueryMissing); err != nil {
		return err
	}
	r, err := c.realiser()
	if err != nil {
		return err
	}
	act := c.tun.StartActivity(lvlDebug, actUnknown, "querying info about missing paths", nil, 0) // as Nix's queryMissing
	prog := c.newSubstProgress(nil)
	m, err := r.QueryMissing(substitute.WithProgress(ctx, prog), targets, prog.Warn)
	prog.close()
	c.tun.StopActivity(act)
	if err != nil {
		return err
	}
	c.stopWork()
	c.out.Paths(c.dir, m.WillBuild)
	c.out.Paths(c.dir, m.WillSubstitute)
	c.out.Paths(c.dir, m.Unknown)
	c.out.U64(m.DownloadSize)
	c.out.U64(m.NarSize)
	return nil
}

func opEnsurePathHandler(ctx context.Context, c *conn) error {
	p, err := c.pathOp(wire.OpEnsurePath)
	if err != nil {
		return err
	}
	r, err := c.realiser()
	if err != nil {
		return err
	}
	prog := c.newSubstProgress(nil)
	err = r.EnsurePath(ctx, p, prog)
	prog.close()
	if err != nil {
		return err
	}
	c.stopWork()
	c.out.U64(1)
	return nil
}
