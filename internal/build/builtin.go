package build

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// Derivations whose builder is "builtin:NAME" are built by code inside
// Nix rather than by a program: builtin:buildenv makes the user
// environments of nix-env and nix profile, builtin:fetchurl downloads the
// fixed outputs of <nix/fetchurl.nix>, and builtin:unpack-channel unpacks
// nix-channel's tarballs. nixyard runs them in the daemon, in Go. They
// see the store as a sandboxed builder would: only the closure of the
// derivation's inputs and its outputs exist (storeView), whether or not
// the sandbox is on, so a derivation cannot make the daemon read other
// files. They run as the daemon's user, with no build directory; only
// builtin:fetchurl's download runs in a process of its own, as a build
// user when there are build users (see builtinFetchurl).

const builtinPrefix = "builtin:"

// isBuiltin reports whether builder names one of Nix's builtin builders.
func isBuiltin(builder string) bool { return strings.HasPrefix(builder, builtinPrefix) }

// builtinFunc builds the outputs of a builtin derivation; warn sends a
// line to the build log.
type builtinFunc func(ctx context.Context, j *job, v *storeView, warn func(format string, args ...any)) error

var builtins = map[string]builtinFunc{
	"buildenv":       builtinBuildenv,
	"fetchurl":       builtinFetchurl,
	"unpack-channel": builtinUnpackChannel,
}

// errBuiltinTimeout ends a builtin that ran longer than the timeout.
var errBuiltinTimeout = errors.New("builtin timed out")

// runBuiltin runs the job's builtin builder in the daemon. As with Nix,
// whose builtins run in the forked builder process, a failure is the
// builder's: its message goes to the build log and the build fails with
// exit code 1. The build's timeout applies (max-silent-time does not:
// builtins print next to nothing).
func (j *job) runBuiltin(ctx context.Context) (syscall.WaitStatus, error) {
	logLine := func(line string) {
		b := []byte(line + "\n")
		j.logFile.Write(b)
		j.handleOutput(b)
	}
	// The timeout is looked up as the builtin runs, as a builder's is
	// (see watchLimits); silence never counts.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var timedOut string
	_, stopWatch := j.watchLimits(false, func(msg string) {
		timedOut = msg
		cancel(errBuiltinTimeout)
	})
	err := j.builtinErr(ctx, logLine)
	stopWatch()
	switch {
	case err == nil:
		return 0, nil
	case context.Cause(ctx) == errBuiltinTimeout:
		j.recordKill(TimedOut, timedOut)
		return 0, nil
	case ctx.Err() != nil:
		return 0, fmt.Errorf("building '%s': %w", j.drvAbs, ctx.Err())
	}
	for _, l := range strings.Split("error: "+err.Error(), "\n") {
		logLine(l)
	}
	return syscall.WaitStatus(1 << 8), nil // exited with 1
}

// builtinErr runs the derivation's builtin builder, with a view of the
// store in which only the inputs and the outputs (at their build
// locations) are visible, and returns its error; logLine takes the lines
// it logs (its warnings).
func (j *job) builtinErr(ctx context.Context, logLine func(string)) error {
	drv := j.g.drv
	name := strings.TrimPrefix(drv.Builder, builtinPrefix)
	f, ok := builtins[name]
	if !ok {
		return fmt.Errorf("unsupported builtin builder '%s'", name)
	}
	b := j.g.b
	v := &storeView{dir: string(b.st.Dir()), visible: map[storepath.Path]string{}}
	for _, p := range j.inputs {
		v.visible[p] = b.st.RealPath(p)
	}
	for _, p := range j.outputs {
		v.visible[p] = j.outputLocation(p)
	}
	warn := func(format string, args ...any) { logLine("warning: " + fmt.Sprintf(format, args...)) }
	return f(ctx, j, v, warn)
}

// attr returns the derivation's environment variable name, with output
// placeholders replaced, as Nix's builtins read their arguments.
func (j *job) attr(name string) (string, error) {
	v, ok := j.g.drv.Env[name]
	if !ok {
		return "", fmt.Errorf("attribute '%s' missing", name)
	}
	return j.rewrite.Replace(v), nil
}

// attrs returns the derivation's environment variables names, which
// must all be set.
func (j *job) attrs(names ...string) ([]string, error) {
	vals := make([]string, len(names))
	for i, n := range names {
		var err error
		if vals[i], err = j.attr(n); err != nil {
			return nil, err
		}
	}
	return vals, nil
}

// output returns the "out" attribute, which must name the output being
// built, and where that is on the host: the builtin writes there.
func (j *job) output(v *storeView) (out, host string, err error) {
	if out, err = j.attr("out"); err != nil {
		return "", "", err
	}
	p, ok := j.outputs["out"]
	if !ok || out != j.g.b.abs(p) {
		return "", "", fmt.Errorf("attribute 'out' (%q) is not an output being built", out)
	}
	host, err = v.host(out)
	return out, host, err
}

// outputDir is output, with the output made a directory (mkdirOutput).
func (j *job) outputDir(v *storeView) (out, host string, err error) {
	if out, host, err = j.output(v); err != nil {
		return "", "", err
	}
	if err := mkdirOutput(host); err != nil {
		return "", "", fmt.Errorf("creating directory '%s': %w", out, err)
	}
	return out, host, nil
}

// storeView is the file system as a sandboxed builder sees it: below the
// store directory only the visible store paths exist, each mapped to
// where it is on the host; nothing outside the store directory exists.
// Paths are logical (as the builder would name them); symlinks are
// followed by storeView itself, so an absolute target inside the store
// resolves in the view, not on the host.
type storeView struct {
	dir     string                    // the logical store directory
	visible map[storepath.Path]string // visible store paths, where they are on the host
}

// maxSymlinks bounds the symlinks followed while resolving one path, as
// the kernel's limit does.
const maxSymlinks = 40

func notExist(op, p string) error { return &fs.PathError{Op: op, Path: p, Err: unix.ENOENT} }

// host maps a clean absolute logical path to the host, without following
// any symlink. Ancestors of the store directory are directories of their
// own with nothing visible in them but the store.
func (v *storeView) host(p string) (string, error) {
	sp, rest, err := storepath.Dir(v.dir).ParsePrefix(p)
	if err != nil {
		return "", notExist("resolving", p)
	}
	h, ok := v.visible[sp]
	if !ok {
		return "", notExist("resolving", p)
	}
	return h + rest, nil
}

// resolve returns the canonical logical form of p (absolute, clean,
// symlinks followed in every component), which must exist in the view.
func (v *storeView) resolve(p string) (string, error) {
	if !path.IsAbs(p) {
		return "", fmt.Errorf("resolving '%s': not an absolute path", p)
	}
	done := "/"
	rest := strings.Split(p, "/")
	links := 0
	for len(rest) > 0 {
		c := rest[0]
		rest = rest[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			done = path.Dir(done)
			continue
		}
		next := path.Join(done, c)
		if next == v.dir || strings.HasPrefix(v.dir, next+"/") {
			done = next // the store directory and its ancestors
			continue
		}
		h, err := v.host(next)
		if err != nil {
			return "", notExist("resolving", p)
		}
		var st unix.Stat_t
		if err := unix.Lstat(h, &st); err != nil {
			return "", &fs.PathError{Op: "resolving", Path: p, Err: err}
		}
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			if links++; links > maxSymlinks {
				return "", &fs.PathError{Op: "resolving", Path: p, Err: unix.ELOOP}
			}
			target, err := os.Readlink(h)
			if err != nil {
				return "", fmt.Errorf("resolving '%s': %w", p, err)
			}
			if path.IsAbs(target) {
				done = "/"
			}
			rest = append(strings.Split(target, "/"), rest...)
			continue
		}
		if len(rest) > 0 && st.Mode&unix.S_IFMT != unix.S_IFDIR {
			// Only directories have entries.
			for len(rest) > 0 && (rest[0] == "" || rest[0] == ".") {
				rest = rest[1:]
			}
			if len(rest) > 0 {
				return "", &fs.PathError{Op: "resolving", Path: p, Err: unix.ENOTDIR}
			}
		}
		done = next
	}
	return done, nil
}

// stat is stat(2) in the view: it follows symlinks.
func (v *storeView) stat(p string) (string, unix.Stat_t, error) {
	var st unix.Stat_t
	canon, err := v.resolve(p)
	if err != nil {
		return "", st, err
	}
	if canon == v.dir || strings.HasPrefix(v.dir, canon+"/") || canon == "/" {
		st.Mode = unix.S_IFDIR | 0o555
		return canon, st, nil
	}
	h, err := v.host(canon)
	if err != nil {
		return "", st, err
	}
	if err := unix.Lstat(h, &st); err != nil {
		return "", st, &fs.PathError{Op: "stat", Path: p, Err: err}
	}
	return canon, st, nil
}

// readDir lists directory p (following symlinks), as readdir(3) does.
func (v *storeView) readDir(p string) ([]os.DirEntry, error) {
	canon, st, err := v.stat(p)
	if err != nil {
		return nil, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil, &fs.PathError{Op: "opening directory", Path: p, Err: unix.ENOTDIR}
	}
	h, err := v.host(canon)
	if err != nil {
		return nil, err
	}
	return os.ReadDir(h)
}

// readFile reads file p (following symlinks), which may hold at most
// limit bytes.
func (v *storeView) readFile(p string, limit int64) ([]byte, error) {
	canon, st, err := v.stat(p)
	if err != nil {
		return nil, err
	}
	if st.Size > limit {
		return nil, fmt.Errorf("reading '%s': larger than %d bytes", p, limit)
	}
	h, err := v.host(canon)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(h)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err == nil && int64(len(data)) > limit {
		err = fmt.Errorf("reading '%s': larger than %d bytes", p, limit)
	}
	return data, err
}

// mkdirOutput makes the output directory of a builtin. Nothing may be
// there: without the sandbox, build users can create entries in the store
// directory, and a symlink planted at the output path must not lead the
// daemon to write elsewhere. Once made, only the daemon can write in it.
func mkdirOutput(p string) error {
	return os.Mkdir(p, 0o755)
}

// errnoIs reports whether err carries one of errnos.
func errnoIs(err error, errnos ...unix.Errno) bool {
	for _, e := range errnos {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
