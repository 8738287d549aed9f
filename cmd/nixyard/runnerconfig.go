package main

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/nixyard/nixyard/internal/ci"
)

const runnerConfigUsage = `usage: nixyard runner-config gitlab [--socket PATH] [--store-root DIR]

Prints a GitLab Runner [[runners]] snippet (docker executor) for host
passthrough: the host store mounted read-only at /mnt/nix/store, the job
socket's directory mounted at /run/nixyard, and NIX_REMOTE pointing the
image's nix at it.

  --socket PATH      the daemon's job socket (default ` + ci.DefaultSocket + `)
  --store-root DIR   the host store's root (default /, i.e. /nix/store)
`

func runRunnerConfig(args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
		fmt.Print(runnerConfigUsage)
		if len(args) == 0 {
			return errors.New("runner-config: name a runner (gitlab)")
		}
		return nil
	}
	if args[0] != "gitlab" {
		return fmt.Errorf("runner-config: unknown runner %q (supported: gitlab)", args[0])
	}
	var h ci.Host
	for i := 1; i < len(args); i++ {
		if args[i] == "-h" || args[i] == "--help" {
			fmt.Print(runnerConfigUsage)
			return nil
		}
		name, val, hasVal := strings.Cut(args[i], "=")
		if name != "--socket" && name != "--store-root" {
			return fmt.Errorf("runner-config: unknown argument %q", name)
		}
		if !hasVal {
			if i+1 >= len(args) {
				return fmt.Errorf("runner-config: %s needs an argument", name)
			}
			i++
			val = args[i]
		}
		if !filepath.IsAbs(val) {
			return fmt.Errorf("runner-config: %s %q: want an absolute path", name, val)
		}
		if name == "--socket" {
			h.Socket = val
		} else {
			h.StoreRoot = val
		}
	}
	if err := h.Check(); err != nil {
		return fmt.Errorf("runner-config: %w", err)
	}
	fmt.Print(h.GitLab())
	return nil
}
