package build

import (
	"context"
	"errors"
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
	cmd := exec.CommandContext(ctx, hook)
	cmd.Env = append(os.Environ(), "DRV_PATH="+j.drvAbs, "OUT_PATHS="+strings.Join(outs, " "), "NIX_CONFIG="+b.cfg.NixConfig)
	cmd.Stdout, cmd.Stderr = lines, lines
	// Its own process group, killed whole when the build is cancelled; and
	// what it leaves running (holding its output open) is not waited for.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	err := cmd.Run()
	lines.flush()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		return j.failf(MiscFailure, 1, "program '%s' %s", hook, statusString(exit.Sys().(syscall.WaitStatus)))
	case err != nil && !errors.Is(err, exec.ErrWaitDelay):
		return j.failf(MiscFailure, 1, "running post-build-hook '%s': %v", hook, err)
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
