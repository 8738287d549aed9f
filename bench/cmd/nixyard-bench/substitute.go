package main

// The substitution scenario (issue 3): both daemons realise the same closure
// from the same local HTTP binary cache, cold (empty store, one client),
// with several clients at once, and warm (closure already valid).

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nixyard/nixyard/bench"
	"github.com/nixyard/nixyard/internal/pagecache"
)

// substFlags are the scenario's flags (registered here so the scenario
// stays in this file).
var substFlags struct {
	skip    bool
	paths   int
	mb      int64
	clients int
	warm    int
	random  bool
}

func init() {
	flag.BoolVar(&substFlags.skip, "skip-subst", false, "skip the substitution measurements")
	flag.IntVar(&substFlags.paths, "subst-paths", 400, "number of paths in the substituted closure")
	flag.Int64Var(&substFlags.mb, "subst-mb", 600, "approximate total size in MB of the substituted file contents")
	flag.IntVar(&substFlags.clients, "subst-clients", 8, "number of concurrent clients in the substitution scenario")
	flag.IntVar(&substFlags.warm, "subst-warm", 3, "warm nix-store -r runs per repetition (their median is one sample)")
	flag.BoolVar(&substFlags.random, "subst-random", false, "incompressible file contents (default: about 2:1 compressible, so decompression costs CPU as with real closures)")
}

// substCache is one binary cache made for the run and its server.
type substCache struct {
	comp string // zstd, xz
	dir  string
	srv  *bench.CacheServer
}

// substRun is a daemon started for one measurement, with its own
// environment (nix.conf pointing at the cache, empty narinfo disk caches).
type substRun struct {
	d    *bench.Daemon
	env  *bench.Env
	work string
	cpu  *daemonCPU
}

var substSeq int

func (b *bencher) startSubst(ctx context.Context, spec bench.DaemonSpec, c *substCache, tag string) (*substRun, error) {
	substSeq++
	work := filepath.Join(b.work, fmt.Sprintf("s%02d-%s-%s", substSeq, spec.Name, tag))
	env, err := bench.NewSubstEnv(work, c.srv.URL)
	if err != nil {
		return nil, err
	}
	root := filepath.Join(b.mnt, fmt.Sprintf("s%02d-%s", substSeq, spec.Name))
	b.logSeq++
	d, err := bench.StartDaemon(ctx, env, spec, root,
		filepath.Join(b.logs, fmt.Sprintf("%02d-%s-subst-%s.log", b.logSeq, spec.Name, tag)))
	if err != nil {
		return nil, err
	}
	b.running[d] = true
	return &substRun{d: d, env: env, work: work, cpu: newDaemonCPU(d)}, nil
}

// finish stops the daemon and removes its store and environment.
func (b *bencher) finishSubst(r *substRun) error {
	err := b.stop(r.d)
	if cerr := r.cpu.close(); cerr != nil && err == nil {
		err = cerr
	}
	if rerr := os.RemoveAll(r.d.Root); rerr != nil {
		err = fmt.Errorf("removing %s: %w", r.d.Root, rerr)
	}
	os.RemoveAll(r.work)
	if serr := pagecache.SyncFS(b.mnt); serr != nil && err == nil {
		err = serr
	}
	return err
}

// withSubstDaemon starts spec on an empty store whose substituter is c
// (tag names its logs), syncs the scratch file system, resets the cache
// server's counts and calls fn with a context bounded to 10 minutes for
// the clients; then it stops the daemon and removes its store. A daemon
// that does not start is an error of startM, not of the run.
func (b *bencher) withSubstDaemon(ctx context.Context, spec bench.DaemonSpec, c *substCache, tag string, startM *bench.Metric, fn func(rctx context.Context, r *substRun) error) error {
	r, err := b.startSubst(ctx, spec, c, tag)
	if err != nil {
		setErr(startM, spec.Name, err)
		return nil
	}
	defer func() {
		if err := b.finishSubst(r); err != nil {
			logf("stopping %s: %v", spec.Name, err)
		}
	}()
	if err := pagecache.SyncFS(b.mnt); err != nil {
		return err
	}
	c.srv.Reset()
	rctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	return fn(rctx, r)
}

// substMetrics are the scenario's measurements.
type substMetrics struct {
	rate, wall, durable, warm, cpu    map[string]*bench.Metric // by compression (warm: zstd only)
	conc, concRatio, failed, maxGets  *bench.Metric
	concCeiling                       *bench.Metric
	concCPURatio, concClientCPU       *bench.Metric
	concWarm                          *bench.Metric
	clientCPU                         *bench.Metric
	getsPerNar, fetchedMB, singleGets *bench.Metric
	failMsgs                          map[string][]string // daemon → first lines of failed clients' errors
	failedTotal, clientsTotal         map[string]int
	paths, roots                      []string // the closure and its roots
}

func (m *substMetrics) list() []*bench.Metric {
	return []*bench.Metric{
		m.rate["zstd"], m.rate["xz"], m.wall["zstd"], m.wall["xz"], m.cpu["zstd"], m.cpu["xz"], m.clientCPU, m.durable["zstd"],
		m.singleGets, m.conc, m.concRatio, m.concCeiling, m.concCPURatio, m.concClientCPU, m.concWarm, m.failed, m.maxGets, m.getsPerNar, m.fetchedMB, m.warm["zstd"],
	}
}

func (b *bencher) benchSubstitute(ctx context.Context, fsDesc string) (string, error) {
	o, so := b.o, substFlags
	load0 := bench.LoadAvg()
	src := filepath.Join(b.mnt, "src-s")
	infos, err := b.importSource(ctx, src, bench.ExportSpec{
		Seed: 3, Count: so.paths, TotalBytes: so.mb * 1e6, MaxRefs: 3, Name: "subst",
		Compressible: !so.random,
	})
	if err != nil {
		return "", err
	}
	paths, roots := pathsOf(infos), bench.Roots(infos)
	logf("substitution closure: %d paths, %d roots", len(paths), len(roots))

	// The caches, written by the real client. xz at preset 0 with parallel
	// compression: preset 6 compresses random data at ~1.4 MB/s on one core;
	// decompression speed hardly depends on the preset.
	var caches []*substCache
	for _, c := range []struct{ comp, params string }{
		{"zstd", "compression=zstd"},
		{"xz", "compression=xz&compression-level=0&parallel-compression=true"},
	} {
		dir := filepath.Join(b.mnt, "cache-"+c.comp)
		start := time.Now()
		if _, err := bench.Nix(ctx, b.env, nil, "nix", "copy", "--no-check-sigs", "--all",
			"--from", "local?root="+src, "--to", "file://"+dir+"?"+c.params); err != nil {
			return "", fmt.Errorf("writing the %s cache: %w", c.comp, err)
		}
		srv, err := bench.ServeCache(dir)
		if err != nil {
			return "", err
		}
		defer srv.Close()
		logf("%s cache %s written in %.1f s, served at %s", c.comp, dir, time.Since(start).Seconds(), srv.URL)
		caches = append(caches, &substCache{comp: c.comp, dir: dir, srv: srv})
	}
	if err := os.RemoveAll(src); err != nil {
		return "", fmt.Errorf("removing %s: %w", src, err)
	}

	m := &substMetrics{
		rate: map[string]*bench.Metric{}, wall: map[string]*bench.Metric{}, durable: map[string]*bench.Metric{}, warm: map[string]*bench.Metric{}, cpu: map[string]*bench.Metric{},
		failMsgs: map[string][]string{}, failedTotal: map[string]int{}, clientsTotal: map[string]int{},
		paths: paths, roots: roots,
	}
	for _, c := range caches {
		m.rate[c.comp] = &bench.Metric{Name: fmt.Sprintf("cold nix-store -r, %s cache: NAR MB / wall time", c.comp), Unit: "MB/s", HigherBetter: true, Target: "≥ 1.8×"}
		m.wall[c.comp] = &bench.Metric{Name: fmt.Sprintf("cold nix-store -r, %s cache: wall time", c.comp), Unit: "s"}
		m.cpu[c.comp] = &bench.Metric{Name: fmt.Sprintf("cold nix-store -r, %s cache: daemon CPU time", c.comp), Unit: "s"}
	}
	m.durable["zstd"] = &bench.Metric{Name: "cold nix-store -r, zstd cache, then syncfs", Unit: "s"}
	m.warm["zstd"] = &bench.Metric{Name: "warm nix-store -r (closure valid)", Unit: "s", Target: "≥ 1×"}
	m.singleGets = &bench.Metric{Name: "one client: most GETs of one NAR", Unit: "count", Target: "= 1 (absolute)"}
	n := so.clients
	m.conc = &bench.Metric{Name: fmt.Sprintf("%d clients at once, zstd: wall time", n), Unit: "s"}
	m.concRatio = &bench.Metric{Name: fmt.Sprintf("%d clients: wall time / one client's", n), Unit: "ratio", Target: "≤ 1.2 (absolute)"}
	m.concCeiling = &bench.Metric{Name: fmt.Sprintf("ceiling (an estimate): %d clients / one for a daemon that costs nothing per client: "+
		"(one client's time + what %d `nix-store --version` at once take over one) / one client's time", n, n), Unit: "ratio", NoSpeedup: true}
	m.concCPURatio = &bench.Metric{Name: fmt.Sprintf("%d clients: daemon CPU time / one client's", n), Unit: "ratio"}
	m.concClientCPU = &bench.Metric{Name: fmt.Sprintf("%d clients: CPU time of the %d nix-store processes", n, n), Unit: "s"}
	m.concWarm = &bench.Metric{Name: fmt.Sprintf("%d clients at once, closure already valid (warm): wall time", n), Unit: "s"}
	m.clientCPU = &bench.Metric{Name: "cold nix-store -r, zstd cache: CPU time of the nix-store process", Unit: "s"}
	m.failed = &bench.Metric{Name: fmt.Sprintf("%d clients: failed clients", n), Unit: "count", Target: "= 0 (absolute)"}
	m.maxGets = &bench.Metric{Name: fmt.Sprintf("%d clients: most GETs of one NAR", n), Unit: "count", Target: "= 1 (absolute)"}
	m.getsPerNar = &bench.Metric{Name: fmt.Sprintf("%d clients: NAR GETs / NARs", n), Unit: "ratio"}
	m.fetchedMB = &bench.Metric{Name: fmt.Sprintf("%d clients: NAR bytes served", n), Unit: "MB"}

	single := map[string]float64{}    // daemon → this repetition's cold zstd wall time
	singleCPU := map[string]float64{} // and the daemon's CPU time in it
	for rep := -1; rep < o.Reps; rep++ {
		for k, c := range caches {
			if rep < 0 && c.comp != "zstd" {
				continue
			}
			for _, i := range b.order(max(rep, 0) + k) {
				if err := b.substCold(ctx, b.daemons[i], c, rep, m, single, singleCPU); err != nil {
					return "", err
				}
			}
		}
		if rep < 0 {
			continue
		}
		for _, i := range b.order(rep + 1) {
			if err := b.substConcurrent(ctx, b.daemons[i], caches[0], rep, m, single, singleCPU); err != nil {
				return "", err
			}
		}
	}
	return b.substReport(m, fsDesc, load0, len(paths), len(roots), caches), nil
}

func sampleOrErr(m *bench.Metric, name string, v float64, err error) {
	if err != nil {
		setErr(m, name, err)
		return
	}
	addSample(m, name, v)
}

// substCold realises the closure with one client on an empty store; for
// zstd, also the warm runs on the filled store. rep < 0 is a warm-up.
func (b *bencher) substCold(ctx context.Context, spec bench.DaemonSpec, c *substCache, rep int, m *substMetrics, single, singleCPU map[string]float64) error {
	return b.withSubstDaemon(ctx, spec, c, c.comp, m.rate[c.comp], func(rctx context.Context, r *substRun) error {
		cpu0 := r.cpu.usage()
		run, err := bench.Realise(rctx, r.env, r.d.StoreURL(), filepath.Join(r.work, "client-cache"), m.roots)
		dur := run.Wall
		cpu, cpuErr := r.cpu.since(cpu0)
		var syncDur time.Duration
		var narBytes uint64
		if err == nil {
			syncDur, narBytes, err = b.syncAndCheck(ctx, r.d, m.paths, nil)
		}
		st := c.srv.Stats()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			logf("rep %d: %s: cold %s: %v", rep+1, spec.Name, c.comp, err)
			if rep >= 0 {
				setErr(m.rate[c.comp], spec.Name, err)
				setErr(m.wall[c.comp], spec.Name, err)
			}
			return nil
		}
		mbps := float64(narBytes) / 1e6 / dur.Seconds()
		logf("rep %d: %s: cold %s: %.1f MB of NAR in %.2f s = %.1f MB/s (+syncfs %.2f s), daemon CPU %.2f s, client CPU %.2f s; server: %d NAR GETs for %d NARs (max %d), %.1f MB, %d narinfo GETs, %d HEADs; first narinfo GET at %.3f s, first NAR GET at %.3f s, last NAR sent at %.3f s",
			rep+1, spec.Name, c.comp, float64(narBytes)/1e6, dur.Seconds(), mbps, syncDur.Seconds(), cpu.Seconds(), run.CPU.Seconds(),
			st.NarGets, st.NarFiles, st.MaxNarGets, float64(st.NarBytes)/1e6, st.NarinfoGets, st.Heads,
			st.FirstNarinfo.Seconds(), st.FirstNar.Seconds(), st.LastNarDone.Seconds())
		if rep < 0 {
			return nil
		}
		addSample(m.rate[c.comp], spec.Name, mbps)
		addSample(m.wall[c.comp], spec.Name, dur.Seconds())
		sampleOrErr(m.cpu[c.comp], spec.Name, cpu.Seconds(), cpuErr)
		if c.comp != "zstd" {
			return nil
		}
		single[spec.Name] = dur.Seconds()
		addSample(m.clientCPU, spec.Name, run.CPU.Seconds())
		if cpuErr == nil {
			singleCPU[spec.Name] = cpu.Seconds()
		}
		addSample(m.durable["zstd"], spec.Name, (dur + syncDur).Seconds())
		addSample(m.singleGets, spec.Name, float64(st.MaxNarGets))

		var warm []float64
		for w := range substFlags.warm {
			c.srv.Reset()
			run, err := bench.Realise(rctx, r.env, r.d.StoreURL(), filepath.Join(r.work, fmt.Sprintf("warm-cache-%d", w)), m.roots)
			if err != nil {
				setErr(m.warm["zstd"], spec.Name, err)
				logf("rep %d: %s: warm: %v", rep+1, spec.Name, err)
				return nil
			}
			warm = append(warm, run.Wall.Seconds())
			if st := c.srv.Stats(); st.NarGets > 0 {
				logf("rep %d: %s: warm run fetched %d NARs", rep+1, spec.Name, st.NarGets)
			}
		}
		addSample(m.warm["zstd"], spec.Name, bench.Median(warm))
		logf("rep %d: %s: warm nix-store -r: %v s", rep+1, spec.Name, warm)
		return nil
	})
}

// substConcurrent starts n clients at once realising the closure on an
// empty store.
func (b *bencher) substConcurrent(ctx context.Context, spec bench.DaemonSpec, c *substCache, rep int, m *substMetrics, single, singleCPU map[string]float64) error {
	n := substFlags.clients
	return b.withSubstDaemon(ctx, spec, c, fmt.Sprintf("x%d", n), m.conc, func(rctx context.Context, r *substRun) error {
		cpu0 := r.cpu.usage()
		start := time.Now()
		runs, errs := realiseConcurrently(rctx, r, m.roots, n, "client-cache")
		wall := time.Since(start)
		cpu, cpuErr := r.cpu.since(cpu0)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		failed := 0
		for _, err := range errs {
			if err != nil {
				failed++
				msg := err.Error()
				if i := strings.LastIndex(msg, "error:"); i >= 0 {
					msg = msg[i:]
				}
				if len(msg) > 200 {
					msg = msg[:200]
				}
				m.failMsgs[spec.Name] = append(m.failMsgs[spec.Name], msg)
			}
		}
		m.failedTotal[spec.Name] += failed
		m.clientsTotal[spec.Name] += n
		_, verr := bench.CheckValid(ctx, r.d.Socket, m.paths)
		st := c.srv.Stats()
		logf("rep %d: %s: %d clients: %.2f s, daemon CPU %.2f s, %d failed, closure valid: %v; server: %d NAR GETs for %d NARs (max %d per NAR), %.1f MB; first narinfo GET at %.3f s, first NAR GET at %.3f s, last NAR sent at %.3f s",
			rep+1, spec.Name, n, wall.Seconds(), cpu.Seconds(), failed, verr == nil, st.NarGets, st.NarFiles, st.MaxNarGets, float64(st.NarBytes)/1e6,
			st.FirstNarinfo.Seconds(), st.FirstNar.Seconds(), st.LastNarDone.Seconds())
		addSample(m.failed, spec.Name, float64(failed))
		if verr != nil {
			setErr(m.conc, spec.Name, fmt.Errorf("closure not valid after %d clients: %w", n, verr))
			return nil
		}
		addSample(m.conc, spec.Name, wall.Seconds())
		if s := single[spec.Name]; s > 0 {
			addSample(m.concRatio, spec.Name, wall.Seconds()/s)
		}
		if s := singleCPU[spec.Name]; s > 0 && cpuErr == nil {
			addSample(m.concCPURatio, spec.Name, cpu.Seconds()/s)
		}
		var clientsCPU time.Duration
		for _, run := range runs {
			clientsCPU += run.CPU
		}
		if failed == 0 { // a failed client's CPU would make the sum too low
			addSample(m.concClientCPU, spec.Name, clientsCPU.Seconds())
		} else {
			setErr(m.concClientCPU, spec.Name, fmt.Errorf("%d of %d clients failed", failed, n))
		}
		// The same clients again on the now complete store: what n
		// clients cost with nothing to fetch. The store is synced first,
		// as before the one-client warm runs: the stock daemon leaves
		// its writeback to be done.
		if err := pagecache.SyncFS(r.d.Root); err != nil {
			return err
		}
		// What n clients cost on this machine before any daemon is asked,
		// measured after the sync so that no writeback runs meanwhile.
		if s := single[spec.Name]; s > 0 {
			if extra, err := startupExtra(rctx, r.env, n); err != nil {
				setErr(m.concCeiling, spec.Name, err)
			} else {
				logf("rep %d: %s: %d nix-store --version at once take %.3f s more than one", rep+1, spec.Name, n, extra.Seconds())
				addSample(m.concCeiling, spec.Name, (s+extra.Seconds())/s)
			}
		}
		c.srv.Reset()
		warm, err := realiseAll(rctx, r, m.roots, n, "warm-client-cache")
		if st := c.srv.Stats(); st.NarGets > 0 {
			logf("rep %d: %s: the %d warm clients fetched %d NARs", rep+1, spec.Name, n, st.NarGets)
		}
		if err != nil {
			setErr(m.concWarm, spec.Name, err)
			logf("rep %d: %s: %d warm clients: %v", rep+1, spec.Name, n, err)
		} else {
			addSample(m.concWarm, spec.Name, warm.Seconds())
		}
		addSample(m.maxGets, spec.Name, float64(st.MaxNarGets))
		addSample(m.getsPerNar, spec.Name, float64(st.NarGets)/float64(len(m.paths)))
		addSample(m.fetchedMB, spec.Name, float64(st.NarBytes)/1e6)
		return nil
	})
}

// startupExtra returns how much longer n nix-store processes that only
// start and exit (--version) take at once than one does, the median of 3
// tries: what n clients cost on this machine before any daemon is asked.
func startupExtra(ctx context.Context, env *bench.Env, n int) (time.Duration, error) {
	at := func(k int) (time.Duration, error) {
		start := time.Now()
		errs := make(chan error, k)
		for range k {
			go func() {
				_, err := bench.RunClient(ctx, env, nil, "nix-store", "--version")
				errs <- err
			}()
		}
		var err error
		for range k {
			err = errors.Join(err, <-errs)
		}
		return time.Since(start), err
	}
	var extras []time.Duration
	for range 3 {
		one, err := at(1)
		if err != nil {
			return 0, err
		}
		many, err := at(n)
		if err != nil {
			return 0, err
		}
		extras = append(extras, many-one)
	}
	slices.Sort(extras)
	return extras[1], nil
}

// realiseConcurrently starts n clients at once realising roots, each with
// its own client cache (cacheName-i), and returns each one's run and error.
func realiseConcurrently(ctx context.Context, r *substRun, roots []string, n int, cacheName string) ([]bench.ClientRun, []error) {
	runs, errs := make([]bench.ClientRun, n), make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runs[i], errs[i] = bench.Realise(ctx, r.env, r.d.StoreURL(), filepath.Join(r.work, fmt.Sprintf("%s-%d", cacheName, i)), roots)
		}()
	}
	wg.Wait()
	return runs, errs
}

// realiseAll is realiseConcurrently timed, failing if any client failed.
func realiseAll(ctx context.Context, r *substRun, roots []string, n int, cacheName string) (time.Duration, error) {
	start := time.Now()
	_, errs := realiseConcurrently(ctx, r, roots, n, cacheName)
	wall := time.Since(start)
	return wall, errors.Join(errs...)
}

func dirMB(dir string) float64 {
	var sum int64
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			sum += fi.Size()
		}
		return nil
	})
	return float64(sum) / 1e6
}

func (b *bencher) substReport(m *substMetrics, fsDesc, load0 string, nPaths, nRoots int, caches []*substCache) string {
	o := b.o
	var s strings.Builder
	b.writeReportHeader(&s, "stores and caches on "+fsDesc, load0)
	var cs []string
	for _, c := range caches {
		cs = append(cs, fmt.Sprintf("%s %.0f MB", c.comp, dirMB(filepath.Join(c.dir, "nar"))))
	}
	contents := "about 2:1 compressible"
	if substFlags.random {
		contents = "incompressible random"
	}
	fmt.Fprintf(&s, "Work: a closure of %d paths (%d roots, ~%d MB of %s file contents) in two caches written by `nix copy --to file://…` (%s of NAR files), "+
		"served by a counting HTTP server on 127.0.0.1; `nix-store -r` of the roots through each daemon on a fresh empty store, %d repetitions (after one untimed warm-up), "+
		"%d concurrent clients, %d warm runs per repetition.\n\n",
		nPaths, nRoots, substFlags.mb, contents, strings.Join(cs, ", "), o.Reps, substFlags.clients, substFlags.warm)
	if len(b.daemons) < 2 {
		s.WriteString("**nixyard was not measured in this run (no binary given).**\n\n")
	}
	s.WriteString(bench.Table(m.list()))
	s.WriteString("\n")
	for _, d := range b.daemons {
		msgs := m.failMsgs[d.Name]
		fmt.Fprintf(&s, "- %s: %d of %d concurrent clients failed over all repetitions", d.Name, m.failedTotal[d.Name], m.clientsTotal[d.Name])
		if len(msgs) > 0 {
			slices.Sort(msgs)
			msgs = slices.Compact(msgs)
			fmt.Fprintf(&s, "; errors: `%s`", strings.ReplaceAll(strings.Join(msgs[:min(len(msgs), 2)], "` / `"), "\n", " "))
		}
		s.WriteString(".\n")
	}
	return s.String()
}
