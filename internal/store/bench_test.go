package store

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hash"
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
	return s, fillStore(b, s, n, "bench", true)
}

// fillStore adds n small paths named prefix-1 to prefix-n to s through
// the batched path, each referring to the previous one if chained.
func fillStore(b *testing.B, s *Store, n int, prefix string, chained bool) []storepath.Path {
	b.Helper()
	var paths []storepath.Path
	var prev []storepath.Path
	i := 0
	err := s.AddMultipleToStoreNar(context.Background(), func() (PathInfo, io.Reader, error) {
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
		info := caNARInfo(b, s, fmt.Sprintf("%s-%d", prefix, i), buf.Bytes(), prev)
		paths = append(paths, info.Path)
		if chained {
			prev = []storepath.Path{info.Path}
		}
		return info, &buf, nil
	}, AddOptions{})
	if err != nil {
		b.Fatal(err)
	}
	return paths
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

// BenchmarkAddText measures AddTextToStore of small files, as
// nix-instantiate sends one per derivation: one caller after another
// (one client), and from 8 callers at once (clients sharing the daemon,
// whose additions are made durable and registered together).
func BenchmarkAddText(b *testing.B) {
	add := func(b *testing.B, s *Store, i int64) {
		text := fmt.Sprintf("Derive([(\"out\",\"\",\"\",\"\")],[],[],\"x86_64-linux\",\"/bin/sh\",[],[(\"n\",\"%d\")])", i)
		if _, err := s.AddToStoreContent(context.Background(), fmt.Sprintf("t%d.drv", i), contentaddress.Text, hash.SHA256, nil, strings.NewReader(text), false); err != nil {
			b.Error(err)
		}
	}
	b.Run("sequential", func(b *testing.B) {
		s := openAt(b, b.TempDir())
		defer s.Close()
		for i := range b.N {
			add(b, s, int64(i))
		}
	})
	b.Run("parallel-8", func(b *testing.B) {
		s := openAt(b, b.TempDir())
		defer s.Close()
		var n atomic.Int64
		b.SetParallelism(max(1, 8/runtime.GOMAXPROCS(0))) // 8 goroutines in all (on 2 CPUs)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				add(b, s, n.Add(1))
			}
		})
	})
}
