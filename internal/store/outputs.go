package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nar"
	"github.com/nixyard/nixyard/internal/nix/contentaddress"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// This file is what a builder needs from the store: the locks on the
// output paths of a derivation being built, and the registration of what
// the builder produced (Nix's LocalDerivationGoal::registerOutputs).

// StateDir returns the real path of the state directory (ROOT/nix/var/nix),
// where builders keep the build-user lock files (userpool).
func (s *Store) StateDir() string { return s.cfg.StateDir }

// OutputLocks is a set of held per-path locks on the output paths of a
// derivation, taken before building it. The paths are also temporary roots
// of this process while the locks are held. An OutputLocks is not safe for
// concurrent use.
type OutputLocks struct {
	s      *Store
	locks  map[storepath.Path]*pathLock
	rooted []storepath.Path
	epoch  uint64 // Store.syncEpoch once locked, before the build writes anything
}

// LockOutputs locks paths (in sorted order, so two builders of
// overlapping sets cannot deadlock) against other goroutines and other
// processes (a real nix-daemon on the same store takes the same locks),
// waiting until ctx is done. Unlock releases them.
func (s *Store) LockOutputs(ctx context.Context, paths []storepath.Path) (*OutputLocks, error) {
	l := &OutputLocks{s: s, locks: map[storepath.Path]*pathLock{}}
	sorted := storepath.Sort(slices.Clone(paths))
	for _, p := range slices.Compact(sorted) {
		if err := l.lock(ctx, p); err != nil {
			l.Unlock()
			return nil, err
		}
	}
	// After the wait for the locks, before the build writes anything.
	l.epoch = s.syncEpoch()
	return l, nil
}

func (l *OutputLocks) lock(ctx context.Context, p storepath.Path) error {
	if l.locks[p] != nil {
		return nil
	}
	if err := l.s.roots.add(ctx, p); err != nil {
		return err
	}
	l.rooted = append(l.rooted, p)
	pl, err := l.s.lockPath(ctx, p)
	if err != nil {
		return fmt.Errorf("store: locking output %s: %w", l.s.abs(p), err)
	}
	l.locks[p] = pl
	return nil
}

// Unlock releases the locks and temporary roots. It may be called more
// than once.
func (l *OutputLocks) Unlock() {
	if l == nil {
		return
	}
	for p, pl := range l.locks {
		pl.unlock()
		delete(l.locks, p)
	}
	for _, p := range l.rooted {
		l.s.roots.remove(p)
	}
	l.rooted = nil
}

// BuiltOutput is one output produced by a builder, to be registered.
type BuiltOutput struct {
	Name string         // output name, for error messages
	Path storepath.Path // the store path it is registered as
	// Src is the real path where the builder left the output tree (e.g.
	// inside a sandbox root); it is moved to the store. "" means the
	// output is already at its place in the store (unsandboxed builds).
	Src string
	// CA is the content address of a fixed output ("fixed:r:sha256:…"),
	// checked against Path and the scanned references; "" for
	// input-addressed outputs.
	CA string
	// Replace: the path may be valid already, its files damaged (a
	// repair): the new tree is made durable, swapped in atomically, the
	// path's info updated, and the old files deleted once it is
	// registered. Src must be set. The new files are not hard-linked to
	// others (auto-optimise-store), which may be the damaged ones.
	Replace bool
}

// Register makes the outputs valid, as Nix's registerOutputs does: each
// tree is given to the daemon's user and group, canonicalised (mtime 1,
// modes 0444/0555, no setuid/setgid bits), serialised as a NAR that is
// hashed (sha256), measured and scanned for the hash parts of candidates
// and of the outputs themselves (its references), moved into place, and
// then all outputs are registered in one transaction with deriver, ultimate
// set and their references. Every output path must be locked by l (paths
// not yet locked are locked first, waiting). Candidates must be valid.
// check, if not nil, sees the outputs' infos (by output name) before
// they are made durable and registered; its error is returned as it is.
// On error nothing is registered; trees already moved into place stay
// there, invalid, for the next attempt or the garbage collector, and
// replaced trees (Replace) are swapped back.
func (l *OutputLocks) Register(ctx context.Context, deriver storepath.Path, outs []BuiltOutput, candidates []storepath.Path, check func(map[string]PathInfo) error) ([]PathInfo, error) {
	s := l.s
	drvAbs := s.abs(deriver)
	byHash := make(map[string]storepath.Path, len(candidates)+len(outs))
	for _, c := range candidates {
		byHash[c.HashPart()] = c
	}
	for _, o := range outs {
		byHash[o.Path.HashPart()] = o.Path
	}
	pending := make([]*pendingPath, 0, len(outs))
	byName := make(map[string]PathInfo, len(outs))
	// Replaced trees: the new one is at dest, the old one at src.
	type swapped struct{ src, dest string }
	var replaced []swapped
	ok := false
	defer func() {
		for _, sw := range replaced {
			if ok {
				if err := removeAll(sw.src); err != nil {
					s.log.Warn("deleting the replaced files of a repaired output", "path", sw.src, "err", err)
				}
			} else if err := exchange(sw.src, sw.dest); err != nil {
				s.log.Error("putting back the files of an output whose repair failed", "path", sw.dest, "err", err)
			}
		}
	}()
	for _, o := range outs {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if err := l.lock(ctx, o.Path); err != nil {
			return nil, err
		}
		dest := s.RealPath(o.Path)
		src := o.Src
		if src == "" {
			src = dest
		}
		info, err := s.outputInfo(deriver, o, src, byHash)
		if err != nil {
			return nil, err
		}
		switch {
		case o.Replace && src != dest && exists(dest):
			// The new files are durable before they take the valid path's
			// place, as in a repair from a cache (addUnpacked).
			if err := s.syncTrees([]string{src}, info.NarSize, l.epoch); err != nil {
				return nil, fmt.Errorf("store: output '%s' of '%s': %w", o.Name, drvAbs, err)
			}
			if err := exchange(src, dest); err != nil {
				return nil, fmt.Errorf("store: replacing output '%s' of '%s': %w", o.Name, drvAbs, err)
			}
			replaced = append(replaced, swapped{src, dest})
		case src != dest:
			if err := removeAll(dest); err != nil {
				return nil, fmt.Errorf("store: deleting leftover %s: %w", dest, err)
			}
			if err := os.Rename(src, dest); err != nil {
				return nil, fmt.Errorf("store: moving output '%s' of '%s' into place: %w", o.Name, drvAbs, err)
			}
		}
		if !o.Replace {
			// Not for a repair: its files may be the very links that were
			// damaged, which optimising checks by size only.
			s.optimiseNew(ctx, dest)
		}
		pending = append(pending, &pendingPath{info: info, epoch: l.epoch})
		byName[o.Name] = info
	}
	if len(pending) == 0 {
		return nil, nil
	}
	if check != nil {
		if err := check(byName); err != nil {
			return nil, err
		}
	}
	// All outputs made durable at once, as a batch of added paths is.
	if err := s.syncPending(pending); err != nil {
		return nil, fmt.Errorf("store: outputs of '%s': %w", drvAbs, err)
	}
	if err := s.register(ctx, pending); err != nil {
		return nil, fmt.Errorf("store: registering outputs of '%s': %w", drvAbs, err)
	}
	ok = true
	infos := make([]PathInfo, len(pending))
	for i, pp := range pending {
		infos[i] = pp.info
	}
	return infos, nil
}

// outputInfo makes the tree at src, output o of deriver, the daemon's and
// canonical, and returns its info as Register registers it: its NAR's
// hash and size, its references (the hash parts of byHash that it holds),
// ultimate, signed with the daemon's keys; a fixed output's content
// address is checked.
func (s *Store) outputInfo(deriver storepath.Path, o BuiltOutput, src string, byHash map[string]storepath.Path) (PathInfo, error) {
	drvAbs := s.abs(deriver)
	fail := func(err error) (PathInfo, error) {
		return PathInfo{}, fmt.Errorf("store: output '%s' of '%s': %w", o.Name, drvAbs, err)
	}
	if err := ChownTree(src, os.Geteuid(), os.Getegid()); err != nil {
		return fail(err)
	}
	if err := nar.Canonicalise(src); err != nil {
		return fail(err)
	}
	dig := newNARDigest()
	scan := NewRefScanner(byHash)
	if err := nar.DumpPath(io.MultiWriter(dig, scan), src); err != nil {
		return fail(err)
	}
	narHash, narSize := dig.Sum()
	info := PathInfo{
		Path:       o.Path,
		Deriver:    deriver,
		NarHash:    narHash,
		NarSize:    narSize,
		References: scan.Found(),
		Ultimate:   true,
		CA:         o.CA,
	}
	if o.CA != "" && len(info.References) > 0 {
		// A fixed output may not refer to other paths (its path says
		// nothing of them), in the words of Nix's older releases (2.8
		// fails an assertion).
		return PathInfo{}, errors.New(hint.Fmt("illegal path references in fixed-output derivation '%s'", drvAbs))
	}
	if o.CA != "" {
		ca, err := contentaddress.Parse(o.CA)
		if err != nil {
			return fail(err)
		}
		if err := s.checkCAPath(info, ca); err != nil {
			return PathInfo{}, err
		}
	}
	s.sign(&info)
	return info, nil
}

// ChownTree gives every inode under path (not following symlinks) to
// uid:gid, as canonicalisePathMetaData does for build outputs.
func ChownTree(path string, uid, gid int) error {
	return walkNoFollow(path, func(p string, _, _ bool) error {
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return fmt.Errorf("getting status of %s: %w", p, err)
		}
		if int(st.Uid) == uid && int(st.Gid) == gid {
			return nil
		}
		if err := unix.Lchown(p, uid, gid); err != nil {
			return fmt.Errorf("changing owner of %s: %w", p, err)
		}
		return nil
	})
}

// RefScanner is an io.Writer that looks for the 32-character hash parts of
// a set of store paths in what is written to it, as Nix's RefScanSink
// scans a NAR for references. It is not safe for concurrent use.
type RefScanner struct {
	want  map[string]storepath.Path
	found map[storepath.Path]bool
	tail  []byte // the last HashLen-1 bytes seen, for hashes split across writes
}

// NewRefScanner returns a scanner for the paths in want, keyed by hash part.
func NewRefScanner(want map[string]storepath.Path) *RefScanner {
	return &RefScanner{want: want, found: map[storepath.Path]bool{}}
}

var isBase32 = func() (t [256]bool) {
	// nixbase32 alphabet (the nixbase32 package keeps its own unexported).
	for _, c := range []byte("0123456789abcdfghijklmnpqrsvwxyz") {
		t[c] = true
	}
	return t
}()

// Write scans p. It never fails.
func (r *RefScanner) Write(p []byte) (int, error) {
	const n = storepath.HashLen
	if len(r.tail) > 0 {
		// Windows that start in the tail and end in p.
		buf := append(slices.Clone(r.tail), p[:min(len(p), n-1)]...)
		r.scan(buf)
	}
	r.scan(p)
	if len(p) >= n-1 {
		r.tail = append(r.tail[:0], p[len(p)-(n-1):]...)
	} else {
		r.tail = append(r.tail, p...)
		if len(r.tail) > n-1 {
			r.tail = r.tail[len(r.tail)-(n-1):]
		}
	}
	return len(p), nil
}

// scan finds every window of HashLen base-32 characters in b that is a
// wanted hash part, skipping ahead past any character that cannot be part
// of a hash (the Boyer–Moore-like step Nix uses).
func (r *RefScanner) scan(b []byte) {
	const n = storepath.HashLen
	for i := 0; i+n <= len(b); {
		j := n - 1
		for j >= 0 && isBase32[b[i+j]] {
			j--
		}
		if j >= 0 {
			i += j + 1
			continue
		}
		if p, ok := r.want[string(b[i:i+n])]; ok {
			r.found[p] = true
		}
		i++
	}
}

// Found returns the paths whose hash parts were seen, sorted.
func (r *RefScanner) Found() []storepath.Path {
	out := make([]storepath.Path, 0, len(r.found))
	for p := range r.found {
		out = append(out, p)
	}
	return storepath.Sort(out)
}

// exists reports whether path exists (a dangling symlink does).
func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
