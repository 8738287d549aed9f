package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// AddBuildLog stores the build log of a derivation where Nix keeps it,
// <LogDir>/drvs/<first 2 chars>/<rest of the base name>.bz2, unless a log
// is already there. The log is compressed with the system's bzip2 (Go's
// standard library only decompresses); where bzip2 is missing it is stored
// uncompressed under the name without .bz2, which `nix log` reads as well.
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
	bzip2, lookErr := exec.LookPath("bzip2")
	dest := logPath + ".bz2"
	if lookErr != nil {
		dest = logPath
	}
	tmp := fmt.Sprintf("%s.tmp.%d", dest, os.Getpid())
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("store: writing %s: %w", dest, err)
	}
	if lookErr == nil {
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
