package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// onTerminal runs the command with a pseudo-terminal as its standard
// input, output and error (TERM=xterm), as a user at a terminal runs it,
// and returns everything it wrote there and its error. The Nix client
// keeps the colour codes of messages only on a terminal.
func (c *command) onTerminal(t *testing.T) (string, error) {
	t.Helper()
	ptm, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals: %v", err)
	}
	defer ptm.Close()
	if err := unix.IoctlSetPointerInt(int(ptm.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatalf("unlocking the pseudo-terminal: %v", err)
	}
	n, err := unix.IoctlGetInt(int(ptm.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatalf("naming the pseudo-terminal: %v", err)
	}
	pts, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("opening the pseudo-terminal: %v", err)
	}
	x := c.exec()
	x.Stdin, x.Stdout, x.Stderr = pts, pts, pts
	x.Env = append(x.Env, "TERM=xterm")
	if x.SysProcAttr == nil {
		x.SysProcAttr = &syscall.SysProcAttr{}
	}
	x.SysProcAttr.Setsid, x.SysProcAttr.Setctty = true, true
	if err := x.Start(); err != nil {
		pts.Close()
		t.Fatalf("starting %s: %v", c.name, err)
	}
	pts.Close()
	var out bytes.Buffer
	_, rerr := io.Copy(&out, ptm) // EIO once the last writer is gone
	if rerr != nil && !errors.Is(rerr, syscall.EIO) {
		t.Errorf("reading the pseudo-terminal: %v", rerr)
	}
	return strings.ReplaceAll(out.String(), "\r\n", "\n"), x.Wait()
}

// TestErrorsOnTerminal checks that error messages show their values
// highlighted on a terminal, as Nix's hintfmt makes them in nix-daemon:
// the derivation of a failed build, the command to see its log, and a
// missing path, which `nix build` shows all highlighted.
func TestErrorsOnTerminal(t *testing.T) {
	t.Parallel()
	b := startBuildDaemon(t)
	args := b.expr(t, "terminal", `rec {
  fails = mk { name = "fails-on-terminal"; script = "echo some-output; exit 3"; };
  dep = mk { name = "dep-on-terminal"; script = "echo > $out"; };
  refers = mk { name = "refers-on-terminal"; inherit dep; allowedReferences = []; script = "echo $dep > $out"; };
}`)
	drv := oneLine(t, "instantiate", b.client("nix-instantiate", append(args, "-A", "fails")...).ok(t))
	out, err := b.nixBuild(append(args, "-A", "fails", "--no-out-link")...).onTerminal(t)
	if err == nil {
		t.Fatalf("nix-build succeeded:\n%q", out)
	}
	for _, want := range []string{
		"builder for '\x1b[35;1m" + drv + "\x1b[0m' failed with exit code 3;",
		"For full logs, run '\x1b[1mnix log " + drv + "\x1b[0m'.",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("nix-build's output lacks %q:\n%q", want, out)
		}
	}

	// An output check's refusal: the output and the paths it may not
	// refer to highlighted.
	out, err = b.nixBuild(append(args, "-A", "refers", "--no-out-link")...).onTerminal(t)
	if want := "-refers-on-terminal\x1b[0m' is not allowed to refer to the following paths:\x1b[35;1m"; err == nil || !strings.Contains(out, want) {
		t.Errorf("an output check's refusal: %v, output lacks %q:\n%q", err, want, out)
	}

	missing := "/nix/store/00000000000000000000000000000000-terminal-missing"
	out, err = b.client("nix", "build", "--no-link", missing).onTerminal(t)
	if want := "\x1b[35;1mpath '" + missing + "' is required, but there is no substituter that can build it\x1b[0m"; err == nil || !strings.Contains(out, want) {
		t.Errorf("nix build of a missing path: %v, output lacks %q:\n%q", err, want, out)
	}
}
