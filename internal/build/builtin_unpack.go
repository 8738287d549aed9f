package build

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/nixyard/nixyard/internal/tarball"
)

// builtinUnpackChannel is builtin:unpack-channel, which nix-channel uses:
// it unpacks the tarball "src" (plain, gzip, bzip2, xz or zstd) into the
// output and renames the one top-level entry it must hold to
// "channelName".
func builtinUnpackChannel(ctx context.Context, j *job, v *storeView, warn func(string, ...any)) error {
	a, err := j.attrs("channelName", "src")
	if err != nil {
		return err
	}
	name, src := a[0], a[1]
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("attribute 'channelName': %q is not a file name", name)
	}
	_, outHost, err := j.outputDir(v)
	if err != nil {
		return err
	}
	canon, _, err := v.stat(src)
	if err != nil {
		return fmt.Errorf("opening '%s': %w", src, err)
	}
	srcHost, err := v.host(canon)
	if err != nil {
		return err
	}
	f, err := os.Open(srcHost)
	if err != nil {
		return fmt.Errorf("opening '%s': %w", src, err)
	}
	defer f.Close()
	if err := tarball.Unpack(ctx, f, outHost); err != nil {
		return fmt.Errorf("unpacking '%s': %w", src, err)
	}
	entries, err := os.ReadDir(outHost)
	if err != nil {
		return err
	}
	if len(entries) != 1 {
		return fmt.Errorf("channel tarball '%s' contains more than one file", src)
	}
	if entries[0].Name() == name {
		return nil // rename(2) of a path to itself, which os.Rename refuses
	}
	if err := os.Rename(outHost+"/"+entries[0].Name(), outHost+"/"+name); err != nil {
		return fmt.Errorf("renaming channel directory: %w", err)
	}
	return nil
}
