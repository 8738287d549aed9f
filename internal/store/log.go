package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// plainLogMax is the size up to which a build log is stored uncompressed:
// such a file takes one file-system block compressed or not, and running
// bzip2 for it (a process per build) was a large share of the time of a
// trivial build.
const plainLogMax = 4096

// AddBuildLog stores a build log a client sends (AddBuildLog) where Nix
// keeps it, <LogDir>/drvs/<first 2 chars>/<rest of the base name>.bz2,
// unless a log is already there, as Nix's addBuildLog. The log is
// compressed with the system's bzip2 (Go's standard library only
// decompresses); logs of at most plainLogMax bytes, and all logs where
// bzip2 is missing, are stored uncompressed under the name without .bz2,
// which `nix log` reads as well.
func (s *Store) AddBuildLog(ctx context.Context, drv storepath.Path, log io.Reader) error {
	return s.writeBuildLog(ctx, drv, log, false)
}

// PutBuildLog stores the log of a build that ran for this store, as
// AddBuildLog does, but replacing the log of an earlier build: Nix writes
// each build's log afresh, so that `nix log` shows the latest.
func (s *Store) PutBuildLog(ctx context.Context, drv storepath.Path, log io.Reader) error {
	return s.writeBuildLog(ctx, drv, log, true)
}

func (s *Store) writeBuildLog(ctx context.Context, drv storepath.Path, log io.Reader, replace bool) error {
	if !drv.IsDerivation() {
		return fmt.Errorf("store: build log for %s: not a derivation", s.abs(drv))
	}
	base := drv.String()
	dir := filepath.Join(s.cfg.LogDir, "drvs", base[:2])
	logPath := filepath.Join(dir, base[2:])
	if !replace {
		for _, p := range []string{logPath, logPath + ".bz2"} {
			if _, err := os.Stat(p); err == nil {
				return nil
			}
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("store: creating %s: %w", dir, err)
	}
	head := make([]byte, plainLogMax+1)
	n, err := io.ReadFull(log, head)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return fmt.Errorf("store: reading the build log of %s: %w", s.abs(drv), err)
	}
	log = io.MultiReader(bytes.NewReader(head[:n]), log)
	bzip2 := ""
	if n > plainLogMax {
		if p, err := exec.LookPath("bzip2"); err == nil {
			bzip2 = p
		}
	}
	dest := logPath + ".bz2"
	if bzip2 == "" {
		dest = logPath
	}
	f, err := os.CreateTemp(dir, filepath.Base(dest)+".tmp.")
	if err != nil {
		return fmt.Errorf("store: writing %s: %w", dest, err)
	}
	tmp := f.Name()
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("store: writing %s: %w", dest, err)
	}
	if bzip2 != "" {
		cmd := exec.CommandContext(ctx, bzip2, "-c")
		cmd.Stdin = log
		cmd.Stdout = f
		err = cmd.Run()
	} else {
		_, err = io.Copy(f, log)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, dest)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("store: writing %s: %w", dest, err)
	}
	if !replace {
		return nil
	}
	// An earlier log under the other name would be read instead (nix log
	// tries the plain name first) or kept beside.
	other := logPath
	if dest == logPath {
		other = logPath + ".bz2"
	}
	if err := os.Remove(other); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("store: removing the earlier log %s: %w", other, err)
	}
	return nil
}
