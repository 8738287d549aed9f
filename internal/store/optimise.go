package store

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/nixbase32"
)

// OptimiseStore hard-links identical files and symlinks of all valid
// paths through <store>/.links/<nix32 sha256 of the file's NAR
// serialisation>, as Nix's optimiseStore on Linux (executable and plain
// files with the same contents differ in their NAR, so they are never
// linked; a symlink is linked itself, by its target's name). ev's
// functions, those not nil, are told how it goes.
func (s *Store) OptimiseStore(ctx context.Context, ev OptimiseEvents) error {
	links := s.realDir + "/.links"
	if err := os.MkdirAll(links, 0o755); err != nil {
		return fmt.Errorf("store: creating %s: %w", links, err)
	}
	// Inodes already in .links: files with these are linked already.
	inodes := map[uint64]bool{}
	ents, err := os.ReadDir(links)
	if err != nil {
		return fmt.Errorf("store: reading %s: %w", links, err)
	}
	for _, e := range ents {
		var st unix.Stat_t
		if unix.Lstat(links+"/"+e.Name(), &st) == nil {
			inodes[st.Ino] = true
		}
	}
	paths, err := s.QueryAllValidPaths(ctx)
	if err != nil {
		return err
	}
	ss := s.OpenSession()
	ss.passive = true
	defer ss.Close()
	o := optimiser{s: s, links: links, inodes: inodes, onLinked: ev.Linked, log: ev.Log}
	o.say(LogTalkative, fmt.Sprintf("loaded %d hash inodes", len(inodes)))
	if ev.Progress != nil {
		ev.Progress(0, len(paths))
	}
	for i, p := range paths {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := ss.AddTempRoot(ctx, p); err != nil {
			return err
		}
		if ok, err := s.IsValidPathFresh(ctx, p); err != nil { // it is about to be written to
			return err
		} else if !ok {
			continue
		}
		if ev.Path != nil {
			ev.Path(s.abs(p))
		}
		if err := o.optimise(ctx, s.RealPath(p)); err != nil {
			return err
		}
		if ev.Progress != nil {
			ev.Progress(i+1, len(paths))
		}
	}
	return nil
}

// OptimiseEvents are what OptimiseStore tells as it goes, as Nix's
// optimiseStore tells its client.
type OptimiseEvents struct {
	// Progress: done of total valid paths are optimised.
	Progress func(done, total int)
	// Path: the path (absolute) is being optimised; the Linked calls
	// that follow, until the next Progress, are about its files.
	Path func(abs string)
	// Linked: a file was replaced by a link, freeing these bytes and
	// 512-byte blocks.
	Linked func(bytesFreed, blocksFreed uint64)
	// Log gets the messages Nix's optimiser gives its client, at its
	// levels (warnings start with "warning: "); they are in the daemon's
	// log too.
	Log VerifyLog
}

// optimiseNew hard-links the files of a new path (tree, on the host) to
// identical ones already in the store when auto-optimise-store is on. It
// runs in the goroutine that wrote the path, before the path is made
// durable (so the links are too) and registered. A failure costs only the
// saving: it is logged, and the path is added as it is.
func (s *Store) optimiseNew(ctx context.Context, tree string) {
	if !s.cfg.AutoOptimise {
		return
	}
	links := s.realDir + "/.links"
	if err := os.MkdirAll(links, 0o755); err != nil {
		s.log.Warn("cannot optimise new path", "path", tree, "err", err)
		return
	}
	o := optimiser{s: s, links: links, inodes: map[uint64]bool{}}
	if err := o.optimise(ctx, tree); err != nil {
		s.log.Warn("cannot optimise new path", "path", tree, "err", err)
	}
}

type optimiser struct {
	s        *Store
	links    string
	inodes   map[uint64]bool
	onLinked func(bytesFreed, blocksFreed uint64)
	log      VerifyLog // nil: the daemon's log only
}

// say tells msg to the client (if any) at level; warnings, and the
// failures to link, go to the daemon's log too.
func (o *optimiser) say(level LogLevel, msg string) {
	if o.log != nil {
		o.log(level, msg)
	}
	switch {
	case level == LogWarn:
		o.s.log.Warn(strings.TrimPrefix(msg, "warning: "))
	case level <= LogInfo:
		o.s.log.Info(msg)
	}
}

func (o *optimiser) optimise(ctx context.Context, path string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return fmt.Errorf("store: getting status of %s: %w", path, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		ents, err := os.ReadDir(path)
		if err != nil {
			return fmt.Errorf("store: reading %s: %w", path, err)
		}
		for _, e := range ents {
			if err := o.optimise(ctx, path+"/"+e.Name()); err != nil {
				return err
			}
		}
		return nil
	case unix.S_IFREG, unix.S_IFLNK:
	default:
		return nil
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG && st.Mode&unix.S_IWUSR != 0 {
		o.say(LogWarn, fmt.Sprintf("warning: skipping suspicious writable file '%s'", path))
		return nil
	}
	if st.Nlink > 1 && o.inodes[st.Ino] {
		return nil // already linked
	}
	h, _, err := hashPathNAR(path)
	if err != nil {
		return err
	}
	linkPath := o.links + "/" + nixbase32.EncodeToString(h.Digest)
	var lst unix.Stat_t
	if err := unix.Lstat(linkPath, &lst); err == nil && lst.Size != st.Size {
		o.say(LogWarn, fmt.Sprintf("warning: removing corrupted link '%s'", linkPath))
		o.say(LogWarn, "warning: There may be more corrupted paths.\nYou should run `nix-store --verify --check-contents --repair` to fix them all")
		unix.Unlink(linkPath)
	}
	if err := unix.Lstat(linkPath, &lst); errors.Is(err, unix.ENOENT) {
		err := unix.Link(path, linkPath)
		switch {
		case err == nil:
			o.inodes[st.Ino] = true
			return nil
		case errors.Is(err, unix.EEXIST):
			// Another process made it first: link to theirs.
		case errors.Is(err, unix.ENOSPC):
			o.say(LogInfo, fmt.Sprintf("cannot link '%s' to '%s': No space left on device", linkPath, path))
			return nil
		default:
			return fmt.Errorf("store: cannot link %s to %s: %w", linkPath, path, err)
		}
		if err := unix.Lstat(linkPath, &lst); err != nil {
			return fmt.Errorf("store: getting status of %s: %w", linkPath, err)
		}
	} else if err != nil {
		return fmt.Errorf("store: getting status of %s: %w", linkPath, err)
	}
	if lst.Ino == st.Ino {
		return nil
	}
	o.say(LogTalkative, fmt.Sprintf("linking '%s' to '%s'", path, linkPath))
	// Replace the file with a link to the .links one. Its directory (not
	// the store itself) is made writable for the rename and restored
	// afterwards, with the store's mtime.
	dir := parentDir(path)
	if dir != o.s.realDir {
		var dst unix.Stat_t
		if err := unix.Lstat(dir, &dst); err != nil {
			return fmt.Errorf("store: getting status of %s: %w", dir, err)
		}
		if err := unix.Chmod(dir, dst.Mode&0o7777|unix.S_IWUSR); err != nil {
			return fmt.Errorf("store: making %s writable: %w", dir, err)
		}
		defer func() {
			unix.Chmod(dir, dst.Mode&0o7777)
			unix.UtimesNano(dir, []unix.Timespec{dst.Atim, {Sec: 1}})
		}()
	}
	tmp := fmt.Sprintf("%s/.tmp-link-%d-%d", o.s.realDir, os.Getpid(), rand.Uint32())
	if err := unix.Link(linkPath, tmp); err != nil {
		if errors.Is(err, unix.EMLINK) {
			return nil // too many links to one file (likely an empty file)
		}
		return fmt.Errorf("store: cannot link %s to %s: %w", tmp, linkPath, err)
	}
	if err := unix.Rename(tmp, path); err != nil {
		unix.Unlink(tmp)
		if errors.Is(err, unix.EMLINK) {
			return nil
		}
		return fmt.Errorf("store: replacing %s: %w", path, err)
	}
	if o.onLinked != nil {
		o.onLinked(uint64(st.Size), uint64(st.Blocks))
	}
	return nil
}
