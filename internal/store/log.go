package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
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

// AddBuildLog stores the build log of a derivation where Nix keeps it,
// <LogDir>/drvs/<first 2 chars>/<rest of the base name>.bz2, unless a log
// is already there. The log is compressed with the system's bzip2 (Go's
// standard library only decompresses); logs of at most plainLogMax bytes,
// and all logs where bzip2 is missing, are stored uncompressed under the
// name without .bz2, which `nix log` reads as well.
func (s *Store) AddBuildLog(ctx context.Context, drv storepath.Path, log io.Reader) error {
	if !drv.IsDerivation() {
		return fmt.Errorf("store: build log for %s: not a derivation", s.abs(drv))
	}
	base := drv.String()
	dir := filepath.Join(s.cfg.LogDir, "drvs", base[:2])
	logPath := filepath.Join(dir, base[2:])
	for _, p := range []string{logPath, logPath + ".bz2"} {
		if _, err := os.Stat(p); err == nil {
			return nil
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
	tmp := fmt.Sprintf("%s.tmp.%d", dest, os.Getpid())
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
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
		return fmt.Errorf("store: writing %s: %w", dest, errors.Join(err))
	}
	return nil
}
