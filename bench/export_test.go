package bench

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"testing"

	"github.com/nixyard/nixyard/internal/nar"
)

func readU64(t *testing.T, r io.Reader) uint64 {
	t.Helper()
	var b [8]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint64(b[:])
}

func readStr(t *testing.T, r io.Reader) string {
	t.Helper()
	n := readU64(t, r)
	b := make([]byte, (n+7)&^7)
	if _, err := io.ReadFull(r, b); err != nil {
		t.Fatal(err)
	}
	return string(b[:n])
}

// TestWriteExport parses a generated stream back: record framing, NARs the
// nar.Reader accepts, references to earlier paths only, and determinism.
func TestWriteExport(t *testing.T) {
	spec := ExportSpec{Seed: 7, Count: 12, TotalBytes: 12 * 3000, MaxRefs: 3, Name: "t"}
	var buf bytes.Buffer
	infos, err := WriteExport(context.Background(), &buf, spec)
	if err != nil {
		t.Fatal(err)
	}
	var again bytes.Buffer
	if _, err := WriteExport(context.Background(), &again, spec); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), again.Bytes()) {
		t.Fatal("same spec, different streams")
	}

	r := bufio.NewReader(&buf)
	seen := map[string]bool{}
	for i, info := range infos {
		if got := readU64(t, r); got != 1 {
			t.Fatalf("record %d: marker %d, want 1", i, got)
		}
		nr := nar.NewReader(r)
		var contents int64
		for {
			h, err := nr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("record %d: NAR: %v", i, err)
			}
			if h.Type == nar.TypeRegular {
				contents += h.Size
			}
		}
		if contents != info.Size {
			t.Errorf("record %d: %d content bytes, want %d", i, contents, info.Size)
		}
		if got := readU64(t, r); got != exportMagic {
			t.Fatalf("record %d: magic %#x", i, got)
		}
		if p := readStr(t, r); p != info.Path {
			t.Fatalf("record %d: path %q, want %q", i, p, info.Path)
		}
		n := readU64(t, r)
		if int(n) != len(info.Refs) {
			t.Fatalf("record %d: %d refs, want %d", i, n, len(info.Refs))
		}
		for range n {
			if ref := readStr(t, r); !seen[ref] {
				t.Errorf("record %d: reference %s is not an earlier path", i, ref)
			}
		}
		if d := readStr(t, r); d != "" {
			t.Errorf("record %d: deriver %q", i, d)
		}
		if got := readU64(t, r); got != 0 {
			t.Fatalf("record %d: trailer %d", i, got)
		}
		seen[info.Path] = true
	}
	if got := readU64(t, r); got != 0 {
		t.Fatalf("end marker %d", got)
	}
	if _, err := r.ReadByte(); !errors.Is(err, io.EOF) {
		t.Fatal("bytes after the end marker")
	}
}

// TestCompressibleContents checks that Compressible contents compress
// (about 2:1) where the default ones do not.
func TestCompressibleContents(t *testing.T) {
	ratio := func(compressible bool) float64 {
		var raw bytes.Buffer
		if _, err := WriteExport(context.Background(), &raw, ExportSpec{Seed: 1, Count: 4, TotalBytes: 1 << 20, Name: "c", Compressible: compressible}); err != nil {
			t.Fatal(err)
		}
		var z bytes.Buffer
		w := gzip.NewWriter(&z)
		w.Write(raw.Bytes())
		w.Close()
		return float64(raw.Len()) / float64(z.Len())
	}
	if r := ratio(false); r > 1.05 {
		t.Errorf("random contents compress %.2f:1", r)
	}
	if r := ratio(true); r < 1.6 {
		t.Errorf("compressible contents compress only %.2f:1", r)
	}
}

// TestWriteTrees checks the shapes WriteTrees writes (a file, an executable
// file, a directory with a data file, a subdirectory and a symlink), their
// total size, and that the same spec writes the same bytes.
func TestWriteTrees(t *testing.T) {
	spec := ExportSpec{Seed: 5, Count: 7, TotalBytes: 7 * 3000, Name: "t"}
	dump := func() [][]byte {
		names, err := WriteTrees(context.Background(), t.TempDir(), spec)
		if err != nil {
			t.Fatal(err)
		}
		if len(names) != spec.Count {
			t.Fatalf("%d entries, want %d", len(names), spec.Count)
		}
		nars := make([][]byte, len(names))
		for i, name := range names {
			var b bytes.Buffer
			if err := nar.DumpPath(&b, name); err != nil {
				t.Fatal(err)
			}
			nars[i] = b.Bytes()
		}
		return nars
	}
	first, second := dump(), dump()
	var total int64
	for i, n := range first {
		if !bytes.Equal(n, second[i]) {
			t.Errorf("entry %d: same spec, different contents", i)
		}
		var got []string
		nr := nar.NewReader(bytes.NewReader(n))
		for {
			h, err := nr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("entry %d: NAR: %v", i, err)
			}
			total += h.Size
			got = append(got, fmt.Sprintf("%s:%v:%v:%s", h.Path, h.Type, h.Executable, h.LinkTarget))
		}
		var want []string
		switch {
		case i%2 == 1:
			want = []string{fmt.Sprintf(":%v:false:", nar.TypeDirectory), fmt.Sprintf("data:%v:false:", nar.TypeRegular),
				fmt.Sprintf("lib:%v:false:", nar.TypeDirectory), fmt.Sprintf("lib/info:%v:false:", nar.TypeRegular),
				fmt.Sprintf("link:%v:false:data", nar.TypeSymlink)}
		default:
			want = []string{fmt.Sprintf(":%v:%v:", nar.TypeRegular, i%3 == 0)}
		}
		if !slices.Equal(got, want) {
			t.Errorf("entry %d: %q, want %q", i, got, want)
		}
	}
	if avg := total / int64(spec.Count); avg < 1500 || avg > 4500 {
		t.Errorf("average size %d, want about 3000", avg)
	}
}
