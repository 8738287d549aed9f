package store

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"

	"github.com/nixyard/nixyard/internal/nix/hash"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

const censored = "{censored}"

// rootSet maps a root path to the links (or "{temp:pid}", "/proc/…") that
// make it a root.
type rootSet map[storepath.Path][]string

func (r rootSet) add(p storepath.Path, link string) {
	for _, l := range r[p] {
		if l == link {
			return
		}
	}
	r[p] = append(r[p], link)
}

// inStore reports whether abs lies strictly inside the logical store dir,
// as Nix's isInStore.
func (s *Store) inStore(abs string) bool {
	return strings.HasPrefix(abs, string(s.dir)+"/") && len(abs) > len(s.dir)+1
}

// FindRoots returns every garbage collector root and what makes it one:
// symlinks under gcroots and profiles (followed one level for indirect
// roots), the store paths that running processes use, and temporary roots
// of live processes, including our sessions. With censor, the process and
// temporary roots are reported as "{censored}", as Nix does for untrusted
// clients. Only valid paths are returned, but for temporary roots. A
// stale link under gcroots/auto (its target gone) is removed; log (if not
// nil) is told of it, of roots to invalid paths and of stale temporary
// roots files, as Nix tells the client.
func (s *Store) FindRoots(ctx context.Context, censor bool, log func(msg string)) (map[storepath.Path][]string, error) {
	roots := rootSet{}
	if err := s.findRootsNoTemp(ctx, roots, censor, log); err != nil {
		return nil, err
	}
	pid := os.Getpid()
	temp := rootSet{}
	for _, p := range s.roots.live() {
		temp.add(p, fmt.Sprintf("{temp:%d}", pid))
	}
	if err := s.readTempRootsFiles(func(p storepath.Path, pid int) {
		temp.add(p, fmt.Sprintf("{temp:%d}", pid))
	}, log); err != nil {
		return nil, err
	}
	// As Nix, temporary roots are roots whether valid or not (a path being
	// built or added is one); nixyard's own temporary directories are not
	// paths anyone asked for.
	for p, links := range temp {
		if strings.Contains(p.String(), tempDirSuffix) {
			continue
		}
		for _, l := range links {
			if censor {
				l = censored
			}
			roots.add(p, l)
		}
	}
	return roots, nil
}

// findRootsNoTemp finds the permanent and runtime roots (Nix's
// findRootsNoTemp), telling log about stale links it removes.
func (s *Store) findRootsNoTemp(ctx context.Context, roots rootSet, censor bool, log func(msg string)) error {
	if log == nil {
		log = func(string) {}
	}
	for _, d := range []string{s.stateFile("gcroots"), s.stateFile("profiles")} {
		if err := s.findRootsIn(ctx, d, 0, roots, 0, log); err != nil {
			return err
		}
	}
	return s.findRuntimeRoots(ctx, roots, censor)
}

// maxRootDepth bounds the recursion into gcroots: deeper trees are not
// roots anyone made on purpose, and the bound stops a pathological tree.
const maxRootDepth = 64

// typeRegular stands for a regular file's type in findRootsIn, whose
// typ 0 (a regular file's fs.FileMode type bits) means "not known yet".
const typeRegular = fs.ModeIrregular

// findRootsIn walks one potential root as Nix's findRoots does; typ is
// its type, if known.
func (s *Store) findRootsIn(ctx context.Context, path string, typ fs.FileMode, roots rootSet, depth int, log func(string)) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if depth > maxRootDepth {
		s.log.Warn("garbage collector roots nested too deeply; ignoring", "path", path)
		return nil
	}
	ignorable := func(path string, err error) bool {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.ENOTDIR) {
			s.log.Info("cannot read potential root", "path", path, "err", err)
			return true
		}
		return false
	}
	if typ == 0 {
		st, err := os.Lstat(path)
		if err != nil {
			if ignorable(path, err) {
				return nil
			}
			return fmt.Errorf("store: stat root %s: %w", path, err)
		}
		typ = st.Mode().Type()
		if typ == 0 {
			typ = typeRegular
		}
	}
	found := func(link, target string) error {
		p, _, err := s.dir.ParsePrefix(target)
		if err != nil {
			return nil
		}
		ok, err := s.addValidRoot(ctx, roots, p, link)
		if err == nil && !ok {
			s.log.Debug("skipping invalid root", "link", link, "target", target) // the client is told; each collection would repeat it
			log(fmt.Sprintf("skipping invalid root from '%s' to '%s'", link, target))
		}
		return err
	}
	switch {
	case typ == fs.ModeDir:
		ents, err := os.ReadDir(path)
		if err != nil {
			if ignorable(path, err) {
				return nil
			}
			return fmt.Errorf("store: reading roots directory %s: %w", path, err)
		}
		for _, e := range ents {
			t := e.Type()
			if t == 0 {
				t = typeRegular
			}
			if err := s.findRootsIn(ctx, path+"/"+e.Name(), t, roots, depth+1, log); err != nil {
				return err
			}
		}
	case typ == fs.ModeSymlink:
		target, err := os.Readlink(path)
		if err != nil {
			if ignorable(path, err) {
				return nil
			}
			return fmt.Errorf("store: reading root %s: %w", path, err)
		}
		if s.inStore(target) {
			return found(path, target)
		}
		// An indirect root: a link to a link into the store.
		if !filepath.IsAbs(target) {
			target = filepath.Join(filepath.Dir(path), target)
		}
		st, err := os.Lstat(target)
		if errors.Is(err, fs.ErrNotExist) {
			if isInDir(path, s.stateFile("gcroots", "auto")) {
				log(fmt.Sprintf("removing stale link from '%s' to '%s'", path, target))
				if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
					s.log.Warn("removing stale link", "link", path, "err", err)
				}
			}
			return nil
		}
		if err != nil {
			if ignorable(target, err) {
				return nil
			}
			return fmt.Errorf("store: stat %s: %w", target, err)
		}
		if st.Mode().Type() != fs.ModeSymlink {
			return nil
		}
		target2, err := os.Readlink(target)
		if err != nil {
			if ignorable(target, err) {
				return nil
			}
			return fmt.Errorf("store: reading root %s: %w", target, err)
		}
		if s.inStore(target2) {
			return found(target, target2)
		}
	case typ == typeRegular:
		// A regular file named after a store path is a root too.
		p, err := storepath.ParseBase(filepath.Base(path))
		if err != nil {
			return nil
		}
		_, err = s.addValidRoot(ctx, roots, p, path)
		return err
	}
	return nil
}

func isInDir(path, dir string) bool {
	return strings.HasPrefix(path, dir+"/") && len(path) > len(dir)+1
}

// findRuntimeRoots adds the store paths that running processes use (their
// executables, working directories, open files, mappings and environment),
// as Nix's findRuntimeRoots does on Linux.
func (s *Store) findRuntimeRoots(ctx context.Context, roots rootSet, censor bool) error {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil // no /proc: no runtime roots, as Nix
	}
	unchecked := map[string][]string{}
	addLink := func(file string) {
		target, err := os.Readlink(file)
		if err == nil && strings.HasPrefix(target, "/") {
			unchecked[target] = append(unchecked[target], file)
		}
	}
	storeRe := regexp.MustCompile(regexp.QuoteMeta(string(s.dir)) + `/[0-9a-z]+[0-9a-zA-Z\+\-\._\?=]*`)
	const maxProcFile = 16 << 20 // a maps or environ file is far smaller
	for _, pe := range procs {
		if err := ctx.Err(); err != nil {
			return err
		}
		if _, err := strconv.Atoi(pe.Name()); err != nil {
			continue
		}
		dir := "/proc/" + pe.Name()
		addLink(dir + "/exe")
		addLink(dir + "/cwd")
		if fds, err := os.ReadDir(dir + "/fd"); err == nil {
			for _, fd := range fds {
				addLink(dir + "/fd/" + fd.Name())
			}
		}
		if data, err := readFileLimit(dir+"/maps", maxProcFile); err == nil {
			for _, line := range strings.Split(string(data), "\n") {
				f := strings.Fields(line)
				if len(f) == 6 && strings.HasPrefix(f[5], "/") {
					unchecked[f[5]] = append(unchecked[f[5]], dir+"/maps")
				}
			}
		}
		if data, err := readFileLimit(dir+"/environ", maxProcFile); err == nil {
			for _, m := range storeRe.FindAllString(string(data), -1) {
				unchecked[m] = append(unchecked[m], dir+"/environ")
			}
		}
	}
	for _, f := range []string{"/proc/sys/kernel/modprobe", "/proc/sys/kernel/fbsplash", "/proc/sys/kernel/poweroff_cmd"} {
		if data, err := readFileLimit(f, 4096); err == nil {
			unchecked[string(data)] = append(unchecked[string(data)], f)
		}
	}
	for target, links := range unchecked {
		if !s.inStore(target) {
			continue
		}
		p, _, err := s.dir.ParsePrefix(target)
		if err != nil {
			continue
		}
		ok, err := s.IsValidPathFresh(ctx, p)
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		if censor {
			roots.add(p, censored)
			continue
		}
		for _, l := range links {
			roots.add(p, l)
		}
	}
	return nil
}

func readFileLimit(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, 0, 4096)
	for int64(len(buf)) < limit {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := f.Read(buf[len(buf):min(cap(buf), int(limit))])
		buf = buf[:len(buf)+n]
		if err != nil {
			break
		}
	}
	return buf, nil
}

// makeSymlink atomically makes link point to target, creating the parent
// directories (Nix's makeSymlink).
func makeSymlink(link, target string) error {
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		return fmt.Errorf("store: creating directory of %s: %w", link, err)
	}
	tmp := fmt.Sprintf("%s.tmp-%d-%d", link, os.Getpid(), rand.Uint32())
	if err := os.Symlink(target, tmp); err != nil {
		return fmt.Errorf("store: creating symlink %s: %w", link, err)
	}
	if err := os.Rename(tmp, link); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("store: creating symlink %s: %w", link, err)
	}
	return nil
}

// AddIndirectRoot registers link (a symlink somewhere that points into the
// store) as an indirect root: gcroots/auto/<nix32 sha1 of link> -> link.
func (s *Store) AddIndirectRoot(ctx context.Context, link string) error {
	link = filepath.Clean(link)
	if !filepath.IsAbs(link) {
		return fmt.Errorf("store: indirect root %q is not an absolute path", link)
	}
	h := hash.Sum(hash.SHA1, []byte(link))
	return makeSymlink(s.stateFile("gcroots", "auto", h.NixBase32()), link)
}

// AddPermRoot makes gcRoot a symlink to p and registers it as an indirect
// root, as Nix's addPermRoot; it returns the cleaned root path. An existing
// gcRoot is replaced only if it is a symlink into the store.
func (s *Store) AddPermRoot(ctx context.Context, p storepath.Path, gcRoot string) (string, error) {
	gcRoot = filepath.Clean(gcRoot)
	if !filepath.IsAbs(gcRoot) {
		return "", fmt.Errorf("store: garbage collector root %q is not an absolute path", gcRoot)
	}
	if s.inStore(gcRoot) || isInDir(gcRoot, s.realDir) {
		return "", fmt.Errorf("store: creating a garbage collector root (%s) in the Nix store is forbidden (are you running nix-build inside the store?)", gcRoot)
	}
	// Root the path while the link is made, in case a collector runs.
	if err := s.roots.add(ctx, p); err != nil {
		return "", err
	}
	defer s.roots.remove(p)
	if st, err := os.Lstat(gcRoot); err == nil {
		target, lerr := os.Readlink(gcRoot)
		if st.Mode().Type() != fs.ModeSymlink || lerr != nil || !s.inStore(target) {
			return "", fmt.Errorf("store: cannot create symlink '%s'; already exists", gcRoot)
		}
	}
	if err := makeSymlink(gcRoot, s.abs(p)); err != nil {
		return "", err
	}
	if err := s.AddIndirectRoot(ctx, gcRoot); err != nil {
		return "", err
	}
	return gcRoot, nil
}

// addValidRoot records link as a root of p if p is valid, and says whether
// it was.
func (s *Store) addValidRoot(ctx context.Context, roots rootSet, p storepath.Path, link string) (bool, error) {
	ok, err := s.IsValidPathFresh(ctx, p)
	if err != nil || !ok {
		return false, err
	}
	roots.add(p, link)
	return true, nil
}
