package daemon

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"

	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
	"github.com/nixyard/nixyard/internal/substitute"
)

func opAddTempRootHandler(ctx context.Context, c *conn) error {
	p, err := c.pathOp(wire.OpAddTempRoot)
	if err != nil {
		return err
	}
	if err := c.session.AddTempRoot(ctx, p); err != nil {
		return fmt.Errorf("adding temporary root '%s': %w", c.dir.Abs(p), err)
	}
	c.stopWork()
	c.out.U64(1)
	return nil
}

func opAddIndirectRootHandler(ctx context.Context, c *conn) error {
	link := c.in.String("path", wire.MaxPathLen)
	if err := c.begin(wire.OpAddIndirectRoot); err != nil {
		return err
	}
	if !filepath.IsAbs(link) {
		return fmt.Errorf("indirect root '%s' is not an absolute path", link)
	}
	link = filepath.Clean(link)
	if c.peer.jobSock && !c.peer.hostFiles {
		// The link is in the job's container, which the host's collector
		// does not see (it would follow the same name on the host); the
		// job session holds what the job uses meanwhile. (A client on the
		// host, a shell runner's job, makes its roots as anyone's.)
		c.log.Debug("not adding an indirect root from a job socket", "link", link)
		c.stopWork()
		c.out.U64(1)
		return nil
	}
	if err := c.st.AddIndirectRoot(ctx, link); err != nil {
		return fmt.Errorf("adding indirect root '%s': %w", link, err)
	}
	c.stopWork()
	c.out.U64(1)
	return nil
}

func opAddPermRootHandler(ctx context.Context, c *conn) error {
	p := c.in.Path("path", c.dir)
	gcRoot := c.in.String("gcRoot", wire.MaxPathLen)
	if err := c.begin(wire.OpAddPermRoot); err != nil {
		return err
	}
	if !c.peer.trusted {
		return c.untrusted("you are not privileged to create perm roots")
	}
	res, err := c.st.AddPermRoot(ctx, p, gcRoot)
	if err != nil {
		return fmt.Errorf("adding root '%s' for '%s': %w", gcRoot, c.dir.Abs(p), err)
	}
	c.stopWork()
	c.out.String(res)
	return nil
}

// censoredRoot names a root that a client may not see, as Nix names the
// runtime roots it hides from untrusted clients.
const censoredRoot = "{censored}"

// gcLog is where a collection's or root scan's messages go: to the client,
// except, on a job socket, those that name the host's root links or its
// processes' temporary roots files (host paths and pids).
func (c *conn) gcLog() func(msg string) {
	return func(msg string) {
		if c.peer.jobSock && slices.ContainsFunc(hostOnlyGCMessages, func(p string) bool { return strings.HasPrefix(msg, p) }) {
			return
		}
		c.tun.Log(lvlInfo, msg)
	}
}

// hostOnlyGCMessages start the messages of a collection or a root scan
// that a job is not told.
var hostOnlyGCMessages = []string{"removing stale link from ", "skipping invalid root from ", "removing stale temporary roots file "}

func opSyncWithGCHandler(ctx context.Context, c *conn) error {
	if err := c.begin(wire.OpSyncWithGC); err != nil {
		return err
	}
	c.stopWork()
	c.out.U64(1)
	return nil
}

func opFindRootsHandler(ctx context.Context, c *conn) error {
	if err := c.begin(wire.OpFindRoots); err != nil {
		return err
	}
	roots, err := c.st.FindRoots(ctx, !c.peer.trusted, c.gcLog())
	if err != nil {
		return fmt.Errorf("finding GC roots: %w", err)
	}
	if c.peer.jobSock {
		// The host's roots are named by paths of the host (a user's
		// checkout, another job's directory): a job sees only that they
		// are there.
		for t, links := range roots {
			for i := range links {
				links[i] = censoredRoot
			}
			roots[t] = links
		}
	}
	c.stopWork()
	targets := slices.SortedFunc(maps.Keys(roots), storepath.Compare)
	n := 0
	for _, t := range targets {
		n += len(roots[t])
	}
	c.out.U64(uint64(n))
	for _, t := range targets {
		links := slices.Sorted(slices.Values(roots[t]))
		for _, l := range links {
			c.out.String(l)
			c.out.Path(c.dir, t)
		}
	}
	return nil
}

func opCollectGarbageHandler(ctx context.Context, c *conn) error {
	var opts store.GCOptions
	opts.Action = store.GCAction(c.in.U64Max("action", uint64(store.GCDeleteSpecific)))
	opts.Paths = c.in.Paths("pathsToDelete", c.dir)
	opts.IgnoreLiveness = c.in.Bool("ignoreLiveness")
	opts.MaxFreed = c.in.U64("maxFreed")
	c.in.U64("obsolete")
	c.in.U64("obsolete")
	c.in.U64("obsolete")
	if err := c.begin(wire.OpCollectGarbage); err != nil {
		return err
	}
	if opts.IgnoreLiveness {
		return errors.New("you are not allowed to ignore liveness")
	}
	if err := c.checkJobGC(opts.Action); err != nil {
		return err
	}
	// As nix-daemon: a trusted client's keep-outputs and keep-derivations
	// decide what its collection keeps.
	opts.KeepOutputs = c.overrideBool("keep-outputs")
	opts.KeepDerivations = c.overrideBool("keep-derivations")
	res, err := c.st.CollectGarbage(ctx, opts, c.gcLog())
	if err != nil {
		return err // in Nix's words ("Cannot delete path '…' since it is still alive. …")
	}
	c.stopWork()
	c.out.StringSet(res.Paths)
	c.out.U64(res.BytesFreed)
	c.out.U64(0) // obsolete
	return nil
}

func opOptimiseStoreHandler(ctx context.Context, c *conn) error {
	if err := c.begin(wire.OpOptimiseStore); err != nil {
		return err
	}
	// As Nix's optimiseStore: the paths done of all on its activity, and
	// an activity for each path, with the files it links.
	act := c.tun.StartActivity(lvlError, actOptimiseStore, "", nil, 0)
	var freed, linked uint64
	var pathAct uint64
	endPath := func() {
		if pathAct != 0 {
			c.tun.StopActivity(pathAct)
			pathAct = 0
		}
	}
	err := c.st.OptimiseStore(ctx, store.OptimiseEvents{
		Progress: func(done, total int) {
			endPath()
			c.tun.Result(act, resProgress, []field{uint64(done), uint64(total), uint64(0), uint64(0)})
		},
		Path: func(abs string) {
			pathAct = c.tun.StartActivity(lvlTalkative, actUnknown, fmt.Sprintf("optimising path '%s'", abs), nil, 0)
		},
		Linked: func(bytesFreed, blocksFreed uint64) {
			freed += bytesFreed
			linked++
			c.tun.Result(pathAct, resFileLinked, []field{bytesFreed, blocksFreed})
		},
		Log: c.storeLog,
	})
	endPath()
	c.tun.StopActivity(act)
	if err != nil {
		return fmt.Errorf("optimising the store: %w", err)
	}
	c.tun.Log(lvlInfo, fmt.Sprintf("%.2f MiB freed by hard-linking %d files", float64(freed)/(1<<20), linked))
	c.stopWork()
	c.out.U64(1)
	return nil
}

// storeLog sends the client a message of the store's optimise or verify,
// at the level Nix prints it (store.LogLevel numbers levels as Nix does).
func (c *conn) storeLog(l store.LogLevel, msg string) { c.tun.LogText(Verbosity(l), msg) }

func opVerifyStoreHandler(ctx context.Context, c *conn) error {
	checkContents := c.in.Bool("checkContents")
	repair := c.in.Bool("repair")
	if err := c.begin(wire.OpVerifyStore); err != nil {
		return err
	}
	if repair && !c.peer.trusted {
		return c.untrusted("you are not privileged to repair paths")
	}
	var repairPath func(context.Context, storepath.Path) error
	endRepairs := func() {}
	if repair {
		repairPath, endRepairs = c.verifyRepairer()
	}
	errorsFound, err := c.st.VerifyStore(ctx, checkContents, repair, repairPath, c.storeLog)
	endRepairs()
	if err != nil {
		return fmt.Errorf("verifying the store: %w", err)
	}
	c.stopWork()
	c.out.Bool(errorsFound)
	return nil
}

// verifyRepairer returns what VerifyStore calls to repair a path, with
// each repair's download or build shown as Nix shows it, before what
// verify says next, and what ends that progress once VerifyStore has
// returned. If the connection's caches cannot be set up (realiser
// fails), it returns no repairer.
func (c *conn) verifyRepairer() (repairPath func(context.Context, storepath.Path) error, end func()) {
	r, err := c.realiser()
	if err != nil {
		return nil, func() {}
	}
	prog, bprog := c.newSubstProgress(nil), newBuildProgress(c.tun, map[string]bool{})
	repairPath = func(ctx context.Context, p storepath.Path) error {
		// The failure of the path's own derivation is the repair's.
		if info, err := c.st.QueryPathInfo(ctx, p); err == nil && !info.Deriver.IsZero() {
			bprog.addTop(c.dir.Abs(info.Deriver))
		}
		ctx = withBuildRequest(substitute.WithProgress(ctx, prog), c.buildOptions(buildModeNormal), bprog)
		err := r.RepairPath(ctx, p)
		prog.Flush()
		return err
	}
	return repairPath, func() {
		prog.close()
		bprog.close()
	}
}
