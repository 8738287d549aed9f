package build

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// builtinBuildenv is builtin:buildenv, the user environment that nix-env
// and nix profile build: a tree of symlinks to the files of the active
// packages, merged directory by directory, with the lower priority number
// winning a collision, then the packages they name in
// nix-support/propagated-user-env-packages. Its attributes:
// "derivations" (for each package: active, priority, the number of
// output paths, the paths) and "manifest" (linked as manifest.nix).
func builtinBuildenv(ctx context.Context, j *job, v *storeView, warn func(string, ...any)) error {
	a, err := j.attrs("derivations", "manifest")
	if err != nil {
		return err
	}
	spec, manifest := a[0], a[1]
	pkgs, err := parseBuildenvPackages(spec)
	if err != nil {
		return err
	}
	out, outHost, err := j.outputDir(v)
	if err != nil {
		return err
	}
	e := &envBuilder{ctx: ctx, v: v, warn: warn, priorities: map[string]int{}}
	if err := e.build(out, pkgs); err != nil {
		return err
	}
	if err := os.Symlink(manifest, outHost+"/manifest.nix"); err != nil {
		return fmt.Errorf("creating symlink '%s/manifest.nix': %w", out, err)
	}
	return nil
}

// buildenvPackage is one output path of a package of the environment.
type buildenvPackage struct {
	path     string
	active   bool
	priority int
}

// parseBuildenvPackages reads the "derivations" attribute: for each
// package, "active priority n path1 … pathn", all separated by white
// space.
func parseBuildenvPackages(s string) ([]buildenvPackage, error) {
	words := strings.Fields(s)
	var pkgs []buildenvPackage
	for len(words) > 0 {
		if len(words) < 3 {
			return nil, fmt.Errorf("attribute 'derivations': truncated package entry %q", strings.Join(words, " "))
		}
		active := words[0] != "false"
		priority, err := atoiPrefix(words[1])
		if err != nil {
			return nil, fmt.Errorf("attribute 'derivations': priority %q: %w", words[1], err)
		}
		n, err := atoiPrefix(words[2])
		if err != nil || n < 0 || n > len(words)-3 {
			return nil, fmt.Errorf("attribute 'derivations': bad number of outputs %q", words[2])
		}
		for _, p := range words[3 : 3+n] {
			pkgs = append(pkgs, buildenvPackage{path: p, active: active, priority: priority})
		}
		words = words[3+n:]
	}
	return pkgs, nil
}

// atoiPrefix reads a number as C++'s stoi does: leading white space, an
// optional sign and digits, anything after them ignored, within 32 bits.
func atoiPrefix(s string) (int, error) {
	t := strings.TrimLeft(s, " \t\n\r\f\v")
	end := 0
	if end < len(t) && (t[end] == '+' || t[end] == '-') {
		end++
	}
	for end < len(t) && t[end] >= '0' && t[end] <= '9' {
		end++
	}
	n, err := strconv.ParseInt(t[:end], 10, 32)
	if err != nil {
		return 0, errors.New("not a number")
	}
	return int(n), nil
}

// maxPropagatedList bounds a package's propagated-user-env-packages, a
// list of store paths: a larger file is not one.
const maxPropagatedList = 1 << 20

// maxEnvEntries bounds the links and directories of one user
// environment. Directories that link back to their parents, merged from
// two packages, would otherwise make the merge go on until the daemon
// ran out of memory (in Nix, it is the builder process that would). A
// variable for tests.
var maxEnvEntries = 1 << 20

// envBuilder makes one user environment.
type envBuilder struct {
	entries    int // links and directories made
	ctx        context.Context
	v          *storeView
	warn       func(string, ...any)
	priorities map[string]int // link in the environment -> priority of its package
	done       map[string]bool
	postponed  map[string]bool
}

// ignoredInEnv are files packages have that do not go into environments,
// being useless there or colliding pointlessly between packages (as Nix).
var ignoredInEnv = []string{"/propagated-build-inputs", "/nix-support", "/perllocal.pod", "/info/dir", "/log", "/manifest.nix", "/manifest.json"}

func (e *envBuilder) build(out string, pkgs []buildenvPackage) error {
	e.done, e.postponed = map[string]bool{}, map[string]bool{}
	// Highest priority first, so that fewer links are replaced.
	slices.SortStableFunc(pkgs, func(a, b buildenvPackage) int {
		return cmp.Or(cmp.Compare(a.priority, b.priority), strings.Compare(a.path, b.path))
	})
	for _, p := range pkgs {
		if p.active {
			if err := e.addPackage(out, p.path, p.priority); err != nil {
				return err
			}
		}
	}
	// Propagated packages, by rounds, each lower in priority than all
	// that came before it.
	priority := 1000
	for len(e.postponed) > 0 {
		round := slices.Sorted(maps.Keys(e.postponed))
		e.postponed = map[string]bool{}
		for _, p := range round {
			if err := e.addPackage(out, p, priority); err != nil {
				return err
			}
			priority++
		}
	}
	return nil
}

func (e *envBuilder) addPackage(out, pkg string, priority int) error {
	if e.done[pkg] {
		return nil
	}
	e.done[pkg] = true
	if err := e.link(pkg, out, priority); err != nil {
		return err
	}
	data, err := e.v.readFile(pkg+"/nix-support/propagated-user-env-packages", maxPropagatedList)
	if err != nil {
		if errnoIs(err, unix.ENOENT, unix.ENOTDIR) {
			return nil
		}
		return fmt.Errorf("reading '%s/nix-support/propagated-user-env-packages': %w", pkg, err)
	}
	for _, p := range strings.Fields(string(data)) {
		if !e.done[p] {
			e.postponed[p] = true
		}
	}
	return nil
}

// link links the entries of directory src into directory dst of the
// environment.
func (e *envBuilder) link(src, dst string, priority int) error {
	if err := e.ctx.Err(); err != nil {
		return err
	}
	entries, err := e.v.readDir(src)
	if err != nil {
		if errnoIs(err, unix.ENOTDIR) {
			e.warn("not including '%s' in the user environment because it's not a directory", src)
			return nil
		}
		return fmt.Errorf("reading directory '%s': %w", src, err)
	}
	for _, ent := range entries {
		name := ent.Name()
		if strings.HasPrefix(name, ".") {
			continue // not matched by a glob
		}
		srcFile, dstFile := src+"/"+name, dst+"/"+name
		_, srcSt, err := e.v.stat(srcFile)
		if err != nil {
			if errnoIs(err, unix.ENOENT, unix.ENOTDIR) {
				e.warn("skipping dangling symlink '%s'", dstFile)
				continue
			}
			return fmt.Errorf("getting status of '%s': %w", srcFile, err)
		}
		if slices.ContainsFunc(ignoredInEnv, func(s string) bool { return strings.HasSuffix(srcFile, s) }) {
			continue
		}
		dstHost, err := e.v.host(dstFile)
		if err != nil {
			return err
		}
		var dstSt unix.Stat_t
		dstErr := unix.Lstat(dstHost, &dstSt)
		if dstErr != nil && dstErr != unix.ENOENT {
			return fmt.Errorf("getting status of '%s': %w", dstFile, dstErr)
		}
		dstType := dstSt.Mode & unix.S_IFMT
		if srcSt.Mode&unix.S_IFMT == unix.S_IFDIR {
			switch {
			case dstErr != nil:
				// Nothing there yet: link the directory itself.
			case dstType == unix.S_IFDIR:
				if err := e.link(srcFile, dstFile, priority); err != nil {
					return err
				}
				continue
			case dstType == unix.S_IFLNK:
				// A link to another package's directory: replace it by a
				// directory holding both.
				target, tSt, err := e.v.stat(dstFile)
				if err != nil {
					return fmt.Errorf("resolving '%s': %w", dstFile, err)
				}
				if tSt.Mode&unix.S_IFMT != unix.S_IFDIR {
					return fmt.Errorf("collision between '%s' and non-directory '%s'", srcFile, target)
				}
				if err := os.Remove(dstHost); err != nil {
					return fmt.Errorf("unlinking '%s': %w", dstFile, err)
				}
				if err := e.count(); err != nil {
					return err
				}
				if err := os.Mkdir(dstHost, 0o755); err != nil {
					return fmt.Errorf("creating directory '%s': %w", dstFile, err)
				}
				if err := e.link(target, dstFile, e.priorities[dstFile]); err != nil {
					return err
				}
				if err := e.link(srcFile, dstFile, priority); err != nil {
					return err
				}
				continue
			}
		} else if dstErr == nil {
			switch dstType {
			case unix.S_IFLNK:
				prev := e.priorities[dstFile]
				if prev == priority {
					other, _ := os.Readlink(dstHost)
					return fmt.Errorf("packages '%s' and '%s' have the same priority %d; "+
						"use 'nix-env --set-flag priority NUMBER INSTALLED_PKGNAME' "+
						"to change the priority of one of the conflicting packages"+
						" (0 being the highest priority)", srcFile, other, priority)
				}
				if prev < priority {
					continue
				}
				if err := os.Remove(dstHost); err != nil {
					return fmt.Errorf("unlinking '%s': %w", dstFile, err)
				}
			case unix.S_IFDIR:
				return fmt.Errorf("collision between non-directory '%s' and directory '%s'", srcFile, dstFile)
			}
		}
		if err := e.count(); err != nil {
			return err
		}
		if err := os.Symlink(srcFile, dstHost); err != nil {
			return fmt.Errorf("creating symlink '%s': %w", dstFile, err)
		}
		e.priorities[dstFile] = priority
	}
	return nil
}

// count counts one more entry of the environment.
func (e *envBuilder) count() error {
	if e.entries++; e.entries > maxEnvEntries {
		return fmt.Errorf("the user environment would have more than %d files", maxEnvEntries)
	}
	return nil
}
