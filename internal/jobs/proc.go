package jobs

// What the jobs read of procfs: a process's pid namespace, parent, pid
// within its namespace, start time and whether it has exited.

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// pidNSName names the pid namespace of inode number ino as pidNS does.
func pidNSName(ino uint64) string { return fmt.Sprintf("pid:[%d]", ino) }

// pidNS names pid's pid namespace ("pid:[4026531836]").
func (m *Manager) pidNS(pid int) (string, error) {
	return os.Readlink(filepath.Join(m.proc, strconv.Itoa(pid), "ns", "pid"))
}

// jobNS returns the pid namespace that names pid's job (as pidNS names
// it): of the pid namespaces pid is in, below the daemon's, the one
// m.depth levels down (1: a container's), or pid's own if it is not that
// deep. A job that makes namespaces of its own inside its container (a
// sandbox, a container in its container) is still one job, with one
// session and one connection limit: by its own namespace a client could
// take as many of each as it liked. The namespaces are walked up with
// NS_GET_PARENT, which the kernel answers, not the processes' parents,
// which may have gone. For a process in the daemon's own namespace it is
// the daemon's.
func (m *Manager) jobNS(pid int) (string, error) {
	fd, err := unix.Open(filepath.Join(m.proc, strconv.Itoa(pid), "ns", "pid"), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	var chain []uint64 // pid's namespace, then each parent's, up to the daemon's (excluded)
	defer func() { unix.Close(fd) }()
	for {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return "", err
		}
		if st.Dev == m.selfNSDev && st.Ino == m.selfNSIno {
			break
		}
		chain = append(chain, st.Ino)
		if len(chain) > 32 { // the kernel nests pid namespaces 32 deep at most
			return "", errors.New("no pid namespace above it is the daemon's")
		}
		parent, err := unix.IoctlRetInt(fd, unix.NS_GET_PARENT)
		if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) {
			// A kernel before 4.9 (or a sandbox) cannot say: the
			// client's own namespace names its job.
			m.noParents.Do(func() {
				m.log.Warn("the kernel cannot tell a pid namespace's parent (NS_GET_PARENT): a pid namespace a job makes inside its container is a job of its own", "err", err)
			})
			return pidNSName(chain[0]), nil
		}
		if err != nil {
			// EPERM: the namespace has no parent the daemon may see: the
			// client's is not below the daemon's.
			return "", fmt.Errorf("no pid namespace above the client's is the daemon's: %w", err)
		}
		unix.Close(fd)
		fd = parent
	}
	if len(chain) == 0 {
		return m.selfNS, nil
	}
	return pidNSName(chain[max(len(chain)-m.depth, 0)]), nil
}

// findInit returns the host pid of the init (pid 1) of namespace ns, which
// pid belongs to: first up pid's parents (processes of a namespace descend
// from its init, orphans are re-parented to it), else, for a process that
// joined the namespace with setns (docker exec), by scanning procfs.
func (m *Manager) findInit(pid int, ns string) (int, error) {
	for p, steps := pid, 0; p > 0 && steps < 4096; steps++ {
		st, err := m.status(p)
		if err != nil {
			break
		}
		if st.nsPID == 1 {
			if cur, err := m.pidNS(p); err == nil && cur == ns {
				return p, nil
			}
			// The init of a namespace nested in ns: ns's is further up.
		}
		p = st.ppid
	}
	ents, err := os.ReadDir(m.proc)
	if err != nil {
		return 0, fmt.Errorf("jobs: scanning %s: %w", m.proc, err)
	}
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if cur, err := m.pidNS(p); err != nil || cur != ns {
			continue
		}
		if st, err := m.status(p); err == nil && st.nsPID == 1 {
			return p, nil
		}
	}
	return 0, fmt.Errorf("jobs: no init process found for pid namespace %s of client pid %d", ns, pid)
}

type procStatus struct {
	ppid  int
	nsPID int // the pid in the innermost namespace (last NSpid field)
}

// status reads PPid and NSpid from /proc/<pid>/status.
func (m *Manager) status(pid int) (procStatus, error) {
	f, err := os.Open(filepath.Join(m.proc, strconv.Itoa(pid), "status"))
	if err != nil {
		return procStatus{}, err
	}
	defer f.Close()
	st := procStatus{ppid: -1, nsPID: -1}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) == 0 {
			continue
		}
		switch k {
		case "PPid":
			st.ppid, _ = strconv.Atoi(fs[0])
		case "NSpid":
			st.nsPID, _ = strconv.Atoi(fs[len(fs)-1])
		}
	}
	if err := sc.Err(); err != nil {
		return procStatus{}, fmt.Errorf("reading status of pid %d: %w", pid, err)
	}
	return st, nil
}

// procStat is what the jobs use of /proc/<pid>/stat.
type procStat struct {
	// exited: the process has exited and waits to be reaped (a pid
	// namespace whose init is a zombie has no live process left).
	exited    bool
	startTime uint64 // field 22, in clock ticks after boot
}

// stat reads /proc/<pid>/stat.
func (m *Manager) stat(pid int) (procStat, error) {
	fs, err := statFields(m.proc, pid, 22)
	if err != nil {
		return procStat{}, err
	}
	t, err := strconv.ParseUint(fs[22-3], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("stat of pid %d: start time: %w", pid, err)
	}
	return procStat{exited: fs[0] == "Z" || fs[0] == "X", startTime: t}, nil
}

// CPUTime returns the CPU time process pid has used, user and system, in
// clock ticks (fields 14 and 15 of /proc/<pid>/stat).
func CPUTime(pid int) (uint64, error) {
	fs, err := statFields("/proc", pid, 15)
	if err != nil {
		return 0, err
	}
	utime, err1 := strconv.ParseUint(fs[14-3], 10, 64)
	stime, err2 := strconv.ParseUint(fs[15-3], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("stat of pid %d: CPU time: %w", pid, err)
	}
	return utime + stime, nil
}

// statFields reads /proc/<pid>/stat under proc and returns its fields from
// field 3 (the state) on, at least up to field last.
func statFields(proc string, pid, last int) ([]string, error) {
	b, err := os.ReadFile(filepath.Join(proc, strconv.Itoa(pid), "stat"))
	if err != nil {
		return nil, err
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return nil, fmt.Errorf("malformed stat of pid %d", pid)
	}
	fs := strings.Fields(string(b[i+1:]))
	if len(fs) < last-2 {
		return nil, fmt.Errorf("malformed stat of pid %d", pid)
	}
	return fs, nil
}

// nsInode turns "pid:[4026531836]" into "4026531836".
func nsInode(link string) string {
	s := strings.TrimPrefix(link, "pid:[")
	return strings.TrimSuffix(s, "]")
}
