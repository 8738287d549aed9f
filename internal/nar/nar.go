// Package nar reads and writes the Nix ARchive (NAR) format, serialises
// filesystem trees byte-identically to `nix-store --dump`, and unpacks NARs
// safely onto disk.
//
// # Format
//
// A NAR is a sequence of padded strings: a little-endian uint64 length, the
// bytes, and zero padding up to a multiple of 8. After the magic
// "nix-archive-1" comes one node:
//
//	( type regular [executable ""] contents <u64 size> <bytes+padding> )
//	( type symlink target <target> )
//	( type directory { entry ( name <name> node <node> ) } )
//
// The Reader accepts only this canonical form, which is exactly what Nix's
// dumper produces, so a NAR the Reader accepts re-encodes through the Writer
// to identical bytes.
//
// # Hostile input
//
// Everything read is bounded and every violation is reported as an error
// wrapping ErrInvalid that names the entry and field (truncation additionally
// wraps io.ErrUnexpectedEOF). The Reader refuses:
//   - non-zero padding, unknown or misplaced tokens, trailing garbage inside
//     the NAR (bytes after its last ")" are never read);
//   - entry names that are empty, ".", "..", contain '/' or NUL, or are longer
//     than MaxNameLen (255, Linux NAME_MAX);
//   - directory entries that are not in strictly increasing bytewise order
//     (this also rules out duplicates; Nix requires the same);
//   - symlink targets that are empty, contain NUL, or are longer than
//     MaxTargetLen (4096, Linux PATH_MAX). Where a target points is not
//     checked: as in Nix, a link may point anywhere, absolute (to
//     /run/current-system, to another store path) or relative and out of
//     its path or of the store, as real packages' links do; their safety
//     is a matter for whoever follows them, and Restore never follows any
//     symlink it creates;
//   - nesting deeper than MaxDepth (see there);
//   - file sizes above math.MaxInt64. Other sizes are not limited: contents
//     are streamed, and a size larger than the remaining input is truncation.
//
// Restore creates every file relative to an open descriptor of its parent
// directory with O_NOFOLLOW|O_EXCL, so even a NAR that slipped past these
// checks could not make it write outside its destination.
package nar

import (
	"errors"
	"fmt"
	"strings"
)

// Type is the type of a NAR node.
type Type int

// The node types of a NAR.
const (
	TypeRegular Type = iota + 1
	TypeDirectory
	TypeSymlink
)

func (t Type) String() string {
	switch t {
	case TypeRegular:
		return "regular"
	case TypeDirectory:
		return "directory"
	case TypeSymlink:
		return "symlink"
	}
	return fmt.Sprintf("Type(%d)", int(t))
}

// ErrInvalid is wrapped by every error about a malformed or hostile NAR, and
// by Writer errors about headers that break NAR rules.
var ErrInvalid = errors.New("invalid NAR")

// Header describes one node of a NAR.
type Header struct {
	Path       string // "" for the root, else slash-separated relative path ("bin/hello")
	Type       Type
	Executable bool   // regular files
	Size       int64  // regular files
	LinkTarget string // symlinks
}

// Limits on lengths read from a NAR.
const (
	// MaxNameLen bounds directory entry names: NAME_MAX on Linux, so no
	// longer name could be created on disk anyway.
	MaxNameLen = 255
	// MaxTargetLen bounds symlink targets: PATH_MAX on Linux, the most
	// readlink(2) can return, so `nix-store --dump` never emits more.
	MaxTargetLen = 4096
	// MaxDepth bounds nesting (the number of components of an entry path).
	// Real store paths nest a few dozen levels at most; Restore holds one
	// open descriptor per level, and 256 stays well below the usual
	// 1024-descriptor soft limit while leaving room for the rest of the daemon.
	MaxDepth = 256
	// maxTokenLen bounds the keywords of the format; the longest is
	// "nix-archive-1" (13 bytes), rounded up to a multiple of 8.
	maxTokenLen = 16
)

const magic = "nix-archive-1"

// entryName describes a path for error messages.
func entryName(path string) string {
	if path == "" {
		return "(root)"
	}
	return fmt.Sprintf("%q", path)
}

func invalidf(path, format string, args ...any) error {
	return fmt.Errorf("nar: entry %s: %s: %w", entryName(path), fmt.Sprintf(format, args...), ErrInvalid)
}

// checkName reports whether name is acceptable as a directory entry name.
func checkName(name string) error {
	switch {
	case name == "":
		return errors.New("empty name")
	case name == "." || name == "..":
		return fmt.Errorf("name %q", name)
	case len(name) > MaxNameLen:
		return fmt.Errorf("name of %d bytes exceeds %d (NAME_MAX)", len(name), MaxNameLen)
	case strings.IndexByte(name, '/') >= 0:
		return fmt.Errorf("name %q contains '/'", name)
	case strings.IndexByte(name, 0) >= 0:
		return fmt.Errorf("name %q contains NUL", name)
	}
	return nil
}

// checkTarget reports whether target is acceptable as a symlink target.
// Where it points is not checked: as in Nix, a link may point anywhere
// (absolute, or relative and out of the store, as some packages' links
// do), and unpacking never follows one (see Restore).
func checkTarget(target string) error {
	switch {
	case target == "":
		return errors.New("empty symlink target")
	case len(target) > MaxTargetLen:
		return fmt.Errorf("symlink target of %d bytes exceeds %d (PATH_MAX)", len(target), MaxTargetLen)
	case strings.IndexByte(target, 0) >= 0:
		return fmt.Errorf("symlink target %q contains NUL", target)
	}
	return nil
}

// depthOf returns the number of components of an entry path.
func depthOf(path string) int {
	if path == "" {
		return 0
	}
	return strings.Count(path, "/") + 1
}
