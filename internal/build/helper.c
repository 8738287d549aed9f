// The build helper, a C constructor that runs before the Go runtime: see
// helper.go. The spec's encoding is initSpec.encode's (sandbox.go).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

// The ID system calls taking 32-bit IDs: on i386 and 32-bit ARM the plain
// ones take 16-bit IDs.
#ifdef SYS_setuid32
#define NYB_SYS_SETUID SYS_setuid32
#define NYB_SYS_SETGID SYS_setgid32
#define NYB_SYS_SETGROUPS SYS_setgroups32
#define NYB_SYS_SETRESUID SYS_setresuid32
#else
#define NYB_SYS_SETUID SYS_setuid
#define NYB_SYS_SETGID SYS_setgid
#define NYB_SYS_SETGROUPS SYS_setgroups
#define NYB_SYS_SETRESUID SYS_setresuid
#endif

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

static void nyb_fail(const char *fmt, ...) {
	char msg[4096];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(msg, sizeof msg - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n > (int)sizeof msg - 2)
		n = sizeof msg - 2;
	msg[n++] = '\n';
	for (int off = 0; off < n;) {
		ssize_t w = write(4, msg + off, n - off);
		if (w <= 0)
			break;
		off += w;
	}
	_exit(1);
}

static char *nyb_buf, *nyb_pos, *nyb_end;

// nyb_next returns the next NUL-terminated field of the spec.
static char *nyb_next(void) {
	if (nyb_pos >= nyb_end)
		nyb_fail("reading the build spec: truncated");
	char *s = nyb_pos;
	char *z = memchr(nyb_pos, 0, nyb_end - nyb_pos);
	if (!z)
		nyb_fail("reading the build spec: truncated");
	nyb_pos = z + 1;
	return s;
}

static long nyb_num(void) {
	char *s = nyb_next(), *end;
	long v = strtol(s, &end, 10);
	if (*s == 0 || *end != 0)
		nyb_fail("reading the build spec: bad number '%s'", s);
	return v;
}

static void nyb_read_spec(void) {
	size_t cap = 1 << 16, len = 0;
	nyb_buf = malloc(cap);
	for (;;) {
		if (!nyb_buf)
			nyb_fail("reading the build spec: out of memory");
		if (len == cap) {
			cap *= 2;
			nyb_buf = realloc(nyb_buf, cap);
			continue;
		}
		ssize_t n = read(3, nyb_buf + len, cap - len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			nyb_fail("reading the build spec: %s", strerror(errno));
		}
		if (n == 0)
			break;
		len += n;
	}
	close(3);
	nyb_pos = nyb_buf;
	nyb_end = nyb_buf + len;
}

static char **nyb_list(void) {
	long n = nyb_num();
	if (n < 0 || n > 1 << 20)
		nyb_fail("reading the build spec: bad count");
	char **l = calloc(n + 1, sizeof *l);
	if (!l)
		nyb_fail("reading the build spec: out of memory");
	for (long i = 0; i < n; i++)
		l[i] = nyb_next();
	return l;
}

static void nyb_remount_ro(const char *target) {
	struct statvfs sfs;
	if (statvfs(target, &sfs) < 0)
		nyb_fail("statfs '%s': %s", target, strerror(errno));
	unsigned long flags = MS_BIND | MS_REMOUNT | MS_RDONLY;
	static const unsigned long m[][2] = {
		{ST_NOSUID, MS_NOSUID}, {ST_NODEV, MS_NODEV}, {ST_NOEXEC, MS_NOEXEC},
		{ST_NOATIME, MS_NOATIME}, {ST_NODIRATIME, MS_NODIRATIME}, {ST_RELATIME, MS_RELATIME},
	};
	for (size_t i = 0; i < sizeof m / sizeof m[0]; i++)
		if (sfs.f_flag & m[i][0])
			flags |= m[i][1];
	if (mount("", target, "", flags, NULL) < 0)
		nyb_fail("making '%s' read-only: %s", target, strerror(errno));
}

static char *nyb_join(const char *a, const char *b, const char *c) {
	size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
	char *s = malloc(la + lb + lc + 1);
	if (!s)
		nyb_fail("out of memory");
	memcpy(s, a, la);
	memcpy(s + la, b, lb);
	memcpy(s + la + lb, c, lc + 1);
	return s;
}

// nyb_write_proc writes data to /proc/PID/NAME (uid_map, gid_map or
// setgroups) in one write; it returns 0 or an errno.
static int nyb_write_proc(pid_t pid, const char *name, const char *data) {
	char p[64];
	snprintf(p, sizeof p, "/proc/%d/%s", (int)pid, name);
	int fd = open(p, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return errno;
	size_t len = strlen(data);
	ssize_t n = write(fd, data, len);
	int err = n < 0 ? errno : (size_t)n != len ? EIO : 0;
	close(fd);
	return err;
}

// nyb_spec is the decoded spec, except the binds, which the sandbox's
// process reads from the spec as it mounts them.
struct nyb_spec {
	int sandbox, private_net;
	int userns;    // sandboxed: in a user namespace (else as host_uid/host_gid)
	char *shm_size; // the size option of /dev/shm
	int filter_syscalls, no_new_privs;
	int drop_ids;  // unsandboxed: become host_uid/host_gid before the builder
	char **groups; // with drop_ids: the build user's supplementary groups
	pid_t parent;  // the daemon
	int uid, gid, host_uid, host_gid;
	char *root, *dir, *builder, *input_store, *input_dir;
	char **args, **env, **inputs;
	int go[2]; // a pipe: the sandbox's process waits on it for its ID maps
};

// nyb_mount_points creates, in the sandbox root on the host, an empty
// directory or file for each input to be bound on (as Nix's doBind does
// in the sandbox's process), or with remove set deletes them again once
// the sandbox is gone.
static void nyb_mount_points(const char *root, const char *input_store, const char *input_dir,
			    char **inputs, int remove) {
	char src[4096], dst[4096];
	for (char **p = inputs; *p; p++) {
		if (snprintf(dst, sizeof dst, "%s%s/%s", root, input_dir, *p) >= (int)sizeof dst)
			nyb_fail("input path '%s/%s' is too long", input_dir, *p);
		if (remove) {
			if (unlink(dst) < 0 && errno == EISDIR)
				rmdir(dst);
			continue;
		}
		struct stat st;
		snprintf(src, sizeof src, "%s/%s", input_store, *p);
		if (stat(src, &st) < 0)
			nyb_fail("getting attributes of path '%s': %s", src, strerror(errno));
		if (S_ISDIR(st.st_mode)) {
			if (mkdir(dst, 0755) < 0)
				nyb_fail("creating '%s': %s", dst, strerror(errno));
		} else {
			int fd = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
			if (fd < 0)
				nyb_fail("creating '%s': %s", dst, strerror(errno));
			close(fd);
		}
	}
}

static void nyb_setup_sandbox(const struct nyb_spec *s);
static void nyb_become_build_user(const struct nyb_spec *s, int check_parent);

// nyb_write_id_maps maps the sandbox's user and group in child's user
// namespace to the host's.
static void nyb_write_id_maps(const struct nyb_spec *s, pid_t child) {
	char map[64];
	int err;
	snprintf(map, sizeof map, "%d %d 1\n", s->uid, s->host_uid);
	if ((err = nyb_write_proc(child, "uid_map", map)) != 0) {
		kill(child, SIGKILL);
		nyb_fail("writing the user ID map of the sandbox: %s", strerror(err));
	}
	if ((err = nyb_write_proc(child, "setgroups", "deny")) != 0) {
		kill(child, SIGKILL);
		nyb_fail("denying setgroups in the sandbox: %s", strerror(err));
	}
	snprintf(map, sizeof map, "%d %d 1\n", s->gid, s->host_gid);
	if ((err = nyb_write_proc(child, "gid_map", map)) != 0) {
		kill(child, SIGKILL);
		nyb_fail("writing the group ID map of the sandbox: %s", strerror(err));
	}
}
static void nyb_exec_builder(const struct nyb_spec *s);
static void nyb_seccomp(const struct nyb_spec *s);

// nyb_sandbox_child is the sandbox's process: once the helper has written
// its ID maps it sets up the sandbox and becomes the builder. It shares
// the helper's memory (CLONE_VM), which the helper leaves alone meanwhile
// (it only waits).
static int nyb_sandbox_child(void *arg) {
	const struct nyb_spec *s = arg;
	close(s->go[1]);
	prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	char c;
	ssize_t n;
	do
		n = read(s->go[0], &c, 1);
	while (n < 0 && errno == EINTR);
	if (n != 1)
		_exit(1); // the helper failed (and said why) or died
	close(s->go[0]);
	nyb_setup_sandbox(s);
	nyb_exec_builder(s);
	return 1;
}

// nyb_spawn_sandbox makes the sandbox's process, as Nix's startBuilder
// does: the helper clones a child in fresh user, mount, PID, IPC, UTS (and
// network) namespaces, maps the sandbox's user and group in it to the
// host's, and lets it go on; the helper stays outside, waits for it,
// removes the inputs' mount points and exits as the child did. The daemon
// starts the helper with a plain (vfork) spawn: a clone of the daemon
// itself with CLONE_NEWUSER would copy its whole address space; the child
// shares the helper's memory until it execs the builder, so no address
// space is copied at all. The child is the first process of its PID
// namespace, so killing it kills the build; it shares the helper's
// process group, so the daemon kills both with one kill of the group.
static void nyb_spawn_sandbox(struct nyb_spec *s) {
	int *go = s->go;
	if (pipe2(go, O_CLOEXEC) < 0)
		nyb_fail("cannot create a pipe: %s", strerror(errno));
	int flags = CLONE_VM | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | SIGCHLD;
	if (s->userns)
		flags |= CLONE_NEWUSER;
	if (s->private_net)
		flags |= CLONE_NEWNET;
	const size_t stack_size = 256 << 10;
	char *stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
	if (stack == MAP_FAILED)
		nyb_fail("allocating a stack for the sandbox: %s", strerror(errno));
	// The daemon's supplementary groups must not reach the sandbox: once
	// setgroups is denied in it they could not be dropped (as Nix).
	if (getuid() == 0 && syscall(NYB_SYS_SETGROUPS, 0, NULL) < 0)
		nyb_fail("cannot drop supplementary groups: %s", strerror(errno));
	pid_t child = clone(nyb_sandbox_child, stack + stack_size, flags, s);
	if (child < 0)
		nyb_fail("cloning the builder: %s", strerror(errno));
	close(go[0]);
	if (s->userns)
		nyb_write_id_maps(s, child);
	if (write(go[1], "1", 1) != 1) {
		kill(child, SIGKILL);
		nyb_fail("starting the sandbox: %s", strerror(errno));
	}
	// From here the child reports on fd 4 and holds the output pipes. The
	// helper makes only system calls that succeed until the child has
	// exec'd or exited (the two share errno).
	close(go[1]);
	close(4);
	close(0);
	close(1);
	close(2);
	int status;
	while (waitpid(child, &status, 0) < 0)
		if (errno != EINTR)
			_exit(1);
	nyb_mount_points(s->root, s->input_store, s->input_dir, s->inputs, 1);
	if (WIFEXITED(status))
		_exit(WEXITSTATUS(status));
	if (WIFSIGNALED(status)) {
		// Die of the same signal, so the daemon sees the builder's status.
		int sig = WTERMSIG(status);
		signal(sig, SIG_DFL);
		sigset_t set;
		sigemptyset(&set);
		sigaddset(&set, sig);
		sigprocmask(SIG_UNBLOCK, &set, NULL);
		kill(getpid(), sig);
	}
	_exit(1);
}

static void nyb_setup_sandbox(const struct nyb_spec *s) {
	const char *root = s->root, *input_store = s->input_store, *input_dir = s->input_dir;
	char **inputs = s->inputs;
	int private_net = s->private_net, uid = s->uid, gid = s->gid;
	if (private_net) {
		int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			nyb_fail("cannot open IP socket: %s", strerror(errno));
		struct ifreq ifr;
		memset(&ifr, 0, sizeof ifr);
		strcpy(ifr.ifr_name, "lo");
		ifr.ifr_flags = IFF_UP | IFF_LOOPBACK | IFF_RUNNING;
		if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
			nyb_fail("cannot set loopback interface flags: %s", strerror(errno));
		close(fd);
	}
	if (sethostname("localhost", 9) < 0)
		nyb_fail("cannot set host name: %s", strerror(errno));
	if (setdomainname("(none)", 6) < 0)
		nyb_fail("cannot set domain name: %s", strerror(errno));
	if (mount("", "/", "", MS_PRIVATE | MS_REC, NULL) < 0)
		nyb_fail("unable to make '/' private: %s", strerror(errno));
	if (mount(root, root, "", MS_BIND, NULL) < 0)
		nyb_fail("unable to bind mount '%s': %s", root, strerror(errno));
	if (inputs[0]) {
		// Binds of a read-only mount are read-only.
		char *staging = nyb_join(root, "/.nixyard-inputs", "");
		if (mount(input_store, staging, "", MS_BIND, NULL) < 0)
			nyb_fail("bind mount from '%s' to '%s' failed: %s", input_store, staging, strerror(errno));
		nyb_remount_ro(staging);
		char *sdir = nyb_join(staging, "/", ""), *tdir = nyb_join(root, input_dir, "/");
		for (char **n = inputs; *n; n++) {
			char *source = nyb_join(sdir, *n, ""), *target = nyb_join(tdir, *n, "");
			if (mount(source, target, "", MS_BIND | MS_REC, NULL) < 0)
				nyb_fail("bind mount from '%s/%s' to '%s' failed: %s", input_store, *n, target, strerror(errno));
			free(source);
			free(target);
		}
		if (umount2(staging, MNT_DETACH) < 0)
			nyb_fail("unmounting '%s': %s", staging, strerror(errno));
		if (rmdir(staging) < 0)
			nyb_fail("removing '%s': %s", staging, strerror(errno));
	}
	long nbinds = nyb_num();
	size_t rootLen = strlen(root);
	char *target = NULL;
	size_t targetCap = 0;
	for (long i = 0; i < nbinds; i++) {
		char *src = nyb_next(), *tgt = nyb_next();
		int ro = nyb_num() != 0;
		size_t need = rootLen + strlen(tgt) + 1;
		if (need > targetCap) {
			targetCap = need * 2;
			target = realloc(target, targetCap);
			if (!target)
				nyb_fail("out of memory");
		}
		memcpy(target, root, rootLen);
		strcpy(target + rootLen, tgt);
		if (mount(src, target, "", MS_BIND | MS_REC, NULL) < 0)
			nyb_fail("bind mount from '%s' to '%s' failed: %s", src, target, strerror(errno));
		if (ro)
			nyb_remount_ro(target);
	}
	char p[4096];
	snprintf(p, sizeof p, "%s/proc", root);
	if (mount("none", p, "proc", 0, NULL) < 0)
		nyb_fail("mounting /proc: %s", strerror(errno));
	struct stat st;
	snprintf(p, sizeof p, "%s/dev/shm", root);
	if (stat(p, &st) == 0) {
		char opts[128];
		snprintf(opts, sizeof opts, "size=%s", s->shm_size);
		if (mount("none", p, "tmpfs", 0, opts) < 0)
			nyb_fail("mounting /dev/shm: %s", strerror(errno));
	}
	snprintf(p, sizeof p, "%s/dev/pts", root);
	if (stat(p, &st) == 0) {
		if (mount("none", p, "devpts", 0, "newinstance,mode=0620") == 0) {
			snprintf(p, sizeof p, "%s/dev/pts/ptmx", root);
			chmod(p, 0666);
		} else if (errno != EINVAL) {
			nyb_fail("mounting /dev/pts: %s", strerror(errno));
		}
	}
	if (chdir(root) < 0)
		nyb_fail("cannot change directory to '%s': %s", root, strerror(errno));
	if (mkdir("real-root", 0) < 0)
		nyb_fail("cannot create real-root directory: %s", strerror(errno));
	if (syscall(SYS_pivot_root, ".", "real-root") < 0)
		nyb_fail("cannot pivot old root directory onto '%s/real-root': %s", root, strerror(errno));
	if (chroot(".") < 0)
		nyb_fail("cannot change root directory to '%s': %s", root, strerror(errno));
	if (umount2("real-root", MNT_DETACH) < 0)
		nyb_fail("cannot unmount real root filesystem: %s", strerror(errno));
	if (rmdir("real-root") < 0)
		nyb_fail("cannot remove real-root directory: %s", strerror(errno));
	nyb_seccomp(s);
	if (!s->userns) {
		// As Nix without a user namespace: the builder is the build user
		// itself, never root (the daemon refuses such builds already).
		if (s->host_uid == 0 || s->host_gid == 0)
			nyb_fail("cannot perform a sandboxed build because user namespaces are not enabled; check /proc/sys/user/max_user_namespaces");
		nyb_become_build_user(s, 0);
		return;
	}
	// Raw system calls: one thread, and glibc's wrappers would broadcast
	// to threads that do not exist anyway.
	if (syscall(NYB_SYS_SETGID, gid) < 0)
		nyb_fail("setgid failed: %s", strerror(errno));
	if (syscall(NYB_SYS_SETUID, uid) < 0)
		nyb_fail("setuid failed: %s", strerror(errno));
	// Nothing of the helper's privileges may reach the builder.
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
		nyb_fail("clearing ambient capabilities: %s", strerror(errno));
	prctl(PR_SET_PDEATHSIG, 9 /* SIGKILL */, 0, 0, 0);
}

// The system calls Nix's seccomp filter refuses builders, per
// architecture: changing a mode to one with the setuid or setgid bit
// (EPERM: the mode is argument mode_arg), and setting extended attributes
// or ACLs, which a NAR cannot hold (ENOTSUP: mode_arg is -1).
struct nyb_rule {
	int nr, mode_arg;
};
static const struct nyb_rule nyb_x86_64[] = {
	{90, 1}, {91, 1}, {268, 2}, {452, 2}, // chmod, fchmod, fchmodat, fchmodat2
	{188, -1}, {189, -1}, {190, -1}, {463, -1}, // setxattr, lsetxattr, fsetxattr, setxattrat
	{0, 0},
};
static const struct nyb_rule nyb_i386[] = {
	{15, 1}, {94, 1}, {306, 2}, {452, 2},
	{226, -1}, {227, -1}, {228, -1}, {463, -1},
	{0, 0},
};
static const struct nyb_rule nyb_aarch64[] = {
	{52, 1}, {53, 2}, {452, 2},
	{5, -1}, {6, -1}, {7, -1}, {463, -1},
	{0, 0},
};
static const struct nyb_rule nyb_arm[] = {
	{15, 1}, {94, 1}, {333, 2}, {452, 2},
	{226, -1}, {227, -1}, {228, -1}, {463, -1},
	{0, 0},
};

// The filter reads the low half of 64-bit arguments at their offset, and
// covers the system calls of these hosts only: on others (which Nix's
// libseccomp filter covers too) builds need filter-syscalls = false.
#if (defined(__x86_64__) || defined(__i386__) || defined(__aarch64__) || defined(__arm__)) && \
	__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define NYB_SECCOMP_SUPPORTED 1
#else
#define NYB_SECCOMP_SUPPORTED 0
#endif

#define NYB_MAX_FILTER 256

static struct sock_filter nyb_filter[NYB_MAX_FILTER];
static int nyb_filter_len;

static void nyb_emit(struct sock_filter f) {
	if (nyb_filter_len == NYB_MAX_FILTER)
		nyb_fail("seccomp filter too long");
	nyb_filter[nyb_filter_len++] = f;
}

// nyb_emit_arch emits the checks for one architecture: when the
// architecture matches, the rules decide and everything else is allowed;
// when it does not, the program goes on after the block. mask clears
// the x32 bit of x86_64 system call numbers.
static void nyb_emit_arch(unsigned arch, const struct nyb_rule *rules, unsigned mask) {
	int check = nyb_filter_len;
	nyb_emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, arch, 0, 0)); // jf patched below
	nyb_emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)));
	nyb_emit((struct sock_filter)BPF_STMT(BPF_ALU | BPF_AND | BPF_K, mask));
	for (const struct nyb_rule *r = rules; r->nr; r++) {
		if (r->mode_arg < 0) {
			nyb_emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, r->nr, 0, 1));
			nyb_emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOTSUP));
			continue;
		}
		// The mode's low 32 bits (little-endian), masked with 06000.
		nyb_emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, r->nr, 0, 5));
		nyb_emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[r->mode_arg])));
		nyb_emit((struct sock_filter)BPF_STMT(BPF_ALU | BPF_AND | BPF_K, S_ISUID | S_ISGID));
		nyb_emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1));
		nyb_emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
		nyb_emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM));
	}
	nyb_emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
	int skip = nyb_filter_len - check - 1;
	if (skip > 255)
		nyb_fail("seccomp filter block too long");
	nyb_filter[check].jf = skip;
	// The next block starts by reloading the architecture.
	nyb_emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)));
}

// nyb_seccomp loads the filter of Nix's setupSeccomp, with no_new_privs
// unless allow-new-privileges, when filter-syscalls is on. It runs while
// the helper still has its privileges (in the sandbox's user namespace,
// or as the daemon's user), before it takes the build user's identity:
// without no_new_privs, loading a filter takes CAP_SYS_ADMIN. System calls
// of an architecture the filter does not know kill the process, as with
// libseccomp's default.
static void nyb_seccomp(const struct nyb_spec *s) {
	if (!s->filter_syscalls)
		return;
	if (!NYB_SECCOMP_SUPPORTED)
		nyb_fail("seccomp is not supported on this platform; you can bypass this error by setting the option "
			 "'filter-syscalls' to false, but note that untrusted builds can then create setuid binaries!");
	if (s->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		nyb_fail("setting no_new_privs: %s", strerror(errno));
	nyb_filter_len = 0;
	nyb_emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)));
	nyb_emit_arch(AUDIT_ARCH_X86_64, nyb_x86_64, ~0x40000000u);
	nyb_emit_arch(AUDIT_ARCH_I386, nyb_i386, ~0u);
	nyb_emit_arch(AUDIT_ARCH_AARCH64, nyb_aarch64, ~0u);
	nyb_emit_arch(AUDIT_ARCH_ARM, nyb_arm, ~0u);
	nyb_emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
	struct sock_fprog prog = {.len = nyb_filter_len, .filter = nyb_filter};
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) < 0)
		nyb_fail("unable to load seccomp BPF program: %s (set filter-syscalls = false to build without it)",
			 strerror(errno));
}

// nyb_become_build_user gives the helper (unsandboxed, or the sandbox's
// process without a user namespace) the build user's identity (its
// primary and supplementary groups first, as Nix), re-arms the
// parent-death signal that a change of UID clears, and checks that no
// root ID is left; with check_parent, that the daemon is still there.
static void nyb_become_build_user(const struct nyb_spec *s, int check_parent) {
	// Static: 2 × 256 KiB would overflow the sandbox process's stack.
	static gid_t groups[NGROUPS_MAX], got[NGROUPS_MAX];
	size_t n = 0;
	for (char **g = s->groups; *g && n < NGROUPS_MAX; g++)
		groups[n++] = (gid_t)strtoul(*g, NULL, 10);
	if (syscall(NYB_SYS_SETGROUPS, n, groups) < 0 || syscall(NYB_SYS_SETGID, s->host_gid) < 0 ||
	    syscall(NYB_SYS_SETUID, s->host_uid) < 0)
		nyb_fail("changing to the build user: %s", strerror(errno));
	uid_t ruid, euid, suid;
	gid_t rgid, egid, sgid;
	int ngot = getgroups(NGROUPS_MAX, got);
	if (getresuid(&ruid, &euid, &suid) < 0 || getresgid(&rgid, &egid, &sgid) < 0 ||
	    ruid != (uid_t)s->host_uid || euid != ruid || suid != ruid || rgid != (gid_t)s->host_gid || egid != rgid ||
	    sgid != rgid || ngot != (int)n)
		nyb_fail("changing to the build user: the IDs did not all change");
	for (int i = 0; i < ngot; i++)
		if (got[i] != groups[i])
			nyb_fail("changing to the build user: the supplementary groups did not change");
	// No capability may survive the change (securebits the daemon
	// inherited could keep them).
	struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
	struct __user_cap_data_struct caps[2];
	if (syscall(SYS_capget, &hdr, caps) < 0 || caps[0].effective || caps[1].effective || caps[0].permitted ||
	    caps[1].permitted)
		nyb_fail("changing to the build user: capabilities are left");
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
		nyb_fail("clearing ambient capabilities: %s", strerror(errno));
	prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	if (check_parent && getppid() != s->parent)
		_exit(1); // the daemon is gone
}

// nyb_exec_builder runs the builder (in the sandbox, if any).
static void nyb_exec_builder(const struct nyb_spec *s) {
	if (!s->sandbox) {
		nyb_seccomp(s);
		if (s->drop_ids)
			nyb_become_build_user(s, 1);
	}
	// As the builder's user: the build directory is that user's to
	// change until now.
	if (chdir(s->dir) < 0)
		nyb_fail("changing into '%s': %s", s->dir, strerror(errno));
	int cur = personality(0xffffffff);
	if (cur != -1)
		personality(cur | ADDR_NO_RANDOMIZE);
	umask(022);
	execve(s->builder, s->args, s->env);
	nyb_fail("executing '%s': %s", s->builder, strerror(errno));
}

// nyb_kill_user kills every process of uid, as Nix's UserLock::kill: with
// all its user IDs set to uid it has no capabilities left, and kill(-1)
// reaches exactly the processes whose real or saved user ID is uid
// (never this one).
static void nyb_kill_user(const char *arg) {
	char *end;
	errno = 0;
	long long uid = strtoll(arg, &end, 10);
	if (*arg == 0 || *end != 0 || errno != 0 || uid <= 0 || uid >= 0xffffffffLL) {
		fprintf(stderr, "bad uid '%s'\n", arg);
		_exit(2);
	}
	if (syscall(NYB_SYS_SETGROUPS, 0, NULL) < 0 || syscall(NYB_SYS_SETRESUID, (uid_t)uid, (uid_t)uid, (uid_t)uid) < 0) {
		fprintf(stderr, "cannot become uid %lld: %s\n", uid, strerror(errno));
		_exit(1);
	}
	// Nothing may let kill(-1) reach beyond uid's processes: all three
	// UIDs changed, and no capability kept (CAP_KILL above all).
	uid_t r, e, sv;
	struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
	struct __user_cap_data_struct caps[2];
	if (getresuid(&r, &e, &sv) < 0 || r != (uid_t)uid || e != r || sv != r ||
	    syscall(SYS_capget, &hdr, caps) < 0 || caps[0].effective || caps[1].effective || caps[0].permitted ||
	    caps[1].permitted) {
		fprintf(stderr, "refusing to kill: not reduced to uid %lld alone\n", uid);
		_exit(1);
	}
	while (kill(-1, SIGKILL) < 0) {
		if (errno == ESRCH || errno == EPERM)
			break; // none left
		if (errno != EINTR) {
			fprintf(stderr, "kill: %s\n", strerror(errno));
			_exit(1);
		}
	}
	_exit(0);
}

static int nyb_probe_child(void *arg) {
	(void)arg;
	return 0;
}

// nyb_probe_sandbox tells whether the namespaces of the sandbox can be
// made here: exit 0 if so, 4 if all but the user namespace can (as root),
// 3 if the kernel or a container refuses them (EPERM, EINVAL as for Nix;
// ENOSPC where user namespaces are limited to none), 1 on other errors.
static void nyb_probe_sandbox(void) {
	const size_t stack_size = 64 << 10;
	char *stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
	if (stack == MAP_FAILED)
		_exit(1);
	int flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET | SIGCHLD;
	int refused = 0;
	pid_t child = clone(nyb_probe_child, stack + stack_size, flags, NULL);
	if (child < 0 && (errno == EPERM || errno == EINVAL || errno == ENOSPC)) { // ENOSPC: no user namespaces allowed
		// As Nix, without the user namespace (root can do without).
		refused = 1;
		child = clone(nyb_probe_child, stack + stack_size, flags & ~CLONE_NEWUSER, NULL);
	}
	if (child < 0)
		_exit(errno == EPERM || errno == EINVAL || errno == ENOSPC ? 3 : 1);
	int status;
	while (waitpid(child, &status, 0) < 0 && errno == EINTR)
		;
	_exit(refused ? 4 : 0);
}

__attribute__((constructor)) static void nixyard_build_helper(int argc, char **argv, char **envp) {
	(void)envp;
	if (argc == 1 && argv && argv[0] && strcmp(argv[0], "nixyard-probe-sandbox") == 0)
		nyb_probe_sandbox();
	if (argc == 2 && argv && argv[0] && strcmp(argv[0], "nixyard-kill-user") == 0)
		nyb_kill_user(argv[1]);
	if (argc < 1 || !argv || !argv[0] || strcmp(argv[0], "nixyard-build-helper") != 0)
		return;
	fcntl(4, F_SETFD, FD_CLOEXEC);
	nyb_read_spec();
	static struct nyb_spec s;
	s.sandbox = nyb_num() != 0;
	s.root = nyb_next();
	s.private_net = nyb_num() != 0;
	s.userns = nyb_num() != 0;
	s.shm_size = nyb_next();
	s.uid = nyb_num();
	s.gid = nyb_num();
	s.host_uid = nyb_num();
	s.host_gid = nyb_num();
	long slack = nyb_num();
	if (slack > 0) // for the builder and every process of the sandbox
		prctl(PR_SET_TIMERSLACK, (unsigned long)slack, 0, 0, 0);
	s.filter_syscalls = nyb_num() != 0;
	s.no_new_privs = nyb_num() != 0;
	s.drop_ids = nyb_num() != 0;
	s.groups = nyb_list();
	s.parent = getppid();
	s.dir = nyb_next();
	s.builder = nyb_next();
	s.args = nyb_list();
	s.env = nyb_list();
	s.input_store = nyb_next();
	s.input_dir = nyb_next();
	s.inputs = nyb_list();
	// No core files, of the builder nor of the helper when it dies of the
	// builder's signal.
	struct rlimit rl = {0, RLIM_INFINITY};
	setrlimit(RLIMIT_CORE, &rl);
	if (s.sandbox) {
		nyb_mount_points(s.root, s.input_store, s.input_dir, s.inputs, 0);
		nyb_spawn_sandbox(&s); // does not return
	}
	nyb_exec_builder(&s);
}
