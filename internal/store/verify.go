package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/nixbase32"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// VerifyStore checks the store as `nix-store --verify [--check-contents]`:
// valid paths missing on disk are removed from the database when no valid
// path refers to them (and reported as errors when one does); with
// checkContents, the files of .links and every valid path are hashed and
// mismatches reported ("path '…' was modified! expected hash '…', got
// '…'"). With repair, corrupt links are dropped, and a modified path, or
// a missing one that valid paths refer to, is handed to repairPath (nil:
// it stays an error), which fetches it again from a binary cache as Nix's
// repairPath does. It returns whether errors were found (a path that could
// not be repaired is one).
func (s *Store) VerifyStore(ctx context.Context, checkContents, repair bool, repairPath func(context.Context, storepath.Path) error, log VerifyLog) (bool, error) {
	if log == nil {
		log = func(LogLevel, string) {}
	}
	errorsFound, broken, err := s.verify(ctx, checkContents, repair, log)
	if err != nil || !repair {
		return errorsFound || len(broken) > 0, err
	}
	// Repaired after the shared gc.lock is released: a repair adds a
	// path, which may wait for an automatic collection, which needs that
	// lock exclusively.
	for _, p := range broken {
		err := ErrNotRepairable
		if repairPath != nil {
			err = repairPath(ctx, p)
		}
		if err == nil {
			continue
		}
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		errorsFound = true
		// In Nix's words: a warning for a missing path (verifyPath goes
		// on), an error for a modified one; the cause only if it is not
		// merely that no cache has the path.
		msg := fmt.Sprintf("cannot repair path '%s'", s.abs(p))
		if !errors.Is(err, ErrNotRepairable) {
			msg += ": " + err.Error()
		}
		if _, serr := os.Lstat(s.RealPath(p)); os.IsNotExist(serr) {
			log(LogWarn, "warning: "+msg)
		} else {
			log(LogError, "error: "+msg)
		}
	}
	return errorsFound, nil
}

// ErrNotRepairable is returned by a repair that found no binary cache or
// derivation to make the path again from.
var ErrNotRepairable = errors.New("no binary cache to fetch it from")

// LogLevel is the level of a message, as Nix's verbosity levels.
type LogLevel int

const (
	LogError LogLevel = iota
	LogWarn
	LogNotice
	LogInfo
	LogTalkative
)

// VerifyLog receives VerifyStore's messages, at the levels Nix prints
// them.
type VerifyLog func(level LogLevel, msg string)

// verify is VerifyStore's check, under gc.lock shared; broken are the
// valid paths to repair: those whose contents do not match their hash,
// and with repair those missing that valid paths refer to.
func (s *Store) verify(ctx context.Context, checkContents, repair bool, log VerifyLog) (errorsFound bool, broken []storepath.Path, err error) {
	log(LogInfo, "reading the Nix store...")
	// gc.lock shared: no collector deletes paths while we look.
	lockPath := s.stateFile("gc.lock")
	f, err := openLockFile(lockPath)
	if err != nil {
		return false, nil, err
	}
	defer f.Close()
	if err := lockFD(ctx, f, unix.LOCK_SH, func() { log(LogInfo, waitingForGCLock) }); err != nil {
		return false, nil, err
	}
	v := &verifier{s: s, repair: repair, log: log,
		done: map[storepath.Path]bool{}, present: map[storepath.Path]bool{}, missing: map[storepath.Path]bool{}}
	if err := v.checkExistence(ctx); err != nil {
		return false, nil, err
	}
	if checkContents {
		if err := v.checkLinks(ctx); err != nil {
			return false, nil, err
		}
		if err := v.checkContents(ctx); err != nil {
			return false, nil, err
		}
	}
	return v.errorsFound, v.broken, nil
}

// verifier is the state of one verify, as its phases find things out.
type verifier struct {
	s      *Store
	repair bool
	log    VerifyLog

	onDisk  map[string]bool         // the store directory's entries
	done    map[storepath.Path]bool // valid paths looked at
	present map[storepath.Path]bool // valid paths on disk
	missing map[storepath.Path]bool // not on disk, yet valid (referred to)

	errorsFound bool
	broken      []storepath.Path
}

// checkExistence finds the valid paths whose files are gone: each is
// invalidated, unless valid paths still refer to it (then it is an error,
// or with repair a path to repair).
func (v *verifier) checkExistence(ctx context.Context) error {
	s := v.s
	ents, err := os.ReadDir(s.realDir)
	if err != nil {
		return fmt.Errorf("store: reading %s: %w", s.realDir, err)
	}
	v.onDisk = make(map[string]bool, len(ents))
	for _, e := range ents {
		v.onDisk[e.Name()] = true
	}
	v.log(LogInfo, "checking path existence...")
	all, err := s.QueryAllValidPaths(ctx)
	if err != nil {
		return err
	}
	for _, p := range all {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := v.verifyPath(ctx, p); err != nil {
			return err
		}
	}
	return nil
}

// verifyPath looks at the valid path p (and, if it is gone, at its
// referrers first), as Nix's verifyPath.
func (v *verifier) verifyPath(ctx context.Context, p storepath.Path) error {
	s := v.s
	if v.done[p] {
		return nil
	}
	v.done[p] = true
	if v.onDisk[p.String()] {
		v.present[p] = true
		return nil
	}
	referrers, err := s.QueryReferrers(ctx, p)
	if err != nil {
		return err
	}
	canInvalidate := true
	for _, r := range referrers {
		if r == p {
			continue
		}
		if err := v.verifyPath(ctx, r); err != nil {
			return err
		}
		if v.present[r] || v.missing[r] { // r stays valid
			canInvalidate = false
		}
	}
	if canInvalidate {
		v.log(LogInfo, fmt.Sprintf("path '%s' disappeared, removing from database...", s.abs(p)))
		if err := s.db.write(ctx, []storepath.Path{p}, func(tx *sql.Tx) error {
			_, err := tx.StmtContext(ctx, s.db.wInvalidate).ExecContext(ctx, s.abs(p))
			return err
		}); err != nil {
			return fmt.Errorf("store: invalidating %s: %w", s.abs(p), err)
		}
		return nil
	}
	v.log(LogError, fmt.Sprintf("path '%s' disappeared, but it still has valid referrers!", s.abs(p)))
	v.missing[p] = true
	if v.repair {
		// Referrers are reached first: prepended, references come
		// first, so that a rebuild finds its inputs.
		v.broken = append([]storepath.Path{p}, v.broken...)
	} else {
		v.errorsFound = true
	}
	return nil
}

// checkLinks checks that every file of .links still has the contents its
// name says; with repair, a modified one is removed.
func (v *verifier) checkLinks(ctx context.Context) error {
	v.log(LogInfo, "checking link hashes...")
	links := v.s.realDir + "/.links"
	lents, err := os.ReadDir(links)
	if err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("store: reading %s: %w", links, err)
	}
	for _, e := range lents {
		if err := ctx.Err(); err != nil {
			return err
		}
		lp := links + "/" + e.Name()
		v.log(LogTalkative, fmt.Sprintf("checking contents of '%s'", e.Name()))
		h, _, err := hashPathNAR(lp)
		if err != nil {
			return err
		}
		if got := nixbase32.EncodeToString(h.Digest); got != e.Name() {
			v.log(LogError, fmt.Sprintf("link '%s' was modified! expected hash '%s', got '%s'", lp, e.Name(), got))
			if !v.repair {
				v.errorsFound = true
				continue
			}
			if err := os.Remove(lp); err != nil {
				return fmt.Errorf("store: removing corrupt link %s: %w", lp, err)
			}
			v.log(LogInfo, fmt.Sprintf("removed link '%s'", lp))
		}
	}
	return nil
}

// checkContents hashes every valid path on disk against its NAR hash;
// one that differs is broken. A missing NAR size is filled in.
func (v *verifier) checkContents(ctx context.Context) error {
	s := v.s
	v.log(LogInfo, "checking store hashes...")
	for _, p := range slices.SortedFunc(maps.Keys(v.present), storepath.Compare) {
		if err := ctx.Err(); err != nil {
			return err
		}
		info, err := s.QueryPathInfo(ctx, p)
		if err != nil {
			v.log(LogWarn, fmt.Sprintf("warning: %v", err))
			v.errorsFound = true
			continue
		}
		v.log(LogTalkative, fmt.Sprintf("checking contents of '%s'", s.abs(p)))
		got, size, err := hashPathNAR(s.RealPath(p))
		if err != nil {
			v.log(LogError, fmt.Sprintf("error: %v", err))
			v.errorsFound = true
			continue
		}
		if !got.Equal(info.NarHash) {
			v.log(LogError, fmt.Sprintf("path '%s' was modified! expected hash '%s', got '%s'", s.abs(p), info.NarHash, got))
			v.broken = append(v.broken, p)
			continue
		}
		if info.NarSize == 0 {
			v.log(LogInfo, fmt.Sprintf("updating size field on '%s' to %d", s.abs(p), size))
			if err := s.db.write(ctx, []storepath.Path{p}, func(tx *sql.Tx) error {
				_, err := tx.ExecContext(ctx, "update ValidPaths set narSize = ? where path = ?", int64(size), s.abs(p))
				return err
			}); err != nil {
				return fmt.Errorf("store: updating %s: %w", s.abs(p), err)
			}
		}
	}
	return nil
}

// ContentsGood reports whether the files of the valid path p still
// serialise to the NAR hash it was registered with (Nix's
// pathContentsGood), as `nix-store -r --repair` checks before it fetches
// a path again.
func (s *Store) ContentsGood(ctx context.Context, p storepath.Path) (bool, error) {
	info, err := s.QueryPathInfo(ctx, p)
	if err != nil {
		return false, err
	}
	got, _, err := hashPathNAR(s.RealPath(p))
	if err != nil {
		return false, err
	}
	return got.Equal(info.NarHash), nil
}

// hashPathNAR returns the sha256 and size of the NAR serialisation of a
// file-system tree.
func hashPathNAR(path string) (hash.Hash, uint64, error) {
	dig := newNARDigest()
	if err := nar.DumpPath(dig, path); err != nil {
		return hash.Hash{}, 0, fmt.Errorf("store: hashing %s: %w", path, err)
	}
	h, n := dig.Sum()
	return h, n, nil
}
