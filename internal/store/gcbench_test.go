package store

import (
	"context"
	"math"
	"os"
	"testing"
)

// BenchmarkCollectGarbage measures a collection of many small, unrooted
// paths without references between them (a CI host's store after many
// jobs' sources and scripts), in NIXYARD_BENCH_DIR (for a tmpfs) or the
// temporary directory.
func BenchmarkCollectGarbage(b *testing.B) {
	const n = 5000
	for b.Loop() {
		b.StopTimer()
		root, err := os.MkdirTemp(os.Getenv("NIXYARD_BENCH_DIR"), "nixyard-gc-bench-")
		if err != nil {
			b.Fatal(err)
		}
		s := openAt(b, root)
		fillStore(b, s, n, "gc", false)
		b.StartTimer()
		res, err := s.CollectGarbage(context.Background(), GCOptions{Action: GCDeleteDead, MaxFreed: math.MaxUint64}, func(string) {})
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		if len(res.Paths) != n {
			b.Fatalf("deleted %d paths, want %d", len(res.Paths), n)
		}
		s.Close()
		removeAll(root)
		b.StartTimer()
	}
}
