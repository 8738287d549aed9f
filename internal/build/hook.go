package build

import (
	"bufio"
	"context"
	"io"
	"os"
	"os/exec"
	"sort"
	"strings"
	"syscall"
)

// postBuildHook runs nix.conf's post-build-hook after a build registered
// its outputs, as Nix does (typically to push them to a binary cache):
// with the daemon's environment plus DRV_PATH, OUT_PATHS (the built
// outputs, space-separated) and NIX_CONFIG (the daemon's settings), its
// standard output and error merged and sent to the callers line by line.
// The outputs stay valid whatever the hook does; a hook that fails makes
// the build fail, with Nix's message.
func (j *job) postBuildHook(ctx context.Context) *failure {
	g := j.g
	b := g.b
	hook := b.cfg.PostBuildHook
	if hook == "" {
		return nil
	}
	var outs []string
	for _, p := range j.outputs {
		outs = append(outs, b.abs(p))
	}
	sort.Strings(outs)
	g.each(func(c *call) { c.emit(func(p Progress) { p.PostBuildHookStarted(j.drvAbs, hook) }) })
	defer g.each(func(c *call) { c.emit(func(p Progress) { p.PostBuildHookFinished(j.drvAbs) }) })

	cmd := exec.CommandContext(ctx, hook)
	cmd.Env = append(os.Environ(), "DRV_PATH="+j.drvAbs, "OUT_PATHS="+strings.Join(outs, " "), "NIX_CONFIG="+b.cfg.NixConfig)
	pr, pw, err := os.Pipe()
	if err != nil {
		return j.failf(MiscFailure, 1, "running post-build-hook '%s': %v", hook, err)
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	err = cmd.Start()
	pw.Close()
	if err != nil {
		pr.Close()
		return j.failf(MiscFailure, 1, "executing '%s': %v", hook, err)
	}
	sc := bufio.NewScanner(pr)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		g.each(func(c *call) { c.emit(func(p Progress) { p.PostBuildHookLine(j.drvAbs, line) }) })
	}
	io.Copy(io.Discard, pr) // after a line too long to scan
	pr.Close()
	if err := cmd.Wait(); err != nil {
		if cmd.ProcessState != nil {
			return j.failf(MiscFailure, 1, "program '%s' %s", hook, statusString(cmd.ProcessState.Sys().(syscall.WaitStatus)))
		}
		return j.failf(MiscFailure, 1, "running post-build-hook '%s': %v", hook, err)
	}
	return nil
}
