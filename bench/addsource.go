package bench

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
)

// AddSource makes a local chroot store at root holding spec.Count
// content-addressed paths, as `nix-store --add` makes them (CA
// fixed:r:sha256, no references): files and directories of the shapes and
// sizes WriteExport uses, written to a scratch directory beside root and
// added in one call. It returns their store paths. spec.MaxRefs and
// spec.StoreDir are not used.
func AddSource(ctx context.Context, env *Env, root string, spec ExportSpec) ([]string, error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(filepath.Dir(root), "add-")
	if err != nil {
		return nil, fmt.Errorf("scratch directory for the added source: %w", err)
	}
	defer os.RemoveAll(dir)
	names, err := WriteTrees(ctx, dir, spec)
	if err != nil {
		return nil, err
	}
	out, err := Nix(ctx, env, nil, "nix-store", append([]string{"--store", "local?root=" + root, "--add"}, names...)...)
	if err != nil {
		return nil, fmt.Errorf("adding the source store %s: %w", root, err)
	}
	paths := strings.Fields(string(out))
	if len(paths) != len(names) {
		return nil, fmt.Errorf("nix-store --add printed %d paths, want %d", len(paths), len(names))
	}
	return paths, nil
}

// WriteTrees writes spec.Count entries named <Name>-<index> into dir and
// returns their paths: even-numbered ones a single regular file (every
// third one executable), odd ones a directory with a data file, a small
// file in a subdirectory and a relative symlink, as WriteExport's NARs.
// Sizes average spec.TotalBytes / spec.Count; contents are pseudo-random
// (nothing deduplicates; nothing compresses unless spec.Compressible). The
// same spec always writes the same bytes.
func WriteTrees(ctx context.Context, dir string, spec ExportSpec) ([]string, error) {
	if spec.Count <= 0 {
		return nil, fmt.Errorf("tree spec: count %d", spec.Count)
	}
	sizes := rand.New(rand.NewPCG(spec.Seed, 0x7472656573)) // "trees"
	var data io.Reader = rand.NewChaCha8(seed32(spec.Seed))
	if spec.Compressible {
		data = &letters{r: data}
	}
	avg := max(spec.TotalBytes/int64(spec.Count), 1)
	names := make([]string, 0, spec.Count)
	for i := range spec.Count {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		name := filepath.Join(dir, fmt.Sprintf("%s-%05d", spec.Name, i))
		size := avg/2 + sizes.Int64N(avg+1)
		if err := writeTree(name, data, size, i); err != nil {
			return nil, fmt.Errorf("writing %s: %w", name, err)
		}
		names = append(names, name)
	}
	return names, nil
}

// writeTree writes entry i of WriteTrees at name with size bytes of data.
func writeTree(name string, data io.Reader, size int64, i int) error {
	if i%2 == 0 {
		mode := os.FileMode(0o644)
		if i%3 == 0 {
			mode = 0o755
		}
		return writeFile(name, data, size, mode)
	}
	small := min(size, 64)
	if err := os.MkdirAll(filepath.Join(name, "lib"), 0o755); err != nil {
		return err
	}
	if err := writeFile(filepath.Join(name, "data"), data, size-small, 0o644); err != nil {
		return err
	}
	if err := writeFile(filepath.Join(name, "lib/info"), data, small, 0o644); err != nil {
		return err
	}
	return os.Symlink("data", filepath.Join(name, "link"))
}

func writeFile(path string, data io.Reader, size int64, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := io.CopyN(f, data, size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
