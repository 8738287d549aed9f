package daemon

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// begin checks the arguments of op and starts the work phase. A failure to
// start (the client is gone) is fatal.
func (c *conn) begin(op uint64) error {
	if err := c.args(op); err != nil {
		return err
	}
	if err := c.startWork(); err != nil {
		return fatal(fmt.Errorf("operation '%s': starting work: %w", opName(op), err))
	}
	return nil
}

// storeErr words a store error for the client, naming the path.
func (c *conn) storeErr(p storepath.Path, err error) error {
	if errors.Is(err, store.ErrNotValid) {
		return errors.New(hint.Fmt("path '%s' is not valid", c.dir.Abs(p)))
	}
	return err
}

// pathOp reads one path argument and starts work.
func (c *conn) pathOp(op uint64) (storepath.Path, error) {
	p := c.in.Path("path", c.dir)
	return p, c.begin(op)
}

func opIsValidPathHandler(ctx context.Context, c *conn) error {
	p, err := c.pathOp(wire.OpIsValidPath)
	if err != nil {
		return err
	}
	ok, err := c.st.IsValidPath(ctx, p)
	if err != nil {
		return c.storeErr(p, err)
	}
	c.stopWork()
	c.out.Bool(ok)
	return nil
}

// pathInfoOp reads a path, starts work and fetches its info.
func (c *conn) pathInfoOp(ctx context.Context, op uint64) (*store.PathInfo, error) {
	p, err := c.pathOp(op)
	if err != nil {
		return nil, err
	}
	info, err := c.st.QueryPathInfo(ctx, p)
	if err != nil {
		return nil, c.storeErr(p, err)
	}
	return info, nil
}

func opQueryPathHashHandler(ctx context.Context, c *conn) error {
	info, err := c.pathInfoOp(ctx, wire.OpQueryPathHash)
	if err != nil {
		return err
	}
	c.stopWork()
	c.out.String(info.NarHash.Base16())
	return nil
}

func opQueryReferencesHandler(ctx context.Context, c *conn) error {
	info, err := c.pathInfoOp(ctx, wire.OpQueryReferences)
	if err != nil {
		return err
	}
	c.stopWork()
	c.out.Paths(c.dir, info.References)
	return nil
}

func opQueryDeriverHandler(ctx context.Context, c *conn) error {
	info, err := c.pathInfoOp(ctx, wire.OpQueryDeriver)
	if err != nil {
		return err
	}
	c.stopWork()
	c.out.OptPath(c.dir, info.Deriver)
	return nil
}

// pathsQuery serves the ops that map one path to a set of paths.
func pathsQuery(op uint64, query func(ctx context.Context, c *conn, p storepath.Path) ([]storepath.Path, error)) handler {
	return func(ctx context.Context, c *conn) error {
		p, err := c.pathOp(op)
		if err != nil {
			return err
		}
		ps, err := query(ctx, c, p)
		if err != nil {
			return c.storeErr(p, err)
		}
		c.stopWork()
		c.out.Paths(c.dir, ps)
		return nil
	}
}

var (
	opQueryReferrersHandler = pathsQuery(wire.OpQueryReferrers, func(ctx context.Context, c *conn, p storepath.Path) ([]storepath.Path, error) {
		return c.st.QueryReferrers(ctx, p)
	})
	opQueryValidDeriversHandler = pathsQuery(wire.OpQueryValidDerivers, func(ctx context.Context, c *conn, p storepath.Path) ([]storepath.Path, error) {
		return c.st.QueryValidDerivers(ctx, p)
	})
	opQueryDerivationOutputsHandler = pathsQuery(wire.OpQueryDerivationOutputs, func(ctx context.Context, c *conn, p storepath.Path) ([]storepath.Path, error) {
		m, err := c.st.QueryDerivationOutputMap(ctx, p)
		if err != nil {
			return nil, err
		}
		var out []storepath.Path
		for _, o := range m {
			if !o.IsZero() {
				out = append(out, o)
			}
		}
		return out, nil
	})
)

func opQueryDerivationOutputNamesHandler(ctx context.Context, c *conn) error {
	p, err := c.pathOp(wire.OpQueryDerivationOutputNames)
	if err != nil {
		return err
	}
	m, err := c.st.QueryDerivationOutputMap(ctx, p)
	if err != nil {
		return c.storeErr(p, err)
	}
	c.stopWork()
	c.out.StringSet(slices.Collect(maps.Keys(m)))
	return nil
}

func opQueryDerivationOutputMapHandler(ctx context.Context, c *conn) error {
	p, err := c.pathOp(wire.OpQueryDerivationOutputMap)
	if err != nil {
		return err
	}
	m, err := c.st.QueryDerivationOutputMap(ctx, p)
	if err != nil {
		return c.storeErr(p, err)
	}
	c.stopWork()
	names := slices.Sorted(maps.Keys(m))
	c.out.U64(uint64(len(names)))
	for _, n := range names {
		c.out.String(n)
		c.out.OptPath(c.dir, m[n])
	}
	return nil
}

func opQueryPathFromHashPartHandler(ctx context.Context, c *conn) error {
	hashPart := c.in.String("hashPart", wire.MaxPathLen)
	if err := c.begin(wire.OpQueryPathFromHashPart); err != nil {
		return err
	}
	var p storepath.Path
	if len(hashPart) == storepath.HashLen {
		var err error
		p, err = c.st.QueryPathFromHashPart(ctx, hashPart)
		if err != nil && !errors.Is(err, store.ErrNotValid) {
			return fmt.Errorf("querying path from hash part '%s': %w", hashPart, err)
		}
	}
	c.stopWork()
	c.out.OptPath(c.dir, p)
	return nil
}

func opQueryAllValidPathsHandler(ctx context.Context, c *conn) error {
	if err := c.begin(wire.OpQueryAllValidPaths); err != nil {
		return err
	}
	ps, err := c.st.QueryAllValidPaths(ctx)
	if err != nil {
		return err
	}
	c.stopWork()
	c.out.Paths(c.dir, ps)
	return nil
}

// writePathInfo writes a ValidPathInfo (§5.1) in the layout of minor;
// keyed puts the path first.
func (c *conn) writePathInfo(info *store.PathInfo, keyed bool, minor uint64) {
	if keyed {
		c.out.Path(c.dir, info.Path)
	}
	c.out.OptPath(c.dir, info.Deriver)
	c.out.Hex(info.NarHash.Digest)
	c.out.Paths(c.dir, info.References)
	var regTime uint64
	if !info.RegistrationTime.IsZero() && info.RegistrationTime.Unix() > 0 {
		regTime = uint64(info.RegistrationTime.Unix())
	}
	c.out.U64(regTime)
	c.out.U64(info.NarSize)
	if minor >= 16 {
		c.out.Bool(info.Ultimate)
		c.out.StringSet(info.Sigs)
		c.out.String(info.CA)
	}
}

func opQueryPathInfoHandler(ctx context.Context, c *conn) error {
	p, err := c.pathOp(wire.OpQueryPathInfo)
	if err != nil {
		return err
	}
	// Read-only use: the cached entry is written out as it is.
	info, err := c.st.QueryPathInfoShared(ctx, p)
	if err != nil {
		if errors.Is(err, store.ErrNotValid) && c.minor >= 17 {
			c.stopWork()
			c.out.Bool(false)
			return nil
		}
		return c.storeErr(p, err)
	}
	c.st.Touch(p)
	c.stopWork()
	if c.minor >= 17 {
		c.out.Bool(true)
	}
	c.writePathInfo(info, false, c.minor)
	return nil
}
