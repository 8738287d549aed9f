package bench

// What every benchmark command (bench/cmd/*) does around its scenarios:
// flags common to all, the signal and timeout handling of main, and the
// work directory, environment and scratch file system of a run.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// RunFlags are the flags every benchmark command has.
type RunFlags struct {
	Nixyard string // path of the nixyard binary
	Work    string // work directory; "" for a new one under /tmp
	FS      string // scratch file system kind, see MountScratch
	FSSize  int64  // scratch file system size in bytes
	Reps    int    // repetitions of each measurement
	Timeout time.Duration

	fsSizeMB int64
}

// Register defines the flags on fs with the command's defaults and the
// help text of -nixyard.
func (f *RunFlags) Register(fs *flag.FlagSet, nixyardHelp string, fsSizeMB int64, reps int) {
	fs.StringVar(&f.Nixyard, "nixyard", "", nixyardHelp)
	fs.StringVar(&f.Work, "work", "", "work directory (default: a new directory under /tmp, removed at the end)")
	fs.StringVar(&f.FS, "fs", "ext4", "scratch file system: ext4 (journaled, loop file) or tmpfs")
	fs.Int64Var(&f.fsSizeMB, "fs-size-mb", fsSizeMB, "size of the scratch file system in MiB")
	fs.IntVar(&f.Reps, "reps", reps, "repetitions of each measurement (the median is reported)")
	fs.DurationVar(&f.Timeout, "timeout", 40*time.Minute, "stop everything after this long")
}

// Check validates the flags after parsing and sets FSSize.
func (f *RunFlags) Check() error {
	if f.Reps < 1 {
		return errors.New("-reps must be at least 1")
	}
	f.FSSize = f.fsSizeMB << 20
	return nil
}

// Counts is a flag.Value for a comma-separated list of positive counts
// such as "1,8"; use it on an []int as flag.Var((*Counts)(&ns), …).
type Counts []int

func (c *Counts) String() string {
	var fs []string
	if c != nil {
		for _, n := range *c {
			fs = append(fs, strconv.Itoa(n))
		}
	}
	return strings.Join(fs, ",")
}

// Set replaces the counts with those of value.
func (c *Counts) Set(value string) error {
	var out []int
	for _, f := range strings.Split(value, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("bad count %q", f)
		}
		out = append(out, n)
	}
	*c = out
	return nil
}

// Main is a command's main function: it calls parse, which fills flags
// (the caller's flags embed them) and exits with status 2 if it fails;
// then it calls run with a context that ends on Ctrl-C, SIGTERM or after
// flags.Timeout, and exits with status 1 if run fails. Errors go to stderr
// prefixed by the command's name.
func Main(name string, flags *RunFlags, parse func() error, run func(context.Context) error) {
	if err := parse(); err != nil {
		fmt.Fprintln(os.Stderr, name+":", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(ctx, flags.Timeout)
	err := run(ctx)
	cancel()
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, name+":", err)
		os.Exit(1)
	}
}

// Logf writes a time-stamped progress line to stderr.
func Logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// Workspace is the place of one run: a work directory with the logs and
// the Nix environment, and a scratch file system for the stores.
type Workspace struct {
	Dir     string   // work directory
	Logs    string   // Dir/logs
	Env     *Env     // in Dir/env
	Mnt     string   // Dir/m, the scratch file system's mount point
	Scratch *Scratch // mounted at Mnt

	remove bool // remove Dir in Close
}

// Setup checks that the command runs as root with tools on PATH, makes the
// process a subreaper (see BecomeSubreaper), and creates the workspace: in
// f.Work, or in a new directory /tmp/<tempPrefix>… that Close removes
// unless keep is set. The caller must Close it.
func Setup(ctx context.Context, f RunFlags, tempPrefix string, keep bool, tools ...string) (_ *Workspace, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("must run as root (it mounts a scratch file system)")
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found: %w", tool, err)
		}
	}
	if err := BecomeSubreaper(); err != nil {
		return nil, err
	}
	w := &Workspace{Dir: f.Work}
	if w.Dir == "" {
		if w.Dir, err = os.MkdirTemp("/tmp", tempPrefix); err != nil {
			return nil, fmt.Errorf("creating work directory: %w", err)
		}
		w.remove = !keep
	} else if err := os.MkdirAll(w.Dir, 0o755); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil && w.remove {
			os.RemoveAll(w.Dir)
		}
	}()
	w.Logs = filepath.Join(w.Dir, "logs")
	if err := os.MkdirAll(w.Logs, 0o755); err != nil {
		return nil, err
	}
	if w.Env, err = NewEnv(filepath.Join(w.Dir, "env")); err != nil {
		return nil, err
	}
	w.Mnt = filepath.Join(w.Dir, "m")
	Logf("work directory %s; making a %s scratch file system of %d MiB", w.Dir, f.FS, f.FSSize>>20)
	if w.Scratch, err = MountScratch(ctx, f.FS, w.Mnt, w.Dir, f.FSSize); err != nil {
		return nil, err
	}
	return w, nil
}

// Close unmounts the scratch file system and removes the work directory
// if Setup made it (and was not asked to keep it).
func (w *Workspace) Close() error {
	err := w.Scratch.Unmount()
	if w.remove {
		os.RemoveAll(w.Dir)
	}
	return err
}

// ImportSource writes the generated export stream of spec into a new local
// chroot store at root with `nix-store --import` (no daemon involved).
func ImportSource(ctx context.Context, env *Env, root string, spec ExportSpec) ([]PathInfo, error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	pr, pw := io.Pipe()
	type genResult struct {
		infos []PathInfo
		err   error
	}
	gen := make(chan genResult, 1)
	go func() {
		infos, err := WriteExport(ctx, pw, spec)
		pw.CloseWithError(err)
		gen <- genResult{infos, err}
	}()
	out, err := Nix(ctx, env, pr, "nix-store", "--store", "local?root="+root, "--import")
	pr.CloseWithError(io.ErrClosedPipe)
	g := <-gen
	if err != nil {
		return nil, fmt.Errorf("importing source store %s: %w", root, err)
	}
	if g.err != nil {
		return nil, fmt.Errorf("generating export stream: %w", g.err)
	}
	if n := len(strings.Fields(string(out))); n != len(g.infos) {
		return nil, fmt.Errorf("nix-store --import reported %d paths, want %d", n, len(g.infos))
	}
	return g.infos, nil
}

// LoadAvg returns the 1, 5 and 15 minute load averages from /proc/loadavg,
// or "?".
func LoadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}
