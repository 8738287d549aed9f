package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/nixyard/nixyard/bench"
)

// The builds scenario: 4 clients at once, each building 25 trivial
// derivations of its own, then one client building a chain of 200. Both
// daemons get max-jobs = -builds-max-jobs and the same sandbox-paths (for
// the markers through which builders count how many builders run at once);
// clients ask for --max-jobs 25. nix-daemon lets each client's max-jobs
// apply on its own; nixyard caps all clients together.
const (
	buildsClients   = 4
	buildsPerClient = 25
	buildsChain     = 200
)

func (b *bencher) benchBuilds(ctx context.Context) ([]*bench.Metric, error) {
	fx, err := bench.WriteBuildsFixture(filepath.Join(b.work, "builds"), "/bin/busybox")
	if err != nil {
		return nil, err
	}
	jobs := strconv.Itoa(b.o.buildsMaxJobs)
	conc := &bench.Metric{Name: fmt.Sprintf("builds: %d clients × %d trivial derivations at once (daemon max-jobs %s)", buildsClients, buildsPerClient, jobs), Unit: "s"}
	concPeak := &bench.Metric{Name: "builds: peak concurrent builders, " + strconv.Itoa(buildsClients) + " clients", Unit: "builders"}
	chain := &bench.Metric{Name: fmt.Sprintf("builds: one client, chain of %d derivations", buildsChain), Unit: "s"}
	all := []*bench.Metric{conc, concPeak, chain}
	for rep := range b.o.Reps {
		for _, i := range b.order(rep) {
			spec := b.daemons[i]
			inner := spec.Argv
			spec.Argv = func(root string) []string {
				return append(inner(root), "--option", "max-jobs", jobs, "--option", "sandbox-paths", "/marks="+fx.Marks)
			}
			root := filepath.Join(b.mnt, fmt.Sprintf("b-%s-%d", spec.Name, rep))
			d, err := b.start(ctx, spec, root)
			if err != nil {
				for _, m := range all {
					setErr(m, spec.Name, err)
				}
				continue
			}
			if err := b.buildsOnce(ctx, fx, d, conc, concPeak, chain); err != nil {
				if ctx.Err() != nil {
					return all, ctx.Err()
				}
				logf("%s: builds: %v", spec.Name, err)
			}
			if err := b.stop(d); err != nil {
				logf("stopping %s: %v", spec.Name, err)
			}
			os.RemoveAll(root)
		}
	}
	return all, nil
}

// buildsOnce runs both parts of the scenario on a fresh daemon.
func (b *bencher) buildsOnce(ctx context.Context, fx *bench.BuildsFixture, d *bench.Daemon, conc, concPeak, chain *bench.Metric) error {
	name := d.Spec.Name
	fail := func(m *bench.Metric, err error) error { setErr(m, name, err); return err }
	if err := fx.ResetMarks(); err != nil {
		return fail(conc, err)
	}
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, buildsClients)
	for c := range buildsClients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			args := append(fx.Args("clients.c"+strconv.Itoa(c), buildsClients, buildsPerClient, buildsChain),
				"--max-jobs", strconv.Itoa(buildsPerClient), "--store", d.StoreURL())
			_, errs[c] = bench.Nix(ctx, b.env, nil, "nix-build", args...)
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	for _, err := range errs {
		if err != nil {
			return fail(conc, err)
		}
	}
	n, peak, err := fx.Peak()
	if err == nil && n != buildsClients*buildsPerClient {
		err = fmt.Errorf("%d builds ran, want %d", n, buildsClients*buildsPerClient)
	}
	if err != nil {
		return fail(conc, err)
	}
	addSample(conc, name, elapsed.Seconds())
	addSample(concPeak, name, float64(peak))
	logf("%s: %d clients × %d builds in %.2f s, peak %d builders", name, buildsClients, buildsPerClient, elapsed.Seconds(), peak)

	if err := fx.ResetMarks(); err != nil {
		return fail(chain, err)
	}
	start = time.Now()
	if _, err := bench.Nix(ctx, b.env, nil, "nix-build", append(fx.Args("chain", buildsClients, buildsPerClient, buildsChain), "--store", d.StoreURL())...); err != nil {
		return fail(chain, err)
	}
	elapsed = time.Since(start)
	if n, _, err := fx.Peak(); err != nil || n != buildsChain {
		return fail(chain, fmt.Errorf("chain: %d builds ran, want %d (%v)", n, buildsChain, err))
	}
	addSample(chain, name, elapsed.Seconds())
	logf("%s: chain of %d in %.2f s", name, buildsChain, elapsed.Seconds())
	return nil
}
