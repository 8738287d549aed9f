package store

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"testing"

	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// benchStore fills a store with n small paths, each referring to the
// previous one, added through the batched path.
func benchStore(b *testing.B, n int) (*Store, []storepath.Path) {
	b.Helper()
	root, err := os.MkdirTemp("", "nixyard-bench-")
	if err != nil {
		b.Fatal(err)
	}
	s := openAt(b, root)
	b.Cleanup(func() {
		if b.Name() == "BenchmarkAddMultiple" {
			s.Close()
			removeAll(root)
		}
	})
	var paths []storepath.Path
	var prev []storepath.Path
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
		info := caNARInfo(b, s, fmt.Sprintf("bench-%d", i), buf.Bytes(), prev)
		paths = append(paths, info.Path)
		prev = []storepath.Path{info.Path}
		return info, &buf, nil
	}, AddOptions{})
	if err != nil {
		b.Fatal(err)
	}
	return s, paths
}

var (
	qpiStore *Store
	qpiPaths []storepath.Path
)

// BenchmarkQueryPathInfo measures QueryPathInfo on a store of 5,000 paths
// from parallel goroutines, as the daemon's connections call it.
func BenchmarkQueryPathInfo(b *testing.B) {
	if qpiStore == nil {
		// The benchmark function runs several times; fill the store once.
		qpiStore, qpiPaths = benchStore(b, 5000)
	}
	s, paths := qpiStore, qpiPaths
	ctx := context.Background()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, err := s.QueryPathInfo(ctx, paths[i%len(paths)]); err != nil {
				b.Error(err)
				return
			}
			i += 7
		}
	})
}

// BenchmarkAddMultiple measures batched additions of small paths.
func BenchmarkAddMultiple(b *testing.B) {
	for b.Loop() {
		benchStore(b, 500)
	}
}
