package build

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/nix/derivation"
)

// inputStaging is where the helper binds the real store read-only while
// it binds the inputs from there (inside the chroot, removed before the
// builder starts).
const inputStaging = "/.nixyard-inputs"

// initArg0 is argv[0] of the helper: when a binary linking this package
// starts with it, init runs the helper instead of the program.
const initArg0 = "nixyard-build-helper"

// initSpec tells the helper what to set up; it arrives on fd 3 as
// encode writes it (read by decodeSpec, and by the C helper of cgo
// builds, helper.c).
// The helper reports a setup failure as text on fd 4 (closed on exec, so
// EOF without text means the builder was executed).
type initSpec struct {
	Sandbox bool
	Root    string // sandbox root on the host
	// Inputs are the names of the input paths, bound read-only from
	// InputStore (the real store directory) to InputDir (the store
	// directory inside the sandbox): through one read-only bind of
	// InputStore at Root+inputStaging, so each input takes one mount.
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
}

type bindMount struct {
	Source, Target string // Target is absolute inside the sandbox
	ReadOnly       bool
}

func init() {
	if len(os.Args) == 0 || os.Args[0] != initArg0 {
		return
	}
	runtime.LockOSThread()
	status := os.NewFile(4, "status")
	err := helperMain()
	fmt.Fprintf(status, "%v\n", err)
	os.Exit(1)
}

// helperMain runs in the re-executed binary; it returns only on failure.
func helperMain() error {
	unix.CloseOnExec(4)
	data, err := io.ReadAll(os.NewFile(3, "spec"))
	if err != nil {
		return fmt.Errorf("reading the build spec: %w", err)
	}
	unix.Close(3)
	spec, err := decodeSpec(data)
	if err != nil {
		return fmt.Errorf("reading the build spec: %w", err)
	}
	if spec.Sandbox {
		if err := setupSandbox(spec); err != nil {
			return err
		}
	}
	if err := unix.Chdir(spec.Dir); err != nil {
		return fmt.Errorf("changing into '%s': %w", spec.Dir, err)
	}
	unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: unix.RLIM_INFINITY})
	if cur, _, errno := unix.Syscall(unix.SYS_PERSONALITY, 0xffffffff, 0, 0); errno == 0 {
		unix.Syscall(unix.SYS_PERSONALITY, cur|addrNoRandomize, 0, 0)
	}
	unix.Umask(0o022)
	err = syscall.Exec(spec.Builder, spec.Args, spec.Env)
	return fmt.Errorf("executing '%s': %w", spec.Builder, err)
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
	num(s.UID)
	num(s.GID)
	num(s.HostUID)
	num(s.HostGID)
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
	if bytes.Count(b, []byte{0}) != 15+len(s.Args)+len(s.Env)+len(s.Inputs)+3*len(s.Binds) {
		return nil, errors.New("an argument, environment variable or path of the builder contains a NUL byte")
	}
	return b, nil
}

// decodeSpec reads what encode wrote.
func decodeSpec(data []byte) (*initSpec, error) {
	var s initSpec
	bad := errors.New("malformed")
	str := func() string {
		i := bytes.IndexByte(data, 0)
		if i < 0 {
			data = nil
			return ""
		}
		v := string(data[:i])
		data = data[i+1:]
		return v
	}
	num := func() int {
		v, err := strconv.Atoi(str())
		if err != nil {
			bad = err
			data = nil
		}
		return v
	}
	list := func() []string {
		n := num()
		if n < 0 || n > len(data) {
			data = nil
			return nil
		}
		l := make([]string, n)
		for i := range l {
			l[i] = str()
		}
		return l
	}
	s.Sandbox = num() != 0
	s.Root = str()
	s.PrivateNetwork = num() != 0
	s.UID = num()
	s.GID = num()
	s.HostUID = num()
	s.HostGID = num()
	s.Dir = str()
	s.Builder = str()
	s.Args = list()
	s.Env = list()
	s.InputStore = str()
	s.InputDir = str()
	s.Inputs = list()
	n := num()
	if data == nil {
		return nil, bad
	}
	for range n {
		m := bindMount{Source: str(), Target: str()}
		m.ReadOnly = num() != 0
		if data == nil {
			return nil, bad
		}
		s.Binds = append(s.Binds, m)
	}
	return &s, nil
}

// setupSandbox runs as the first process of fresh user, mount, PID, IPC,
// UTS (and network) namespaces, with the capabilities the parent passed
// as ambient ones: it mounts the sandbox, pivots into it and becomes the
// sandbox user, as Nix's runChild.
func setupSandbox(spec *initSpec) error {
	if spec.PrivateNetwork {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			return fmt.Errorf("cannot open IP socket: %w", err)
		}
		ifr, err := unix.NewIfreq("lo")
		if err != nil {
			return err
		}
		ifr.SetUint16(unix.IFF_UP | unix.IFF_LOOPBACK | unix.IFF_RUNNING)
		if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
			return fmt.Errorf("cannot set loopback interface flags: %w", err)
		}
		unix.Close(fd)
	}
	if err := unix.Sethostname([]byte("localhost")); err != nil {
		return fmt.Errorf("cannot set host name: %w", err)
	}
	if err := unix.Setdomainname([]byte("(none)")); err != nil {
		return fmt.Errorf("cannot set domain name: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_PRIVATE|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("unable to make '/' private: %w", err)
	}
	root := spec.Root
	if err := unix.Mount(root, root, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("unable to bind mount '%s': %w", root, err)
	}
	if len(spec.Inputs) > 0 {
		// Binds of a read-only mount are read-only.
		staging := root + inputStaging
		if err := unix.Mount(spec.InputStore, staging, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind mount from '%s' to '%s' failed: %w", spec.InputStore, staging, err)
		}
		if err := remountReadOnly(staging); err != nil {
			return err
		}
		for _, n := range spec.Inputs {
			source, target := staging+"/"+n, root+spec.InputDir+"/"+n
			if err := unix.Mount(source, target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
				return fmt.Errorf("bind mount from '%s' to '%s' failed: %w", spec.InputStore+"/"+n, target, err)
			}
		}
		if err := unix.Unmount(staging, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmounting '%s': %w", staging, err)
		}
		if err := unix.Rmdir(staging); err != nil {
			return fmt.Errorf("removing '%s': %w", staging, err)
		}
	}
	for _, m := range spec.Binds {
		target := root + m.Target
		if err := unix.Mount(m.Source, target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind mount from '%s' to '%s' failed: %w", m.Source, target, err)
		}
		if m.ReadOnly {
			if err := remountReadOnly(target); err != nil {
				return err
			}
		}
	}
	if err := unix.Mount("none", root+"/proc", "proc", 0, ""); err != nil {
		return fmt.Errorf("mounting /proc: %w", err)
	}
	if _, err := os.Stat(root + "/dev/shm"); err == nil {
		if err := unix.Mount("none", root+"/dev/shm", "tmpfs", 0, "size=50%"); err != nil {
			return fmt.Errorf("mounting /dev/shm: %w", err)
		}
	}
	if _, err := os.Stat(root + "/dev/pts"); err == nil {
		if err := unix.Mount("none", root+"/dev/pts", "devpts", 0, "newinstance,mode=0620"); err == nil {
			unix.Chmod(root+"/dev/pts/ptmx", 0o666)
		} else if !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("mounting /dev/pts: %w", err)
		}
	}
	if err := unix.Chdir(root); err != nil {
		return fmt.Errorf("cannot change directory to '%s': %w", root, err)
	}
	if err := unix.Mkdir("real-root", 0); err != nil {
		return fmt.Errorf("cannot create real-root directory: %w", err)
	}
	if err := unix.PivotRoot(".", "real-root"); err != nil {
		return fmt.Errorf("cannot pivot old root directory onto '%s/real-root': %w", root, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("cannot change root directory to '%s': %w", root, err)
	}
	if err := unix.Unmount("real-root", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("cannot unmount real root filesystem: %w", err)
	}
	if err := unix.Rmdir("real-root"); err != nil {
		return fmt.Errorf("cannot remove real-root directory: %w", err)
	}
	if err := syscall.Setgid(spec.GID); err != nil {
		return fmt.Errorf("setgid failed: %w", err)
	}
	if err := syscall.Setuid(spec.UID); err != nil {
		return fmt.Errorf("setuid failed: %w", err)
	}
	// Nothing of the helper's privileges may reach the builder.
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("clearing ambient capabilities: %w", err)
	}
	unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0)
	return nil
}

// remountReadOnly makes the bind mount at target read-only. A remount in a
// user namespace must keep the flags the source mount is locked with.
func remountReadOnly(target string) error {
	var sfs unix.Statfs_t
	if err := unix.Statfs(target, &sfs); err != nil {
		return fmt.Errorf("statfs '%s': %w", target, err)
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_RDONLY)
	for _, f := range [][2]int64{
		{unix.ST_NOSUID, unix.MS_NOSUID}, {unix.ST_NODEV, unix.MS_NODEV}, {unix.ST_NOEXEC, unix.MS_NOEXEC},
		{unix.ST_NOATIME, unix.MS_NOATIME}, {unix.ST_NODIRATIME, unix.MS_NODIRATIME}, {unix.ST_RELATIME, unix.MS_RELATIME},
	} {
		if sfs.Flags&f[0] != 0 {
			flags |= uintptr(f[1])
		}
	}
	if err := unix.Mount("", target, "", flags, ""); err != nil {
		return fmt.Errorf("making '%s' read-only: %w", target, err)
	}
	return nil
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

// prepareChroot lays out the sandbox root on the host (Nix's startBuilder
// with useChroot): <real store>/<drv>.chroot with /tmp, /etc (passwd,
// group, hosts), the logical store directory, mount points for /dev, /proc,
// /build, every input (read-only) and every sandbox path (read-write).
func (j *job) prepareChroot(spec *initSpec) error {
	g := j.g
	b := g.b
	kind, _ := g.drv.Kind()
	fixed := kind == derivation.FixedOutput
	j.chroot = b.st.RealPath(g.drvPath) + ".chroot"
	if err := removeTree(j.chroot); err != nil {
		return err
	}
	if err := os.Mkdir(j.chroot, 0o750); err != nil {
		return err
	}
	if j.user != nil {
		if err := os.Chown(j.chroot, 0, j.hostGID); err != nil {
			return err
		}
	}
	root := j.chroot
	mkdir := func(p string, mode os.FileMode) error {
		if err := os.MkdirAll(root+p, 0o755); err != nil {
			return err
		}
		return os.Chmod(root+p, mode)
	}
	if err := mkdir("/tmp", 0o1777|os.ModeSticky); err != nil {
		return err
	}
	if err := os.Chmod(root+"/tmp", 0o777|os.ModeSticky); err != nil {
		return err
	}
	if err := mkdir("/etc", 0o755); err != nil {
		return err
	}
	files := map[string]string{
		"/etc/group": fmt.Sprintf("root:x:0:\nnixbld:!:%d:\nnogroup:x:65534:\n", sandboxGID),
		"/etc/passwd": fmt.Sprintf("root:x:0:0:Nix build user:%[3]s:/noshell\nnixbld:x:%[1]d:%[2]d:Nix build user:%[3]s:/noshell\nnobody:x:65534:65534:Nobody:/:/noshell\n",
			sandboxUID, sandboxGID, sandboxBuildDir),
	}
	if !fixed {
		files["/etc/hosts"] = "127.0.0.1 localhost\n::1 localhost\n"
	} else {
		files["/etc/nsswitch.conf"] = "hosts: files dns\nservices: files\n"
	}
	for p, data := range files {
		if err := os.WriteFile(root+p, []byte(data), 0o644); err != nil {
			return err
		}
	}
	storeDir := string(b.st.Dir())
	if err := mkdir(storeDir, 0o775|os.ModeSticky); err != nil {
		return err
	}
	if err := os.Chmod(root+storeDir, 0o775|os.ModeSticky); err != nil {
		return err
	}
	if err := os.Chown(root+storeDir, 0, j.hostGID); err != nil {
		return err
	}

	var binds []bindMount
	addBind := func(source, target string, ro, optional bool) error {
		st, err := os.Stat(source)
		if err != nil {
			if optional && errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return fmt.Errorf("getting attributes of path '%s': %w", source, err)
		}
		if st.IsDir() {
			if err := os.MkdirAll(root+target, 0o755); err != nil {
				return err
			}
		} else {
			if err := os.MkdirAll(filepath.Dir(root+target), 0o755); err != nil {
				return err
			}
			if err := os.WriteFile(root+target, nil, 0o644); err != nil {
				return err
			}
		}
		binds = append(binds, bindMount{Source: source, Target: target, ReadOnly: ro})
		return nil
	}
	// Inputs: a mount point for each (the helper binds them).
	var realStore string
	for _, p := range j.inputs {
		source, target := b.st.RealPath(p), b.abs(p)
		if realStore == "" {
			realStore = filepath.Dir(source)
		}
		if filepath.Dir(source) != realStore || filepath.Dir(target) != storeDir || filepath.Base(source) != filepath.Base(target) {
			return fmt.Errorf("input '%s' is not in the store", source)
		}
		var err error
		var st unix.Stat_t
		if err := unix.Stat(source, &st); err != nil {
			return fmt.Errorf("getting attributes of path '%s': %w", source, err)
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			err = unix.Mkdir(root+target, 0o755)
		} else {
			err = os.WriteFile(root+target, nil, 0o644)
		}
		if err != nil {
			return err
		}
		spec.Inputs = append(spec.Inputs, filepath.Base(source))
	}
	if len(spec.Inputs) > 0 {
		if err := os.Mkdir(root+inputStaging, 0o700); err != nil {
			return err
		}
		spec.InputStore, spec.InputDir = realStore, storeDir
	}
	if err := addBind(j.tmpDir, sandboxBuildDir, false, false); err != nil {
		return err
	}
	devInPaths := false
	for _, s := range b.cfg.SandboxPaths {
		sp, _ := parseSandboxPath(s)
		if sp.target == "/dev" {
			devInPaths = true
		}
		if err := addBind(sp.source, sp.target, false, sp.optional); err != nil {
			return err
		}
	}
	if !devInPaths {
		for _, d := range []string{"/dev/shm", "/dev/pts"} {
			if err := mkdir(d, 0o755); err != nil {
				return err
			}
		}
		for _, d := range []string{"/dev/full", "/dev/null", "/dev/random", "/dev/tty", "/dev/urandom", "/dev/zero"} {
			if err := addBind(d, d, false, true); err != nil {
				return err
			}
		}
		for link, target := range map[string]string{
			"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
			"/dev/stderr": "/proc/self/fd/2", "/dev/ptmx": "/dev/pts/ptmx",
		} {
			if err := os.Symlink(target, root+link); err != nil {
				return err
			}
		}
	}
	if fixed {
		for _, p := range []string{"/etc/resolv.conf", "/etc/services", "/etc/hosts"} {
			if err := addBind(p, p, true, true); err != nil {
				return err
			}
		}
	}
	if err := mkdir("/proc", 0o555); err != nil {
		return err
	}
	spec.Sandbox = true
	spec.Root = root
	spec.Binds = binds
	spec.PrivateNetwork = !fixed
	spec.UID, spec.GID = sandboxUID, sandboxGID
	spec.HostUID, spec.HostGID = j.hostUID, j.hostGID
	spec.Dir = sandboxBuildDir
	return nil
}

// addrNoRandomize is ADDR_NO_RANDOMIZE of personality(2): Nix disables
// address space randomisation for determinism.
const addrNoRandomize = 0x0040000
