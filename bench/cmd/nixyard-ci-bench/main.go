// Command nixyard-ci-bench runs the CI scenario (bench/ci.go): the wall
// time of 1 and N concurrent container jobs that each need the same
// closure (~600 MB by default), (a) substituting it into an empty per-job
// chroot store from a local HTTP binary cache (today's default), (b)
// through nixyard's job socket on a cold host, (c) on a warm host. It
// prints a Markdown table of medians and the ratios (a)/(b) and (a)/(c).
//
// It needs root (scratch file system, bubblewrap containers), Nix 2.8 and
// bwrap on PATH.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nixyard/nixyard/bench"
	"github.com/nixyard/nixyard/internal/ci"
	"github.com/nixyard/nixyard/internal/substitute/cachetest"
)

type options struct {
	bench.RunFlags
	paths   int
	mb      int64
	clients []int
}

// parse parses the command line into o.
func (o *options) parse() error {
	o.Register(flag.CommandLine, "path of the nixyard binary (required)", 8192, 3)
	flag.IntVar(&o.paths, "paths", 300, "number of paths in the closure")
	flag.Int64Var(&o.mb, "mb", 600, "approximate closure size in MB (10^6 bytes)")
	o.clients = []int{1, 4}
	flag.Var((*bench.Counts)(&o.clients), "clients", "comma-separated numbers of concurrent jobs")
	flag.Parse()
	if o.Nixyard == "" {
		return errors.New("-nixyard is required")
	}
	return o.Check()
}

func main() {
	var o options
	bench.Main("nixyard-ci-bench", &o.RunFlags, o.parse, func(ctx context.Context) error { return run(ctx, o) })
}

var logf = bench.Logf

func run(ctx context.Context, o options) (err error) {
	bin, err := filepath.Abs(o.Nixyard)
	if err != nil {
		return err
	}
	ws, err := bench.Setup(ctx, o.RunFlags, "nycb.", false, "nix", "nix-store", "bwrap", "mount", "mkfs.ext4")
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, ws.Close()) }()
	env, mnt := ws.Env, ws.Mnt

	// The closure, in a binary cache written by the real client (zstd).
	src := filepath.Join(mnt, "src")
	infos, err := bench.ImportSource(ctx, env, src, bench.ExportSpec{Seed: 7, Count: o.paths, TotalBytes: o.mb * 1e6, MaxRefs: 3, Name: "ci"})
	if err != nil {
		return err
	}
	cacheDir := filepath.Join(mnt, "cache")
	if _, err := bench.Nix(ctx, env, nil, "nix", "copy", "--no-check-sigs", "--all",
		"--from", "local?root="+src, "--to", "file://"+cacheDir+"?compression=zstd"); err != nil {
		return fmt.Errorf("writing the cache: %w", err)
	}
	if err := os.RemoveAll(src); err != nil {
		return err
	}
	srv := cachetest.New(cacheDir)
	defer srv.Close()
	roots := bench.Roots(infos)
	logf("closure: %d paths (%d roots), cache %s", len(infos), len(roots), srv.URL)
	jobs, err := bench.NewCIJobs(filepath.Join(mnt, "jobs"), srv.URL, roots)
	if err != nil {
		return err
	}

	type cell struct{ a, b, c []float64 }
	cells := map[int]*cell{}
	for _, n := range o.clients {
		cells[n] = &cell{}
	}
	for rep := range o.Reps {
		for _, n := range o.clients {
			tag := fmt.Sprintf("%d-%d", rep, n)
			da, err := jobs.EmptyStoreWave(ctx, tag, n)
			if err != nil {
				return fmt.Errorf("(a) %d jobs: %w", n, err)
			}
			db, dc, err := nixyardWaves(ctx, env, bin, mnt, tag, srv, jobs, n, len(infos))
			if err != nil {
				return err
			}
			c := cells[n]
			c.a, c.b, c.c = append(c.a, da.Seconds()), append(c.b, db.Seconds()), append(c.c, dc.Seconds())
			logf("rep %d, %d jobs: (a) %.2f s, (b) %.2f s, (c) %.3f s", rep, n, da.Seconds(), db.Seconds(), dc.Seconds())
		}
	}
	fmt.Printf("Closure: %d paths, %.0f MB of file contents, zstd cache on 127.0.0.1; %s scratch file system; %d repetitions, medians; load at the end: %s\n\n",
		len(infos), float64(o.mb), o.FS, o.Reps, bench.LoadAvg())
	fmt.Println("| concurrent jobs | (a) empty per-job store, s | (b) nixyard cold host, s | (c) nixyard warm host, s | (a)/(b) | (a)/(c) |")
	fmt.Println("|---|---|---|---|---|---|")
	for _, n := range o.clients {
		c := cells[n]
		a, b, w := bench.Median(c.a), bench.Median(c.b), bench.Median(c.c)
		fmt.Printf("| %d | %.2f | %.2f | %.3f | %.1f× | %.0f× |\n", n, a, b, w, a/b, a/w)
	}
	return nil
}

// nixyardWaves starts nixyard on an empty store with a job socket, runs n
// jobs at once (cold host), checks each NAR was fetched once, runs n more
// (warm host), checks nothing was fetched, and stops the daemon.
func nixyardWaves(ctx context.Context, env *bench.Env, bin, mnt, tag string, srv *cachetest.Server, jobs *bench.CIJobs, n, nPaths int) (cold, warm time.Duration, err error) {
	root := filepath.Join(mnt, "host-"+tag)
	host := ci.Host{StoreRoot: root, Socket: filepath.Join(mnt, "js-"+tag, "socket")}
	spec := bench.DaemonSpec{Name: "nixyard", Argv: func(root string) []string {
		return []string{bin, "daemon", "--store", root, "--listen", host.Socket + ",trusted=false,tenant=bench",
			"--option", "substituters", srv.URL, "--option", "require-sigs", "false"}
	}}
	d, err := bench.StartDaemon(ctx, env, spec, root, filepath.Join(mnt, "daemon-"+tag+".log"))
	if err != nil {
		return 0, 0, err
	}
	defer func() {
		err = errors.Join(err, d.Stop(), os.RemoveAll(root))
	}()
	before := srv.Counts()
	if cold, err = jobs.DaemonWave(ctx, host, n); err != nil {
		return 0, 0, fmt.Errorf("(b) %d jobs: %w", n, err)
	}
	mid := srv.Counts()
	nars := 0
	for k, v := range mid {
		if strings.HasPrefix(k, "/nar/") || strings.HasPrefix(k, "nar/") {
			if v-before[k] > 1 {
				return 0, 0, fmt.Errorf("(b) %d jobs: %s fetched %d times", n, k, v-before[k])
			}
			if v > before[k] {
				nars++
			}
		}
	}
	if nars != nPaths {
		return 0, 0, fmt.Errorf("(b) %d jobs: %d NARs fetched, want %d", n, nars, nPaths)
	}
	if warm, err = jobs.DaemonWave(ctx, host, n); err != nil {
		return 0, 0, fmt.Errorf("(c) %d jobs: %w", n, err)
	}
	for k, v := range srv.Counts() {
		if v != mid[k] {
			return 0, 0, fmt.Errorf("(c) %d jobs: %d requests for %s on a warm host", n, v-mid[k], k)
		}
	}
	return cold, warm, nil
}
