// Package bench measures the nixyard daemon against the stock nix-daemon:
// it generates synthetic stores as `nix-store --export` streams, runs both
// daemons on private chroot stores kept on a file system made for the run,
// drives them with internal/daemon/client (QueryPathInfo load) and
// with the real Nix client (`nix copy`), and cleans up every process and
// mount it created. The command is bench/cmd/nixyard-bench; scripts/bench.sh
// runs it.
package bench

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"

	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/nixbase32"
)

// exportMagic follows each NAR in a `nix-store --export` stream
// (src/libstore/export-import.cc in Nix 2.8).
const exportMagic = 0x4558494e

// ExportSpec describes a synthetic set of store paths. The same spec always
// yields the same bytes, so stores populated from it are identical.
type ExportSpec struct {
	Seed       uint64 // seeds names, sizes, references and contents
	Count      int    // number of store paths
	TotalBytes int64  // approximate sum of file contents over all paths
	MaxRefs    int    // each path references 0..MaxRefs earlier paths
	Name       string // name prefix: paths are <hash>-<Name>-<index>
	StoreDir   string // logical store dir, normally /nix/store
	// Compressible makes file contents compress about 2:1 (each byte one of
	// 16 letters, chosen at random) instead of not at all, so that
	// decompressing a binary cache costs CPU as real closures do.
	Compressible bool
}

// PathInfo is what the generator knows of one path it wrote.
type PathInfo struct {
	Path string   // absolute store path
	Refs []string // absolute store paths, sorted
	Size int64    // bytes of file contents (not NAR size)
}

// WriteExport writes the paths described by spec to w in the format read by
// `nix-store --import`: for each path u64 1, the NAR, u64 exportMagic, the
// path, its references, its deriver ("") and u64 0; then a final u64 0.
// References always point to earlier paths, so the stream imports in order.
// File contents are pseudo-random, so nothing deduplicates, and nothing
// compresses unless spec.Compressible.
func WriteExport(ctx context.Context, w io.Writer, spec ExportSpec) ([]PathInfo, error) {
	if spec.Count <= 0 {
		return nil, fmt.Errorf("export spec: count %d", spec.Count)
	}
	if spec.StoreDir == "" {
		spec.StoreDir = "/nix/store"
	}
	bw := bufio.NewWriterSize(w, 1<<20)
	meta := rand.New(rand.NewPCG(spec.Seed, 0x6e69787961726431))
	var data io.Reader = rand.NewChaCha8(seed32(spec.Seed))
	if spec.Compressible {
		data = &letters{r: data}
	}
	avg := spec.TotalBytes / int64(spec.Count)
	if avg < 1 {
		avg = 1
	}
	infos := make([]PathInfo, 0, spec.Count)
	var hashBytes [20]byte
	for i := range spec.Count {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		for j := range hashBytes {
			hashBytes[j] = byte(meta.Uint32())
		}
		p := PathInfo{
			Path: fmt.Sprintf("%s/%s-%s-%05d", spec.StoreDir, nixbase32.EncodeToString(hashBytes[:]), spec.Name, i),
			Size: avg/2 + meta.Int64N(avg+1),
		}
		if i > 0 && spec.MaxRefs > 0 {
			for range meta.IntN(spec.MaxRefs + 1) {
				p.Refs = append(p.Refs, infos[meta.IntN(i)].Path)
			}
			slices.Sort(p.Refs)
			p.Refs = slices.Compact(p.Refs)
		}
		if err := writeEntry(bw, data, p, i); err != nil {
			return nil, fmt.Errorf("writing %s: %w", p.Path, err)
		}
		infos = append(infos, p)
	}
	writeU64(bw, 0)
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("writing export stream: %w", err)
	}
	return infos, nil
}

// letters maps random bytes to 16 letters: 4 bits of entropy per byte.
type letters struct{ r io.Reader }

func (l *letters) Read(p []byte) (int, error) {
	n, err := l.r.Read(p)
	for i := range p[:n] {
		p[i] = "etaoinshrdlucmfw"[p[i]&15]
	}
	return n, err
}

func seed32(s uint64) [32]byte {
	var b [32]byte
	binary.LittleEndian.PutUint64(b[:], s)
	copy(b[8:], "nixyard-bench-contents!")
	return b
}

// writeEntry writes one export record. Even-numbered paths are a single
// regular file (every third one executable); odd ones are a directory with a
// data file, a small file in a subdirectory and a relative symlink.
func writeEntry(bw *bufio.Writer, data io.Reader, p PathInfo, i int) error {
	writeU64(bw, 1)
	nw := nar.NewWriter(bw)
	if i%2 == 0 {
		if err := nw.WriteHeader(&nar.Header{Type: nar.TypeRegular, Executable: i%3 == 0, Size: p.Size}); err != nil {
			return err
		}
		if _, err := io.CopyN(nw, data, p.Size); err != nil {
			return err
		}
	} else {
		small := min(p.Size, 64)
		hdrs := []struct {
			h    nar.Header
			size int64
		}{
			{nar.Header{Type: nar.TypeDirectory}, 0},
			{nar.Header{Path: "data", Type: nar.TypeRegular, Size: p.Size - small}, p.Size - small},
			{nar.Header{Path: "lib", Type: nar.TypeDirectory}, 0},
			{nar.Header{Path: "lib/info", Type: nar.TypeRegular, Size: small}, small},
			{nar.Header{Path: "link", Type: nar.TypeSymlink, LinkTarget: "data"}, 0},
		}
		for _, e := range hdrs {
			if err := nw.WriteHeader(&e.h); err != nil {
				return err
			}
			if e.size > 0 {
				if _, err := io.CopyN(nw, data, e.size); err != nil {
					return err
				}
			}
		}
	}
	if err := nw.Close(); err != nil {
		return err
	}
	writeU64(bw, exportMagic)
	writeString(bw, p.Path)
	writeU64(bw, uint64(len(p.Refs)))
	for _, r := range p.Refs {
		writeString(bw, r)
	}
	writeString(bw, "") // deriver
	writeU64(bw, 0)     // no signature follows
	return nil
}

func writeU64(bw *bufio.Writer, v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	bw.Write(b[:]) // errors are sticky in bufio.Writer and surface at Flush
}

func writeString(bw *bufio.Writer, s string) {
	writeU64(bw, uint64(len(s)))
	bw.WriteString(s)
	if pad := (8 - len(s)%8) % 8; pad > 0 {
		var z [8]byte
		bw.Write(z[:pad])
	}
}
