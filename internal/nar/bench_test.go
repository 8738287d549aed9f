package nar

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// benchNAR returns a ~64 MB NAR shaped like a typical package: 48 large files
// of 1 MiB and 4,000 small files of 4 KiB spread over 40 directories.
func benchNAR(b *testing.B) []byte {
	b.Helper()
	var es []ent
	big := string(bytes.Repeat([]byte("0123456789abcdef"), 1<<16))
	small := big[:4096]
	es = append(es, ent{h: Header{Type: TypeDirectory}})
	es = append(es, ent{h: Header{Path: "big", Type: TypeDirectory}})
	for i := 0; i < 48; i++ {
		es = append(es, ent{h: Header{Path: fmt.Sprintf("big/f%03d", i), Type: TypeRegular, Size: int64(len(big))}, data: big})
	}
	for d := 0; d < 40; d++ {
		dir := fmt.Sprintf("d%02d", d)
		es = append(es, ent{h: Header{Path: dir, Type: TypeDirectory}})
		for i := 0; i < 100; i++ {
			es = append(es, ent{h: Header{Path: fmt.Sprintf("%s/s%03d", dir, i), Type: TypeRegular, Size: 4096}, data: small})
		}
	}
	return writeEntries(b, es)
}

func BenchmarkReader(b *testing.B) {
	nar := benchNAR(b)
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(nar)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		nr := NewReader(bytes.NewReader(nar))
		for {
			_, err := nr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
			if _, err := io.CopyBuffer(io.Discard, nr, buf); err != nil {
				b.Fatal(err)
			}
		}
	}
}

func BenchmarkRestore(b *testing.B) {
	nar := benchNAR(b)
	base := b.TempDir()
	b.SetBytes(int64(len(nar)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		out := filepath.Join(base, fmt.Sprint(i))
		if err := Restore(context.Background(), bytes.NewReader(nar), out); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := os.RemoveAll(out); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

func BenchmarkDumpPath(b *testing.B) {
	nar := benchNAR(b)
	tree := filepath.Join(b.TempDir(), "tree")
	if err := Restore(context.Background(), bytes.NewReader(nar), tree); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(nar)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := DumpPath(io.Discard, tree); err != nil {
			b.Fatal(err)
		}
	}
}
