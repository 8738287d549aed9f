package build

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"syscall"
	"time"
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

	lines := &lineWriter{max: 64 << 10, line: func(line string) {
		g.each(func(c *call) { c.emit(func(p Progress) { p.PostBuildHookLine(j.drvAbs, line) }) })
	}}
	cmd := hookCommand(ctx, hook)
	cmd.Env = append(os.Environ(), "DRV_PATH="+j.drvAbs, "OUT_PATHS="+strings.Join(outs, " "), "NIX_CONFIG="+b.cfg.NixConfig)
	cmd.Stdout, cmd.Stderr = lines, lines
	err := runHook(cmd, "post-build-hook")
	lines.flush()
	if err != nil {
		return j.failf(MiscFailure, 1, "%v", err)
	}
	return nil
}

// lineWriter hands what is written to it to line, a line at a time, lines
// longer than max cut there.
type lineWriter struct {
	max  int
	line func(string)
	buf  []byte
}

func (w *lineWriter) Write(p []byte) (int, error) {
	for _, c := range p {
		if c == '\n' || len(w.buf) == w.max {
			w.line(string(w.buf))
			w.buf = w.buf[:0]
			if c == '\n' {
				continue
			}
		}
		w.buf = append(w.buf, c)
	}
	return len(p), nil
}

// flush hands on a last line without its newline.
func (w *lineWriter) flush() {
	if len(w.buf) > 0 {
		w.line(string(w.buf))
		w.buf = w.buf[:0]
	}
}

// preBuildHook runs nix.conf's pre-build-hook for a sandboxed build, as
// Nix does, with the derivation's path and the sandbox's root directory on
// the host as arguments, and returns the paths it asks for in the sandbox:
// after a line "extra-sandbox-paths" (or "extra-chroot-dirs"), one path
// or TARGET=SOURCE per line up to an empty line.
func (j *job) preBuildHook(ctx context.Context) ([]sandboxPath, error) {
	hook := j.g.b.cfg.PreBuildHook
	if hook == "" {
		return nil, nil
	}
	cmd := hookCommand(ctx, hook, j.drvAbs, j.chroot)
	out := &cappedBuffer{max: 1 << 20}
	cmd.Stdout, cmd.Stderr = out, os.Stderr // as Nix: its errors go to the daemon's
	if err := runHook(cmd, "pre-build-hook"); err != nil {
		return nil, err
	}
	var paths []sandboxPath
	inPaths := false
	text := out.String()
	for {
		line, rest, found := strings.Cut(text, "\n")
		if !found {
			break // as Nix: a last line without a newline is ignored
		}
		text = rest
		switch {
		case !inPaths && (line == "extra-sandbox-paths" || line == "extra-chroot-dirs"):
			inPaths = true
		case !inPaths:
			return nil, fmt.Errorf("unknown pre-build hook command '%s'", line)
		case line == "":
			inPaths = false
		default:
			target, source, ok := strings.Cut(line, "=")
			if !ok {
				source = target
			}
			paths = append(paths, sandboxPath{target: target, source: source})
		}
	}
	return paths, nil
}

// cappedBuffer keeps the first max bytes written to it (a hook's or a
// fetcher's output, kept for a message).
type cappedBuffer struct {
	bytes.Buffer
	max int
}

func (c *cappedBuffer) Write(p []byte) (int, error) {
	if room := c.max - c.Len(); room > 0 {
		c.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

// runHook runs a hook's command; a hook that fails is reported as Nix
// reports a failed program ("program '…' failed with exit code N"). What
// the hook left running past WaitDelay is not an error.
func runHook(cmd *exec.Cmd, setting string) error {
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		return fmt.Errorf("program '%s' %s", cmd.Path, statusString(exit.Sys().(syscall.WaitStatus)))
	case err != nil && !errors.Is(err, exec.ErrWaitDelay):
		return fmt.Errorf("running %s '%s': %w", setting, cmd.Path, err)
	}
	return nil
}

// hookCommand runs the hook program (a path, not looked up in PATH, as
// Nix runs it) in a process group of its own, killed whole when ctx is
// done or the daemon dies; what it leaves running with its output open
// is not waited for more than 2 s after it exits.
func hookCommand(ctx context.Context, hook string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, hook, args...)
	cmd.Path, cmd.Err = hook, nil
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	return cmd
}

// diffHook runs nix.conf's diff-hook (with run-diff-hook) after a check
// found that output path differs, the new one kept at check, as Nix does:
// looked up in PATH, as the build user, in "/", with the output, the kept
// copy, the derivation and the build directory as arguments. Its output
// and its failure are shown to the callers; neither changes the result.
func (j *job) diffHook(ctx context.Context, path, check string) {
	b := j.g.b
	if b.cfg.DiffHook == "" || !b.cfg.RunDiffHook {
		return
	}
	report := func(msg string) {
		j.g.each(func(c *call) { c.emit(func(p Progress) { p.Error(msg) }) })
	}
	prog, err := exec.LookPath(b.cfg.DiffHook)
	if err != nil {
		report(fmt.Sprintf("diff hook execution failed: %v", err))
		return
	}
	cmd := hookCommand(ctx, prog, path, check, j.drvAbs, j.tmpDir)
	cmd.Dir = "/"
	cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(j.hostUID), Gid: uint32(j.hostGID), Groups: []uint32{}}
	out := &cappedBuffer{max: 1 << 20}
	cmd.Stdout, cmd.Stderr = out, os.Stderr
	if err := runHook(cmd, "diff-hook"); err != nil {
		report(fmt.Sprintf("diff hook execution failed: %v", strings.Replace(err.Error(), "program '", "diff-hook program '", 1)))
		return
	}
	if msg := strings.TrimRight(out.String(), "\n"); msg != "" {
		report(msg)
	}
}
