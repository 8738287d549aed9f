package daemon

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/nixyard/nixyard/internal/daemon/client"
	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
	"github.com/nixyard/nixyard/internal/store"
)

// smallItems returns n small content-addressed paths (one file of a few
// dozen bytes each), each referring to up to two earlier ones, in an order
// that can be added as one stream. tag makes the paths of different calls
// differ.
func smallItems(tb testing.TB, n int, tag string) []client.NarItem {
	tb.Helper()
	items := make([]client.NarItem, 0, n)
	for i := range n {
		var buf bytes.Buffer
		w := nar.NewWriter(&buf)
		content := fmt.Sprintf("%s file %d\n", tag, i)
		if err := w.WriteHeader(&nar.Header{Type: nar.TypeRegular, Size: int64(len(content))}); err != nil {
			tb.Fatal(err)
		}
		io.WriteString(w, content)
		if err := w.Close(); err != nil {
			tb.Fatal(err)
		}
		var refs []storepath.Path
		for _, k := range []int{i / 2, i - 1} {
			if k >= 0 && k < i && (len(refs) == 0 || refs[0] != items[k].Info.Path) {
				refs = append(refs, items[k].Info.Path)
			}
		}
		h := hash.Sum(hash.SHA256, buf.Bytes())
		ca := contentaddress.CA{Method: contentaddress.NAR, Hash: h}
		p, err := ca.StorePath("/nix/store", fmt.Sprintf("%s-%d", tag, i), refs, false)
		if err != nil {
			tb.Fatal(err)
		}
		info := store.PathInfo{Path: p, NarHash: h, NarSize: uint64(buf.Len()), CA: ca.String(), References: storepath.Sort(refs)}
		items = append(items, client.NarItem{Info: info, NAR: buf.Bytes()})
	}
	return items
}

// benchDaemon is a daemon logging at Info level (as deployed) to nowhere.
func benchDaemon(b *testing.B) *testDaemon {
	return startDaemon(b, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
}

// BenchmarkQueryPathInfo measures QueryPathInfo round trips over the socket
// on a store of 5,000 paths, with 1 and 8 connections each keeping one
// request in flight, as Nix clients do.
func BenchmarkQueryPathInfo(b *testing.B) {
	d := benchDaemon(b)
	items := smallItems(b, 5000, "qpi")
	c0 := dial(b, d, client.DefaultVersion)
	if err := c0.AddMultipleToStore(context.Background(), items, false, true); err != nil {
		b.Fatal(err)
	}
	for _, conns := range []int{1, 8} {
		b.Run(fmt.Sprintf("conns=%d", conns), func(b *testing.B) {
			cs := make([]*client.Client, conns)
			for i := range cs {
				cs[i] = dial(b, d, client.DefaultVersion)
			}
			var next atomic.Int64
			var wg sync.WaitGroup
			b.ResetTimer()
			for i, c := range cs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for k := i * 7; next.Add(1) <= int64(b.N); k += 13 {
						p := items[k%len(items)].Info.Path
						if _, err := c.QueryPathInfo(context.Background(), p); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
		})
	}
}

// BenchmarkAddMultipleToStore measures op 44 with 500 small paths into a
// fresh store per iteration.
func BenchmarkAddMultipleToStore(b *testing.B) {
	items := smallItems(b, 500, "add")
	for b.Loop() {
		b.StopTimer()
		d := benchDaemon(b)
		c := dial(b, d, client.DefaultVersion)
		b.StartTimer()
		if err := c.AddMultipleToStore(context.Background(), items, false, true); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkQueryValidPaths measures QueryValidPaths of 5,000 valid paths
// on a new connection each time (the roots it takes are a connection's),
// as `nix copy --to` a warm store asks.
func BenchmarkQueryValidPaths(b *testing.B) {
	d := benchDaemon(b)
	ctx := context.Background()
	items := smallItems(b, 5000, "qvp")
	c, err := client.Dial(ctx, d.socket)
	if err != nil {
		b.Fatal(err)
	}
	if err := c.AddMultipleToStore(ctx, items, false, true); err != nil {
		b.Fatal(err)
	}
	c.Close()
	paths := make([]storepath.Path, len(items))
	for i, it := range items {
		paths[i] = it.Info.Path
	}
	for b.Loop() {
		c, err := client.Dial(ctx, d.socket)
		if err != nil {
			b.Fatal(err)
		}
		valid, err := c.QueryValidPaths(ctx, paths)
		if err != nil || len(valid) != len(paths) {
			b.Fatalf("%d valid, %v", len(valid), err)
		}
		c.Close()
	}
}
