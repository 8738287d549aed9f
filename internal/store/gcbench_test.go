package store

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"testing"

	"github.com/nixyard/nixyard/internal/nar"
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
		i := 0
		err = s.AddMultipleToStoreNar(context.Background(), func() (PathInfo, io.Reader, error) {
			if i == n {
				return PathInfo{}, nil, io.EOF
			}
			i++
			var buf bytes.Buffer
			w := nar.NewWriter(&buf)
			content := fmt.Sprintf("file %d", i)
			w.WriteHeader(&nar.Header{Type: nar.TypeRegular, Size: int64(len(content))})
			w.Write([]byte(content))
			w.Close()
			return caNARInfo(b, s, fmt.Sprintf("gc-%d", i), buf.Bytes(), nil), &buf, nil
		}, AddOptions{})
		if err != nil {
			b.Fatal(err)
		}
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
