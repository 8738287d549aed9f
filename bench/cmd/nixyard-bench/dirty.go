package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/nixyard/nixyard/bench"
	"github.com/nixyard/nixyard/internal/pagecache"
	"github.com/nixyard/nixyard/internal/store"
)

// The other-job scenario: another job has just written -dirty-mb of data
// to the store's file system, not yet written back, when a client adds a
// small path (nix-store --add of a directory of dirtyFiles files). The
// stock daemon does not make the path durable at all; nixyard does, by
// fsyncs of the path's own files when this much other data is dirty (its
// log, at debug level, says which way it took). For comparison, one syncfs
// of the file system with that data dirty: what a daemon that synced the
// whole file system for a path would wait. The default of 1024 MB stays
// below what the kernel lets a file system hold dirty before it throttles
// every writer to it: with 1536 MB here, a small add took 0.63-0.87 s
// into either daemon, as long as the syncfs (0.73 s).
const (
	dirtyFiles    = 16
	dirtyFileSize = 4 << 10
)

func (b *bencher) benchDirty(ctx context.Context) ([]*bench.Metric, error) {
	mb := b.o.dirtyMB
	add := &bench.Metric{Name: fmt.Sprintf("nix-store --add of a small path (%d files of %d KiB) while another job's %d MB wait to be written back", dirtyFiles, dirtyFileSize>>10, mb), Unit: "s"}
	ways := &bench.Metric{Name: "the same: adds that nixyard made durable by fsync (by its debug log), of all", Unit: "%"}
	syncfs := &bench.Metric{Name: fmt.Sprintf("for comparison: one syncfs of the store's file system with the other job's %d MB dirty, in nixyard's column", mb), Unit: "s"}
	all := []*bench.Metric{add, ways, syncfs}
	if b.o.FS == "tmpfs" {
		// tmpfs pages are never dirty and its syncfs writes nothing.
		err := errors.New("not run on tmpfs (no writeback there)")
		for _, m := range all {
			setErr(m, "nix-daemon", err)
			setErr(m, "nixyard", err)
		}
		return all, nil
	}
	other := filepath.Join(b.mnt, "other-job-output")
	defer os.Remove(other)
	var fsynced, nixyardAdds int
	for rep := range b.o.Reps {
		var stockTime float64
		for _, i := range b.order(rep) {
			spec := b.daemons[i]
			if spec.Name == "nixyard" {
				inner := spec.Argv
				spec.Argv = func(root string) []string { return append(inner(root), "--log-level", "debug") }
			}
			root := filepath.Join(b.mnt, fmt.Sprintf("d-%s-%d", spec.Name, rep+1))
			fail := func(err error) {
				setErr(add, spec.Name, err)
				if spec.Name == "nixyard" {
					setErr(ways, spec.Name, err)
				} else {
					setErr(syncfs, "nixyard", fmt.Errorf("nothing to compare with: nix-daemon: %w", err))
				}
			}
			d, err := b.start(ctx, spec, root)
			if err != nil {
				logf("rep %d: %s: %v", rep+1, spec.Name, err)
				fail(err)
				os.RemoveAll(root)
				continue
			}
			dur, err := b.addNextToDirty(ctx, d, other, rep)
			if serr := b.stop(d); serr != nil {
				logf("stopping %s: %v", spec.Name, serr)
			}
			if err != nil {
				if ctx.Err() != nil {
					return all, ctx.Err()
				}
				logf("rep %d: %s: %v", rep+1, spec.Name, err)
				fail(err)
			} else {
				addSample(add, spec.Name, dur.Seconds())
				way := ""
				if spec.Name == "nixyard" {
					if log, err := os.ReadFile(d.LogPath); err != nil {
						setErr(ways, spec.Name, err)
					} else {
						way = store.LastDurableWay(string(log))
					}
					if way == "" {
						way = "unknown"
					}
					nixyardAdds++
					if way == "fsync" {
						fsynced++
					}
					way = ", made durable by " + way
				} else {
					stockTime = dur.Seconds()
				}
				logf("rep %d: %s: nix-store --add next to %d MB of dirty data: %.3f s%s", rep+1, spec.Name, b.o.dirtyMB, dur.Seconds(), way)
			}
			if err := os.RemoveAll(root); err != nil {
				return all, fmt.Errorf("removing %s: %w", root, err)
			}
			if err := pagecache.SyncFS(b.mnt); err != nil {
				return all, err
			}
		}
		if stockTime == 0 {
			continue
		}
		// Last, as it writes the other job's data back.
		if err := pagecache.WriteUnsynced(ctx, other, int64(mb)<<20); err != nil {
			return all, err
		}
		t := time.Now()
		if err := pagecache.SyncFS(b.mnt); err != nil {
			return all, err
		}
		syncfs.Stock = append(syncfs.Stock, stockTime)
		syncfs.Nixyard = append(syncfs.Nixyard, time.Since(t).Seconds())
		logf("rep %d: syncfs with %d MB dirty: %.3f s", rep+1, mb, time.Since(t).Seconds())
		if err := os.Remove(other); err != nil {
			return all, err
		}
	}
	if nixyardAdds > 0 {
		ways.Nixyard = []float64{100 * float64(fsynced) / float64(nixyardAdds)}
	}
	return all, nil
}

// addNextToDirty writes -dirty-mb MB to other without syncing, times
// nix-store --add of a fresh small tree into d, and removes other again
// (its pages, unless the kernel has begun to write them back, are dropped
// unwritten).
func (b *bencher) addNextToDirty(ctx context.Context, d *bench.Daemon, other string, rep int) (time.Duration, error) {
	src := filepath.Join(b.work, fmt.Sprintf("dirty-src-%s-%d", d.Spec.Name, rep))
	if err := os.MkdirAll(src, 0o755); err != nil {
		return 0, err
	}
	defer os.RemoveAll(src)
	for i := range dirtyFiles {
		line := fmt.Sprintf("%s %d %d\n", d.Spec.Name, rep, i)
		data := bytes.Repeat([]byte(line), dirtyFileSize/len(line)+1)[:dirtyFileSize]
		if err := os.WriteFile(filepath.Join(src, fmt.Sprintf("f%02d", i)), data, 0o644); err != nil {
			return 0, err
		}
	}
	if err := pagecache.WriteUnsynced(ctx, other, int64(b.o.dirtyMB)<<20); err != nil {
		return 0, err
	}
	defer os.Remove(other)
	run, err := bench.RunClient(ctx, b.env, nil, "nix-store", "--store", d.StoreURL(), "--add", src)
	return run.Wall, err
}
