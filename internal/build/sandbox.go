package build

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/nixyard/nixyard/internal/nix/derivation"
)

// inputStaging is where the helper binds the real store read-only while
// it binds the inputs from there (inside the chroot, removed before the
// builder starts).
const inputStaging = "/.nixyard-inputs"

// initArg0 is argv[0] of the helper: when a binary linking this package
// starts with it, the helper (helper.c) runs instead of the program.
const initArg0 = "nixyard-build-helper"

// killUserArg0 is argv[0] of the helper's other mode: "killUserArg0 UID"
// kills every process of UID (buildUser.killAll).
const killUserArg0 = "nixyard-kill-user"

// probeArg0 is argv[0] of the helper's mode that tells whether the
// sandbox's namespaces can be made: exit status 0 if they can, 4 if only
// user namespaces are refused (a daemon running as root can do without
// them), 3 if they are refused.
const probeArg0 = "nixyard-probe-sandbox"

// errNoNamespaces says that the sandbox cannot be made here, in later
// Nix's words (2.8 says only "unable to start build process").
var errNoNamespaces = errors.New("this system does not support the kernel namespaces that are required for sandboxing; use '--no-sandbox' to disable sandboxing")

// namespaceSupport is what the kernel (or the container the daemon runs
// in) allows the sandbox.
type namespaceSupport int

const (
	namespacesAll    namespaceSupport = iota // user namespaces and the rest
	namespacesNoUser                         // all but user namespaces
	namespacesNone                           // none
)

// namespaceSupport probes, once, which namespaces the sandbox can have.
// As Nix 2.8: where user namespaces are refused, a daemon running as root
// sandboxes without one, the builder running as the build user itself.
func (b *Builder) namespaceSupport() namespaceSupport {
	b.probeOnce.Do(func() {
		err := (&exec.Cmd{Path: "/proc/self/exe", Args: []string{probeArg0}, Env: []string{}}).Run()
		var exit *exec.ExitError
		switch {
		case errors.As(err, &exit) && exit.ExitCode() == 3:
			b.namespaces = namespacesNone
			b.log.Warn("the kernel refuses the namespaces of the sandbox", "fallback", b.cfg.SandboxFallback)
		case errors.As(err, &exit) && exit.ExitCode() == 4:
			b.namespaces = namespacesNoUser
			b.log.Warn("the kernel refuses user namespaces: sandboxed builders run as their build user without one")
		}
	})
	return b.namespaces
}

// initSpec tells the helper what to set up; it arrives on fd 3 as encode
// writes it (read by helper.c). The helper reports a setup failure as
// text on fd 4 (closed on exec, so EOF without text means the builder was
// executed).
type initSpec struct {
	Sandbox bool
	// UserNS: the sandbox has a user namespace, in which UID and GID map
	// to HostUID and HostGID; without one (namespacesNoUser) the builder
	// runs as HostUID and HostGID with Groups, like an unsandboxed one.
	UserNS bool
	// ShmSize is the size option of the sandbox's /dev/shm tmpfs.
	ShmSize string
	Root    string // sandbox root on the host
	// Inputs are the names of the input paths, bound read-only from
	// InputStore (the real store directory) to InputDir (the store
	// directory inside the sandbox): through one read-only bind of
	// InputStore at Root+inputStaging, so each input takes one mount. The
	// helper makes their mount points (and removes them afterwards).
	InputStore, InputDir string
	Inputs               []string
	Binds                []bindMount // mounted under Root, after the inputs
	PrivateNetwork       bool
	UID, GID             int    // identity inside the sandbox
	HostUID, HostGID     int    // what UID and GID map to outside: the build user or the daemon's identity
	Dir                  string // working directory (inside the sandbox if Sandbox)
	Builder              string
	Args                 []string // argv, argv[0] included
	Env                  []string
	// TimerSlack is the builder's timer slack in nanoseconds (0: the
	// daemon's): what the daemon started with, before it widened its own.
	TimerSlack int
	// FilterSyscalls loads Nix's seccomp filter before the builder runs:
	// no setuid or setgid modes, no extended attributes (nix.conf
	// filter-syscalls), with no_new_privs if NoNewPrivileges (unless
	// nix.conf allow-new-privileges; as Nix, only with the filter).
	FilterSyscalls, NoNewPrivileges bool
	// DropIDs (unsandboxed) makes the helper, started with the daemon's
	// identity, take HostUID and HostGID just before it executes the
	// builder, after loading the filter.
	DropIDs bool
	// Groups are the build user's supplementary groups (with DropIDs).
	Groups []int
}

type bindMount struct {
	Source, Target string // Target is absolute inside the sandbox
	ReadOnly       bool
}

// encode writes the spec as NUL-terminated fields: the flags and numbers
// in decimal, each list preceded by its length, the binds after
// everything else (the C helper mounts them as it reads them).
func (s *initSpec) encode() ([]byte, error) {
	var b []byte
	str := func(v string) { b = append(append(b, v...), 0) }
	num := func(v int) { b = strconv.AppendInt(b, int64(v), 10); b = append(b, 0) }
	flag := func(v bool) {
		if v {
			num(1)
		} else {
			num(0)
		}
	}
	flag(s.Sandbox)
	str(s.Root)
	flag(s.PrivateNetwork)
	flag(s.UserNS)
	str(s.ShmSize)
	num(s.UID)
	num(s.GID)
	num(s.HostUID)
	num(s.HostGID)
	num(s.TimerSlack)
	flag(s.FilterSyscalls)
	flag(s.NoNewPrivileges)
	flag(s.DropIDs)
	num(len(s.Groups))
	for _, g := range s.Groups {
		num(g)
	}
	str(s.Dir)
	str(s.Builder)
	num(len(s.Args))
	for _, a := range s.Args {
		str(a)
	}
	num(len(s.Env))
	for _, e := range s.Env {
		str(e)
	}
	str(s.InputStore)
	str(s.InputDir)
	num(len(s.Inputs))
	for _, n := range s.Inputs {
		str(n)
	}
	num(len(s.Binds))
	for _, m := range s.Binds {
		str(m.Source)
		str(m.Target)
		flag(m.ReadOnly)
	}
	if bytes.Count(b, []byte{0}) != 22+len(s.Groups)+len(s.Args)+len(s.Env)+len(s.Inputs)+3*len(s.Binds) {
		return nil, errors.New("an argument, environment variable or path of the builder contains a NUL byte")
	}
	return b, nil
}

// sandboxPath is one entry of sandbox-paths.
type sandboxPath struct {
	target, source string
	optional       bool
}

func parseSandboxPath(s string) (sandboxPath, error) {
	var sp sandboxPath
	if rest, ok := strings.CutSuffix(s, "?"); ok {
		s, sp.optional = rest, true
	}
	sp.target, sp.source, _ = strings.Cut(s, "=")
	if sp.source == "" {
		sp.source = sp.target
	}
	if !filepath.IsAbs(sp.target) || !filepath.IsAbs(sp.source) {
		return sp, fmt.Errorf("sandbox path %q is not absolute", s)
	}
	return sp, nil
}

// allowedImpureHostDeps returns the derivation's __impureHostDeps, the host
// paths it wants in its sandbox, as Nix checks them: each must be one of
// allowed-impure-host-deps or under one (compared as written, without
// resolving symlinks, which would tell a client of files it may not read).
func (j *job) allowedImpureHostDeps() ([]string, error) {
	deps, _, err := j.g.attrs.Strings("__impureHostDeps")
	if err != nil {
		return nil, err
	}
	allowed := func(p string) bool {
		for _, a := range j.g.b.cfg.AllowedImpureHostDeps {
			ca := filepath.Clean(a)
			if p == ca || strings.HasPrefix(p, strings.TrimSuffix(ca, "/")+"/") {
				return true
			}
		}
		return false
	}
	var out []string
	for _, d := range deps {
		cd := filepath.Clean(d)
		if !filepath.IsAbs(d) || !allowed(cd) {
			return nil, fmt.Errorf("derivation '%s' requested impure path '%s', but it was not in allowed-impure-host-deps", j.drvAbs, d)
		}
		// As Nix, a path missing here is left out. Unlike Nix, one whose
		// symlinks lead out of what is allowed is refused too: the bind
		// mount would follow them.
		real, err := filepath.EvalSymlinks(cd)
		if err != nil {
			continue
		}
		if !allowed(real) {
			return nil, fmt.Errorf("derivation '%s' requested impure path '%s', which leads to '%s', not in allowed-impure-host-deps", j.drvAbs, d, real)
		}
		out = append(out, cd)
	}
	return out, nil
}

// prepareChroot lays out the sandbox root on the host (Nix's startBuilder
// with useChroot): <real store>/<drv>.chroot-<pid> with /tmp, /etc (passwd,
// group, hosts), the logical store directory, mount points for /dev, /proc,
// /build, every input (read-only) and every sandbox path (read-write).
func (j *job) prepareChroot(ctx context.Context, spec *initSpec) error {
	b := j.g.b
	kind, _ := j.g.drv.Kind()
	fixed := kind == derivation.FixedOutput
	if err := j.makeChroot(ctx); err != nil {
		return err
	}
	l := &chrootLayout{root: j.chroot}
	if err := l.mkdir("/tmp", 0o777|os.ModeSticky); err != nil {
		return err
	}
	if err := j.writeChrootEtc(l, spec, fixed); err != nil {
		return err
	}
	storeDir := string(b.st.Dir())
	if err := l.mkdir(storeDir, 0o775|os.ModeSticky); err != nil {
		return err
	}
	if err := os.Chown(l.root+storeDir, 0, j.hostGID); err != nil {
		return err
	}

	// Inputs: the helper makes their mount points and binds them.
	var realStore string
	for _, p := range j.inputs {
		source, target := b.st.RealPath(p), b.abs(p)
		if realStore == "" {
			realStore = filepath.Dir(source)
		}
		if filepath.Dir(source) != realStore || filepath.Dir(target) != storeDir || filepath.Base(source) != filepath.Base(target) {
			return fmt.Errorf("input '%s' is not in the store", source)
		}
		spec.Inputs = append(spec.Inputs, filepath.Base(source))
	}
	if len(spec.Inputs) > 0 {
		if err := os.Mkdir(l.root+inputStaging, 0o700); err != nil {
			return err
		}
		spec.InputStore, spec.InputDir = realStore, storeDir
	}
	if err := l.bind(j.tmpDir, b.cfg.SandboxBuildDir, false, false); err != nil {
		return err
	}
	for _, p := range j.impureHostDeps {
		if err := l.bind(p, p, false, false); err != nil {
			return err
		}
	}
	devInPaths := false
	for _, s := range b.cfg.SandboxPaths {
		sp, _ := parseSandboxPath(s)
		if sp.target == "/dev" {
			devInPaths = true
		}
		if err := l.bind(sp.source, sp.target, false, sp.optional); err != nil {
			return err
		}
	}
	extra, err := j.preBuildHook(ctx)
	if err != nil {
		return err
	}
	for _, sp := range extra {
		if sp.target == "/dev" {
			devInPaths = true
		}
		if err := l.bind(sp.source, sp.target, false, false); err != nil {
			return err
		}
	}
	if !devInPaths {
		if err := l.makeDev(); err != nil {
			return err
		}
	}
	if fixed {
		for _, p := range []string{"/etc/resolv.conf", "/etc/services", "/etc/hosts"} {
			if err := l.bind(p, p, true, true); err != nil {
				return err
			}
		}
	}
	if err := l.mkdir("/proc", 0o555); err != nil {
		return err
	}
	spec.Sandbox = true
	spec.Root = l.root
	spec.Binds = l.binds
	spec.PrivateNetwork = !fixed
	spec.HostUID, spec.HostGID = j.hostUID, j.hostGID
	spec.Dir = b.cfg.SandboxBuildDir
	spec.ShmSize = b.cfg.SandboxShmSize
	return nil
}

// makeChroot locks the sandbox root's name, <real store>/<drv>.chroot-<pid>
// (j.chroot; j.unlockChroot unlocks it), and makes it afresh, empty.
func (j *job) makeChroot(ctx context.Context) error {
	g := j.g
	b := g.b
	// Named for this process too: Nix building the same derivation in the
	// same store (directly, or a daemon being replaced) lays out
	// <drv>.chroot, after it has taken the outputs' locks, which this
	// daemon takes only once its sandbox is laid out.
	chroot := fmt.Sprintf("%s.chroot-%d", b.st.RealPath(g.drvPath), os.Getpid())
	unlock := g.held.takeChroot()
	if unlock == nil {
		var err error
		if unlock, err = b.lockChroot(ctx, chroot); err != nil {
			return err
		}
	}
	j.unlockChroot, j.chroot = unlock, chroot
	runTestHook(&testHookChrootLocked, g)
	g.each(func(c *call) {
		c.emit(func(p Progress) { p.Chatty(fmt.Sprintf("setting up chroot environment in '%s'", chroot)) })
	})
	if err := removeTree(j.chroot); err != nil {
		return err
	}
	if err := os.Mkdir(j.chroot, 0o750); err != nil {
		return err
	}
	if j.user != nil {
		return os.Chown(j.chroot, 0, j.hostGID)
	}
	return nil
}

// writeChrootEtc sets the builder's identity in spec and writes the
// sandbox's /etc: passwd and group for it, and hosts (or, for a
// fixed-output derivation, which sees the host's network, nsswitch.conf).
func (j *job) writeChrootEtc(l *chrootLayout, spec *initSpec, fixed bool) error {
	b := j.g.b
	if err := l.mkdir("/etc", 0o755); err != nil {
		return err
	}
	// The builder's identity: fixed in a user namespace, the build user's
	// own without one (as Nix's sandboxUid and sandboxGid).
	spec.UserNS = b.namespaceSupport() != namespacesNoUser
	spec.UID, spec.GID = sandboxUID, sandboxGID
	if !spec.UserNS {
		spec.UID, spec.GID = j.hostUID, j.hostGID
		if j.user != nil {
			spec.Groups = j.user.groups
		}
	}
	files := map[string]string{
		"/etc/group": fmt.Sprintf("root:x:0:\nnixbld:!:%d:\nnogroup:x:65534:\n", spec.GID),
		"/etc/passwd": fmt.Sprintf("root:x:0:0:Nix build user:%[3]s:/noshell\nnixbld:x:%[1]d:%[2]d:Nix build user:%[3]s:/noshell\nnobody:x:65534:65534:Nobody:/:/noshell\n",
			spec.UID, spec.GID, b.cfg.SandboxBuildDir),
	}
	if !fixed {
		files["/etc/hosts"] = "127.0.0.1 localhost\n::1 localhost\n"
	} else {
		files["/etc/nsswitch.conf"] = "hosts: files dns\nservices: files\n"
	}
	for p, data := range files {
		if err := os.WriteFile(l.root+p, []byte(data), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// chrootLayout is a sandbox root being laid out on the host: its
// directories and files are made under root, and the bind mounts that the
// helper will make are collected.
type chrootLayout struct {
	root  string
	binds []bindMount
}

// mkdir makes the directory p (a path in the sandbox) and its parents, and
// gives p mode (setting bits such as sticky that the umask would drop).
func (l *chrootLayout) mkdir(p string, mode os.FileMode) error {
	if err := os.MkdirAll(l.root+p, 0o755); err != nil {
		return err
	}
	return os.Chmod(l.root+p, mode)
}

// bind has the host's source mounted at target in the sandbox (read-only
// if ro), and makes its mount point. An optional source that does not
// exist is left out.
func (l *chrootLayout) bind(source, target string, ro, optional bool) error {
	if target = filepath.Clean(target); !filepath.IsAbs(target) || target == "/" {
		return fmt.Errorf("sandbox path '%s' is not an absolute path below /", target)
	}
	st, err := os.Stat(source)
	if err != nil {
		if optional && errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("getting attributes of path '%s': %w", source, err)
	}
	if st.IsDir() {
		if err := os.MkdirAll(l.root+target, 0o755); err != nil {
			return err
		}
	} else {
		if err := os.MkdirAll(filepath.Dir(l.root+target), 0o755); err != nil {
			return err
		}
		// A mount point; an existing file (of an earlier bind) is left as
		// it is.
		f, err := os.OpenFile(l.root+target, os.O_WRONLY|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		f.Close()
	}
	l.binds = append(l.binds, bindMount{Source: source, Target: target, ReadOnly: ro})
	return nil
}

// makeDev lays out the sandbox's /dev, when no sandbox path provides it:
// the host's harmless devices, mount points for shm and pts, and the links
// to /proc/self/fd and the pts multiplexer.
func (l *chrootLayout) makeDev() error {
	for _, d := range []string{"/dev/shm", "/dev/pts"} {
		if err := l.mkdir(d, 0o755); err != nil {
			return err
		}
	}
	for _, d := range []string{"/dev/full", "/dev/null", "/dev/random", "/dev/tty", "/dev/urandom", "/dev/zero"} {
		if err := l.bind(d, d, false, true); err != nil {
			return err
		}
	}
	for link, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
		"/dev/stderr": "/proc/self/fd/2", "/dev/ptmx": "/dev/pts/ptmx",
	} {
		if err := os.Symlink(target, l.root+link); err != nil {
			return err
		}
	}
	return nil
}
