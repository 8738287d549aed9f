// Command nixyard-bench runs the same work against the stock nix-daemon and
// nixyard, on identical fresh chroot stores on a file system made for the
// run, and prints a table of medians and speed-ups:
//
//   - QueryPathInfo requests per second over 1 and over N concurrent
//     connections (one request in flight per connection) on a store of a few
//     thousand small paths with references;
//   - `nix copy --to unix://…` of a few hundred paths of random data (about
//     500 MB) from a source chroot store into a fresh empty daemon store:
//     wall time and MB/s;
//   - substitution (substitute.go): `nix-store -r` of a ~600 MB closure from
//     a local HTTP binary cache (zstd and xz) into an empty store, by one
//     client and by N at once (GETs per NAR counted by the server), and warm.
//     Its table goes to its own section of the docs;
//   - builds (builds.go), and a small nix-store --add while another job's
//     data waits to be written back (dirty.go).
//
// It needs root (mount, loop devices) and Nix 2.8 on PATH. Everything lives
// under a temporary directory; the scratch file system, daemons and their
// forked children are removed at the end, also on Ctrl-C or timeout.
// scripts/bench.sh builds nixyard and this command and runs it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/nixyard/nixyard/bench"
	"github.com/nixyard/nixyard/internal/pagecache"
)

type options struct {
	bench.RunFlags
	nixyardRev  string
	qpiPaths    int
	qpiConns    []int
	qpiDuration time.Duration
	qpiWarmup   time.Duration
	copyPaths   int
	copyMB      int64
	docs        string
	command     string
	keep        bool
	skipQPI     bool
	skipCopy    bool
	skipBuilds  bool
	skipDirty   bool
	dirtyMB     int
	// buildsMaxJobs is both daemons' max-jobs in the builds scenario.
	buildsMaxJobs int
}

// parse parses the command line into o.
func (o *options) parse() error {
	o.Register(flag.CommandLine, "path of the nixyard binary (empty: measure nix-daemon only)", 3072, 5)
	flag.StringVar(&o.nixyardRev, "nixyard-rev", "", "nixyard revision, for the report")
	flag.IntVar(&o.qpiPaths, "qpi-paths", 5000, "number of paths in the QueryPathInfo store")
	o.qpiConns = []int{1, 8}
	flag.Var((*bench.Counts)(&o.qpiConns), "qpi-conns", "comma-separated connection counts for the QueryPathInfo load")
	flag.DurationVar(&o.qpiDuration, "qpi-duration", 5*time.Second, "duration of each QueryPathInfo measurement")
	flag.DurationVar(&o.qpiWarmup, "qpi-warmup", time.Second, "untimed warm-up before each QueryPathInfo measurement")
	flag.IntVar(&o.copyPaths, "copy-paths", 400, "number of paths copied by nix copy")
	flag.Int64Var(&o.copyMB, "copy-mb", 500, "approximate total size in MB (10^6 bytes) of the copied file contents")
	flag.StringVar(&o.docs, "docs", "", "rewrite the generated results section of this Markdown file (e.g. docs/benchmarks.md)")
	flag.StringVar(&o.command, "command", "scripts/bench.sh", "command line to record in the report")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directory's logs (the scratch file system is always removed)")
	flag.BoolVar(&o.skipQPI, "skip-qpi", false, "skip the QueryPathInfo measurements")
	flag.BoolVar(&o.skipCopy, "skip-copy", false, "skip the nix copy measurements")
	flag.BoolVar(&o.skipBuilds, "skip-builds", false, "skip the builds measurements")
	flag.BoolVar(&o.skipDirty, "skip-dirty", false, "skip the add next to another job's unwritten data")
	flag.IntVar(&o.dirtyMB, "dirty-mb", 1024, "MB of another job's unwritten data in the other-job scenario")
	flag.IntVar(&o.buildsMaxJobs, "builds-max-jobs", 2, "the daemons' max-jobs in the builds scenario")
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	return o.Check()
}

func main() {
	bench.MaybeServeNull(os.Args)
	var o options
	bench.Main("nixyard-bench", &o.RunFlags, o.parse, func(ctx context.Context) error { return run(ctx, o) })
}

// bencher holds the state of one run.
type bencher struct {
	o       options
	env     *bench.Env
	work    string
	mnt     string
	logs    string
	daemons []bench.DaemonSpec
	running map[*bench.Daemon]bool
	logSeq  int
	load0   string // /proc/loadavg at the start
}

var logf = bench.Logf

func run(ctx context.Context, o options) (err error) {
	b := &bencher{o: o, running: map[*bench.Daemon]bool{}, load0: bench.LoadAvg()}
	b.daemons = []bench.DaemonSpec{bench.StockDaemon()}
	if o.Nixyard != "" {
		abs, err := filepath.Abs(o.Nixyard)
		if err != nil {
			return err
		}
		if _, err := os.Stat(abs); err != nil {
			return fmt.Errorf("nixyard binary: %w", err)
		}
		b.daemons = append(b.daemons, bench.NixyardDaemon(abs))
	}
	ws, err := bench.Setup(ctx, o.RunFlags, "nyb.", o.keep, "nix", "nix-store", "nix-daemon", "mount", "umount", "mkfs.ext4")
	if err != nil {
		return err
	}
	b.env, b.work, b.logs, b.mnt = ws.Env, ws.Dir, ws.Logs, ws.Mnt
	fsDesc := ws.Scratch.Describe()
	defer func() {
		for d := range b.running {
			if serr := d.Stop(); serr != nil {
				err = errors.Join(err, serr)
			}
		}
		if uerr := ws.Close(); uerr != nil {
			err = errors.Join(err, uerr)
		}
		logf("cleaned up (daemons stopped, %s unmounted)", b.mnt)
	}()

	var metrics []*bench.Metric
	if !o.skipQPI {
		ms, err := b.benchQPI(ctx)
		metrics = append(metrics, ms...)
		if err != nil {
			return err
		}
	}
	if !o.skipCopy {
		ms, err := b.benchCopy(ctx)
		metrics = append(metrics, ms...)
		if err != nil {
			return err
		}
	}

	if !o.skipBuilds {
		ms, err := b.benchBuilds(ctx)
		metrics = append(metrics, ms...)
		if err != nil {
			return err
		}
	}
	if !o.skipDirty {
		ms, err := b.benchDirty(ctx)
		metrics = append(metrics, ms...)
		if err != nil {
			return err
		}
	}
	if len(metrics) > 0 {
		report := b.report(metrics, fsDesc)
		fmt.Println(report)
		if o.docs != "" {
			if err := bench.RewriteSection(o.docs, report); err != nil {
				return err
			}
			logf("rewrote the results section of %s", o.docs)
		}
	}
	if !substFlags.skip {
		report, err := b.benchSubstitute(ctx, fsDesc)
		if err != nil {
			return err
		}
		fmt.Println(report)
		if o.docs != "" {
			if err := bench.RewriteSubstSection(o.docs, report); err != nil {
				return err
			}
			logf("rewrote the substitution results section of %s", o.docs)
		}
	}
	return nil
}

func (b *bencher) start(ctx context.Context, spec bench.DaemonSpec, root string) (*bench.Daemon, error) {
	b.logSeq++
	d, err := bench.StartDaemon(ctx, b.env, spec, root, filepath.Join(b.logs, fmt.Sprintf("%02d-%s-%s.log", b.logSeq, spec.Name, filepath.Base(root))))
	if err != nil {
		return nil, err
	}
	b.running[d] = true
	return d, nil
}

func (b *bencher) stop(d *bench.Daemon) error {
	delete(b.running, d)
	return d.Stop()
}

// importSource writes a generated export stream into a new local chroot
// store at root (see bench.ImportSource).
func (b *bencher) importSource(ctx context.Context, root string, spec bench.ExportSpec) ([]bench.PathInfo, error) {
	start := time.Now()
	infos, err := bench.ImportSource(ctx, b.env, root, spec)
	if err != nil {
		return nil, err
	}
	logf("source store %s: %d paths imported in %.1f s", root, len(infos), time.Since(start).Seconds())
	return infos, nil
}

// copyAll runs `nix copy --all` from the source chroot store to storeURL.
func (b *bencher) copyAll(ctx context.Context, src, storeURL string) (bench.ClientRun, error) {
	return bench.RunClient(ctx, b.env, nil, "nix", "copy", "--no-check-sigs", "--all",
		"--from", "local?root="+src, "--to", storeURL)
}

// syncAndCheck, after a client filled d's store, times a syncfs of the
// scratch file system, calls afterSync (if not nil), then checks that
// paths are valid in d and returns their total NAR size.
func (b *bencher) syncAndCheck(ctx context.Context, d *bench.Daemon, paths []string, afterSync func()) (syncDur time.Duration, narBytes uint64, err error) {
	t := time.Now()
	if err := pagecache.SyncFS(b.mnt); err != nil {
		return 0, 0, err
	}
	syncDur = time.Since(t)
	if afterSync != nil {
		afterSync()
	}
	narBytes, err = bench.CheckValid(ctx, d.Socket, paths)
	return syncDur, narBytes, err
}

func pathsOf(infos []bench.PathInfo) []string {
	ps := make([]string, len(infos))
	for i, p := range infos {
		ps[i] = p.Path
	}
	return ps
}

// order returns the daemons in rotating order for repetition rep, so that
// neither always runs first.
func (b *bencher) order(rep int) []int {
	idx := make([]int, len(b.daemons))
	for i := range idx {
		idx[i] = (i + rep) % len(b.daemons)
	}
	return idx
}

func setErr(m *bench.Metric, name string, err error) {
	if name == "nixyard" {
		if m.NixyardErr == nil {
			m.NixyardErr = err
		}
	} else if m.StockErr == nil {
		m.StockErr = err
	}
}

func addSample(m *bench.Metric, name string, v float64) {
	if name == "nixyard" {
		m.Nixyard = append(m.Nixyard, v)
	} else {
		m.Stock = append(m.Stock, v)
	}
}

func (b *bencher) benchQPI(ctx context.Context) ([]*bench.Metric, error) {
	o := b.o
	src := filepath.Join(b.mnt, "src-q")
	infos, err := b.importSource(ctx, src, bench.ExportSpec{
		Seed: 1, Count: o.qpiPaths, TotalBytes: int64(o.qpiPaths) * 512, MaxRefs: 4, Name: "qpi",
	})
	if err != nil {
		return nil, err
	}
	paths := pathsOf(infos)
	populate := &bench.Metric{Name: fmt.Sprintf("populate: nix copy of %d small paths", len(paths)), Unit: "s"}
	var load []*bench.Metric
	for _, n := range o.qpiConns {
		load = append(load, &bench.Metric{
			Name: fmt.Sprintf("QueryPathInfo, %d connection%s", n, map[bool]string{true: "s"}[n > 1]),
			Unit: "req/s", HigherBetter: true, Target: "≥ 2×",
		})
	}
	// The null server's rate, in the nixyard column, against the stock
	// daemon's of the same repetition: the speed-up no daemon can pass
	// with this load client on this machine.
	var ceiling []*bench.Metric
	for _, n := range o.qpiConns {
		ceiling = append(ceiling, &bench.Metric{
			Name: fmt.Sprintf("ceiling: QueryPathInfo, %d connection%s, a null server (one canned reply, no work) in nixyard's column", n, map[bool]string{true: "s"}[n > 1]),
			Unit: "req/s", HigherBetter: true,
		})
	}
	// The real client's view of the same queries: one `nix path-info` of
	// every path, which sends one QueryMissing for them all, then one
	// QueryPathInfo per path, over one connection. Its own start-up and
	// threads are in the time.
	realClient := &bench.Metric{Name: fmt.Sprintf("the real client: nix path-info of the %d paths (QueryMissing, then one QueryPathInfo each, one connection)", len(paths)), Unit: "s"}
	all := append(append(load, ceiling...), realClient, populate)

	// One daemon per kind on its own store, populated the same way.
	live := make([]*bench.Daemon, len(b.daemons))
	var narSums []uint64
	for i, spec := range b.daemons {
		d, err := b.start(ctx, spec, filepath.Join(b.mnt, "q-"+spec.Name))
		if err != nil {
			setErr(populate, spec.Name, err)
			for _, m := range append(load, realClient) {
				setErr(m, spec.Name, err)
			}
			logf("%s: %v", spec.Name, err)
			continue
		}
		run, err := b.copyAll(ctx, src, d.StoreURL())
		dur := run.Wall
		if err == nil {
			var sum uint64
			if sum, err = bench.CheckValid(ctx, d.Socket, paths); err == nil {
				narSums = append(narSums, sum)
			}
		}
		if err != nil {
			logf("%s: populating: %v", spec.Name, err)
			setErr(populate, spec.Name, err)
			for _, m := range append(load, realClient) {
				setErr(m, spec.Name, err)
			}
			b.stop(d)
			continue
		}
		addSample(populate, spec.Name, dur.Seconds())
		logf("%s: populated %d paths in %.2f s", spec.Name, len(paths), dur.Seconds())
		live[i] = d
	}
	if len(narSums) == 2 && narSums[0] != narSums[1] {
		logf("WARNING: the daemons report different total NAR sizes (%d vs %d)", narSums[0], narSums[1])
	}
	if err := ctx.Err(); err != nil {
		return all, err
	}
	null, err := b.startNullServer(ctx, infos[0])
	if err != nil {
		logf("null server: %v", err)
		for _, m := range ceiling {
			setErr(m, "nixyard", err)
		}
	} else {
		defer null.Stop()
	}

	for rep := range o.Reps {
		for mi, n := range o.qpiConns {
			var stockRate float64 // this repetition's, 0 if none
			for _, i := range b.order(rep + mi) {
				d := live[i]
				if d == nil {
					continue
				}
				res, err := bench.QueryPathInfoLoad(ctx, d.Socket, paths, n, o.qpiWarmup, o.qpiDuration)
				if err != nil {
					if ctx.Err() != nil {
						return all, ctx.Err()
					}
					logf("%s: QueryPathInfo ×%d: %v", d.Spec.Name, n, err)
					setErr(load[mi], d.Spec.Name, err)
					continue
				}
				addSample(load[mi], d.Spec.Name, res.PerSecond())
				if d.Spec.Name != "nixyard" {
					stockRate = res.PerSecond()
				}
				logf("rep %d: %s: QueryPathInfo over %d connection(s): %d requests in %.2f s = %.0f req/s",
					rep+1, d.Spec.Name, n, res.Requests, res.Elapsed.Seconds(), res.PerSecond())
			}
			if null == nil || stockRate == 0 {
				continue // nothing to set the null server's rate against
			}
			res, err := bench.QueryPathInfoLoad(ctx, null.Socket, paths, n, o.qpiWarmup, o.qpiDuration)
			if err != nil {
				if ctx.Err() != nil {
					return all, ctx.Err()
				}
				logf("null server: QueryPathInfo ×%d: %v", n, err)
				setErr(ceiling[mi], "nixyard", err)
				continue
			}
			ceiling[mi].Stock = append(ceiling[mi].Stock, stockRate)
			ceiling[mi].Nixyard = append(ceiling[mi].Nixyard, res.PerSecond())
			logf("rep %d: null server: QueryPathInfo over %d connection(s): %d requests in %.2f s = %.0f req/s",
				rep+1, n, res.Requests, res.Elapsed.Seconds(), res.PerSecond())
		}
		for _, i := range b.order(rep) {
			d := live[i]
			if d == nil {
				continue
			}
			run, err := bench.RunClient(ctx, b.env, nil, "nix", append([]string{"path-info", "--store", d.StoreURL()}, paths...)...)
			if err != nil {
				if ctx.Err() != nil {
					return all, ctx.Err()
				}
				logf("%s: nix path-info: %v", d.Spec.Name, err)
				setErr(realClient, d.Spec.Name, err)
				continue
			}
			addSample(realClient, d.Spec.Name, run.Wall.Seconds())
			logf("rep %d: %s: nix path-info of %d paths: %.3f s (client CPU %.2f s)",
				rep+1, d.Spec.Name, len(paths), run.Wall.Seconds(), run.CPU.Seconds())
		}
	}
	for _, d := range live {
		if d != nil {
			if err := b.stop(d); err != nil {
				logf("stopping %s: %v", d.Spec.Name, err)
			}
		}
	}
	return all, nil
}

// startNullServer starts bench's null server from this binary, answering
// with the canned reply for p.
func (b *bencher) startNullServer(ctx context.Context, p bench.PathInfo) (*bench.NullServer, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	return bench.StartNullServer(ctx, self, b.work, p)
}

func (b *bencher) benchCopy(ctx context.Context) ([]*bench.Metric, error) {
	o := b.o
	src := filepath.Join(b.mnt, "src-c")
	infos, err := b.importSource(ctx, src, bench.ExportSpec{
		Seed: 2, Count: o.copyPaths, TotalBytes: o.copyMB * 1e6, MaxRefs: 3, Name: "copy",
	})
	if err != nil {
		return nil, err
	}
	paths := pathsOf(infos)
	// The same shapes and sizes as content-addressed paths, as `nix-store
	// --add` and fixed-output builds make them: the stock daemon hashes
	// each of these twice (the NAR, then the path again from disk for its
	// CA), nixyard once.
	caSrc := filepath.Join(b.mnt, "src-ca")
	start := time.Now()
	caPaths, err := bench.AddSource(ctx, b.env, caSrc, bench.ExportSpec{
		Seed: 4, Count: o.copyPaths, TotalBytes: o.copyMB * 1e6, Name: "ca",
	})
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(caSrc)
	logf("source store %s: %d content-addressed paths added in %.1f s", caSrc, len(caPaths), time.Since(start).Seconds())
	wall := &bench.Metric{Name: fmt.Sprintf("nix copy of %d paths into an empty store: wall time", len(paths)), Unit: "s", Target: "≥ 1.2×"}
	rate := &bench.Metric{Name: "nix copy: throughput (NAR bytes / wall time)", Unit: "MB/s", HigherBetter: true, Target: "≥ 1.2×"}
	durable := &bench.Metric{Name: "nix copy, then syncfs: wall time", Unit: "s"}
	cpu := &bench.Metric{Name: "nix copy: daemon CPU time", Unit: "s"}
	clientCPU := &bench.Metric{Name: "nix copy: the client's CPU time", Unit: "s"}
	// All the CPU work the copy caused, up to the end of a syncfs after
	// it: the client, the daemon and kernel threads (writeback, the loop
	// device's worker); divided by the number of CPUs, the least wall time
	// that work allows.
	machineCPU := &bench.Metric{Name: "nix copy, then syncfs: busy CPU time of the whole machine (all processes and kernel threads)", Unit: "s"}
	cpuBound := &bench.Metric{Name: fmt.Sprintf("nix copy, then syncfs: that busy time ÷ %d CPUs (least wall time for that much work)", runtime.NumCPU()), Unit: "s"}
	// The least time a daemon that makes the bytes durable before it
	// answers can take (bench.DurableCopy), in nixyard's column, against
	// the stock daemon's copy of the same repetition.
	ceiling := &bench.Metric{Name: "ceiling: the same files copied plainly and made durable (no protocol, hashing or database) in nixyard's column", Unit: "s"}
	// The least time the client takes to send the upload: a copy into
	// the null server, which drops it.
	nullCeiling := &bench.Metric{Name: "ceiling: nix copy into a null server (drops the upload) in nixyard's column", Unit: "s"}
	caWall := &bench.Metric{Name: fmt.Sprintf("nix copy of %d content-addressed paths (as nix-store --add makes them, same sizes) into an empty store: wall time", len(caPaths)), Unit: "s"}
	caCPU := &bench.Metric{Name: "nix copy of the content-addressed paths: daemon CPU time", Unit: "s"}
	daemonMetrics := []*bench.Metric{wall, rate, durable, cpu, clientCPU, machineCPU, cpuBound}
	all := append(daemonMetrics, ceiling, nullCeiling, caWall, caCPU)
	null, err := b.startNullServer(ctx, infos[0])
	if err != nil {
		logf("null server: %v", err)
		setErr(nullCeiling, "nixyard", err)
	} else {
		defer null.Stop()
	}
	if err := pagecache.SyncFS(b.mnt); err != nil {
		return all, err
	}
	// rep -1 is an untimed warm-up copy per daemon: the first copy after the
	// source import ran over 2× slower than later ones whichever daemon ran
	// it, and would otherwise penalise the daemon that goes first.
	failed := map[string]bool{}
	for rep := -1; rep < o.Reps; rep++ {
		var stockTime float64 // this repetition's copy into the stock daemon, 0 if none
		for _, i := range b.order(max(rep, 0)) {
			spec := b.daemons[i]
			if failed[spec.Name] {
				continue
			}
			c, err, cerr := b.timedCopy(ctx, spec, src, fmt.Sprintf("c-%s-%d", spec.Name, rep+1), paths)
			if cerr != nil {
				return all, cerr
			}
			switch {
			case ctx.Err() != nil:
				return all, ctx.Err()
			case err != nil:
				logf("rep %d: %s: nix copy: %v", rep+1, spec.Name, err)
				for _, m := range daemonMetrics {
					setErr(m, spec.Name, err)
				}
				if rep < 0 {
					failed[spec.Name] = true
				}
			case rep < 0:
				logf("warm-up: %s: nix copy of %d paths: %.2f s (not counted)", spec.Name, len(paths), c.wall.Seconds())
			default:
				mbps := float64(c.narBytes) / 1e6 / c.wall.Seconds()
				addSample(wall, spec.Name, c.wall.Seconds())
				if spec.Name != "nixyard" {
					stockTime = c.wall.Seconds()
				}
				addSample(rate, spec.Name, mbps)
				addSample(durable, spec.Name, (c.wall + c.sync).Seconds())
				sampleOrErr(cpu, spec.Name, c.daemonCPU.Seconds(), c.cpuErr)
				addSample(clientCPU, spec.Name, c.clientCPU.Seconds())
				sampleOrErr(machineCPU, spec.Name, c.busy.Seconds(), c.busyErr)
				sampleOrErr(cpuBound, spec.Name, c.busy.Seconds()/float64(max(c.ncpu, 1)), c.busyErr)
				logf("rep %d: %s: nix copy of %d paths, %.1f MB of NAR: %.2f s (%.1f MB/s), +syncfs %.2f s, daemon CPU %.2f s, client CPU %.2f s",
					rep+1, spec.Name, len(paths), float64(c.narBytes)/1e6, c.wall.Seconds(), mbps, c.sync.Seconds(), c.daemonCPU.Seconds(), c.clientCPU.Seconds())
			}
		}
		if rep >= 0 && stockTime > 0 {
			if err := b.durableCeiling(ctx, src, rep, stockTime, ceiling); err != nil {
				return all, err
			}
			if null != nil {
				b.nullCopyCeiling(ctx, src, null, rep, stockTime, nullCeiling)
			}
		}
		for _, i := range b.order(max(rep, 0) + 1) {
			spec := b.daemons[i]
			if failed[spec.Name] {
				continue
			}
			c, err, cerr := b.timedCopy(ctx, spec, caSrc, fmt.Sprintf("ca-%s-%d", spec.Name, rep+1), caPaths)
			if cerr != nil {
				return all, cerr
			}
			if ctx.Err() != nil {
				return all, ctx.Err()
			}
			if rep < 0 {
				continue // the untimed warm-up of this copy too
			}
			if err != nil {
				logf("rep %d: %s: nix copy of the content-addressed paths: %v", rep+1, spec.Name, err)
				setErr(caWall, spec.Name, err)
				setErr(caCPU, spec.Name, err)
				continue
			}
			addSample(caWall, spec.Name, c.wall.Seconds())
			sampleOrErr(caCPU, spec.Name, c.daemonCPU.Seconds(), c.cpuErr)
			logf("rep %d: %s: nix copy of %d content-addressed paths, %.1f MB of NAR: %.2f s, daemon CPU %.2f s",
				rep+1, spec.Name, len(caPaths), float64(c.narBytes)/1e6, c.wall.Seconds(), c.daemonCPU.Seconds())
		}
	}
	return all, nil
}

// copyRun is one timed `nix copy` into a fresh daemon (timedCopy).
type copyRun struct {
	wall, sync           time.Duration // the copy; the syncfs after it
	daemonCPU, clientCPU time.Duration
	cpuErr               error         // daemonCPU not measured
	busy                 time.Duration // the machine's busy CPU time, to the end of the syncfs
	ncpu                 int
	busyErr              error // busy not measured
	narBytes             uint64
}

// timedCopy starts spec on a fresh empty store (directory name on the
// scratch file system), syncs the file system, copies every path of the
// source store src into it with the real client, then times a syncfs and
// checks that paths are valid. err is the copy's failure. The daemon is
// stopped and its store removed (and the removal synced) whatever happens;
// cleanupErr is a failure of that, which leaves the scratch file system
// unfit for further measurements.
func (b *bencher) timedCopy(ctx context.Context, spec bench.DaemonSpec, src, name string, paths []string) (c copyRun, err, cleanupErr error) {
	root := filepath.Join(b.mnt, name)
	defer func() {
		if rerr := os.RemoveAll(root); rerr != nil {
			cleanupErr = fmt.Errorf("removing %s: %w", root, rerr)
		} else {
			cleanupErr = pagecache.SyncFS(b.mnt)
		}
	}()
	d, err := b.start(ctx, spec, root)
	if err != nil {
		return c, err, nil
	}
	var dcpu *daemonCPU
	defer func() {
		if serr := b.stop(d); serr != nil {
			logf("stopping %s: %v", spec.Name, serr)
		}
		// A cgroup can be removed only once its processes are gone.
		if dcpu != nil {
			if cerr := dcpu.close(); cerr != nil {
				logf("%v", cerr)
			}
		}
	}()
	if err := pagecache.SyncFS(b.mnt); err != nil {
		return c, err, nil
	}
	dcpu = newDaemonCPU(d)
	busy0, ncpu, busyErr := bench.MachineBusy()
	run, err := b.copyAll(ctx, src, d.StoreURL())
	if err != nil {
		return c, err, nil
	}
	c.wall, c.clientCPU, c.ncpu = run.Wall, run.CPU, ncpu
	c.daemonCPU, c.cpuErr = dcpu.since(0)
	// The machine's busy time runs to the end of the syncfs, so that the
	// stock daemon's deferred writeback counts too.
	busy1 := busy0
	c.sync, c.narBytes, err = b.syncAndCheck(ctx, d, paths, func() {
		var berr error
		busy1, _, berr = bench.MachineBusy()
		busyErr = errors.Join(busyErr, berr)
	})
	c.busy, c.busyErr = busy1-busy0, busyErr
	return c, err, nil
}

// nullCopyCeiling times a copy of the source store into the null server
// and records it against the stock daemon's copy time of the same
// repetition.
func (b *bencher) nullCopyCeiling(ctx context.Context, src string, null *bench.NullServer, rep int, stock float64, m *bench.Metric) {
	run, err := b.copyAll(ctx, src, "unix://"+null.Socket)
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		logf("rep %d: nix copy into the null server: %v", rep+1, err)
		setErr(m, "nixyard", err)
		return
	}
	m.Stock = append(m.Stock, stock)
	m.Nixyard = append(m.Nixyard, run.Wall.Seconds())
	logf("rep %d: nix copy into the null server: %.2f s, client CPU %.2f s", rep+1, run.Wall.Seconds(), run.CPU.Seconds())
}

// durableCeiling times bench.DurableCopy of the source store's files and
// records it against the stock daemon's copy time of the same repetition.
func (b *bencher) durableCeiling(ctx context.Context, src string, rep int, stock float64, m *bench.Metric) error {
	dst := filepath.Join(b.mnt, fmt.Sprintf("plain-%d", rep+1))
	dur, err := bench.DurableCopy(ctx, filepath.Join(src, "nix/store"), dst)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		logf("rep %d: plain durable copy: %v", rep+1, err)
		setErr(m, "nixyard", err)
	} else {
		m.Stock = append(m.Stock, stock)
		m.Nixyard = append(m.Nixyard, dur.Seconds())
		logf("rep %d: plain durable copy of the same files: %.2f s", rep+1, dur.Seconds())
	}
	if err := os.RemoveAll(dst); err != nil {
		return fmt.Errorf("removing %s: %w", dst, err)
	}
	return pagecache.SyncFS(b.mnt)
}

func readTrim(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}

func cpuModel() string {
	for _, l := range strings.Split(readTrim("/proc/cpuinfo"), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

func memTotal() string {
	v, err := pagecache.Meminfo("MemTotal:")
	if err != nil {
		return "?"
	}
	return fmt.Sprintf("%.1f GiB", float64(v[0])/(1<<30))
}

func (b *bencher) report(ms []*bench.Metric, fsDesc string) string {
	o := b.o
	var s strings.Builder
	b.writeReportHeader(&s, "stores on "+fsDesc, b.load0)
	fmt.Fprintf(&s, "Work: QueryPathInfo on a store of %d paths, %d repetitions of %s each (after %s warm-up), connection counts %v; "+
		"nix copy of %d paths (~%d MB of random file contents) into a fresh empty store, %d repetitions, "+
		"and of %d content-addressed paths of the same sizes.\n\n",
		o.qpiPaths, o.Reps, o.qpiDuration, o.qpiWarmup, o.qpiConns, o.copyPaths, o.copyMB, o.Reps, o.copyPaths)
	if len(b.daemons) < 2 {
		s.WriteString("**nixyard was not measured in this run (no binary given).**\n\n")
	}
	s.WriteString(bench.Table(ms))
	return s.String()
}

// writeReportHeader writes the lines every report starts with: the
// command, the machine and where the stores are, the versions, and the
// load average at start (load0) and now.
func (b *bencher) writeReportHeader(s *strings.Builder, storesOn, load0 string) {
	nixVersion := "?"
	if out, err := bench.Nix(context.Background(), b.env, nil, "nix", "--version"); err == nil {
		nixVersion = strings.TrimSpace(string(out))
	}
	rev := b.o.nixyardRev
	if rev == "" {
		rev = "unknown revision"
	}
	fmt.Fprintf(s, "Command: `%s`, run %s.\n\n", b.o.command, time.Now().UTC().Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(s, "Machine: %d CPUs (%s), %s RAM, kernel %s; %s. Stock daemon: %s; nixyard: %s.\n\n",
		runtime.NumCPU(), cpuModel(), memTotal(), readTrim("/proc/sys/kernel/osrelease"), storesOn, nixVersion, rev)
	fmt.Fprintf(s, "Load average (1/5/15 min) at the start: %s; at the end: %s.\n\n", load0, bench.LoadAvg())
}
