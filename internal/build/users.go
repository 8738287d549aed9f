package build

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// userPool hands out the members of the build users group, one build per
// user, with Nix's lock files (<state>/userpool/<uid>, flock), so a real
// nix-daemon on the same store never picks a user we use.
type userPool struct {
	group  string
	gid    int
	uids   []int
	groups map[int][]int // uid -> its supplementary groups, the build group aside
	dir    string
}

type buildUser struct {
	uid, gid int
	groups   []int // supplementary groups
	lock     *os.File
}

func newUserPool(group, dir string) (*userPool, error) {
	g, err := user.LookupGroup(group)
	if err != nil {
		return nil, err
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return nil, fmt.Errorf("group %q: gid %q: %w", group, g.Gid, err)
	}
	members, err := groupMembers(group)
	if err != nil {
		return nil, err
	}
	p := &userPool{group: group, gid: gid, dir: dir, groups: map[int][]int{}}
	self := os.Geteuid()
	for _, m := range members {
		u, err := user.Lookup(m)
		if err != nil {
			return nil, fmt.Errorf("build user %q of group %q: %w", m, group, err)
		}
		uid, err := strconv.Atoi(u.Uid)
		switch {
		case err != nil || uid < 0 || uid >= 1<<32-1:
			return nil, fmt.Errorf("build user %q of group %q: bad uid %q", m, group, u.Uid)
		case uid == 0:
			return nil, fmt.Errorf("build user %q of group %q is root", m, group)
		case uid == self:
			return nil, fmt.Errorf("the Nix user should not be a member of '%s'", group)
		}
		p.uids = append(p.uids, uid)
		// Its supplementary groups (kvm, say), which it keeps in builds
		// without the sandbox, as with Nix.
		if ids, err := u.GroupIds(); err == nil {
			for _, id := range ids {
				if n, err := strconv.Atoi(id); err == nil && n != gid {
					p.groups[uid] = append(p.groups[uid], n)
				}
			}
		}
	}
	if len(p.uids) == 0 {
		return nil, fmt.Errorf("the build users group '%s' has no members", group)
	}
	if dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// CheckBuildUsers says why group cannot be build-users-group (it does
// not exist, has no members, or one of them is root or the daemon's
// user), or nil if it can.
func CheckBuildUsers(group string) error {
	_, err := newUserPool(group, "")
	return err
}

// groupMembers reads the members of a group from /etc/group (getgrnam's
// gr_mem, which Nix uses).
func groupMembers(group string) ([]string, error) {
	f, err := os.Open("/etc/group")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) == 4 && fields[0] == group {
			if fields[3] == "" {
				return nil, nil
			}
			return strings.Split(fields[3], ","), nil
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("group '%s' not found in /etc/group", group)
}

// acquire takes a free build user, waiting (polling, as Nix does) while
// all are in use.
func (p *userPool) acquire(ctx context.Context, log *slog.Logger) (*buildUser, error) {
	warned := false
	for {
		for _, uid := range p.uids {
			f, err := os.OpenFile(filepath.Join(p.dir, strconv.Itoa(uid)), os.O_RDWR|os.O_CREATE, 0o600)
			if err != nil {
				return nil, err
			}
			if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
				f.Close()
				if errors.Is(err, unix.EWOULDBLOCK) {
					continue
				}
				return nil, err
			}
			return &buildUser{uid: uid, gid: p.gid, groups: p.groups[uid], lock: f}, nil
		}
		if !warned {
			log.Warn("all build users are currently in use; consider creating additional users and adding them to the build users group", "group", p.group)
			warned = true
		}
		beforeWait(ctx)
		t := time.NewTimer(200 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

func (u *buildUser) release() { u.lock.Close() }

// killAll kills every process running as the build user, as Nix's
// UserLock::kill: an unsandboxed builder can leave processes outside its
// process group (setsid), which could still change its outputs after they
// were checked. kill(2) with pid -1 reaches every process the caller may
// signal, so it is made by a process of its own (the build helper, in its
// kill-user mode) whose user IDs are all the build user's: it has no
// capabilities left, and its real UID matches no other user's processes.
// (Not by a thread of the daemon: the Go runtime may start threads from
// it, or keep it, with that identity.)
func (u *buildUser) killAll() error {
	if u.uid <= 0 || u.uid >= 1<<32-1 {
		return fmt.Errorf("refusing to kill the processes of uid %d", u.uid)
	}
	cmd := &exec.Cmd{Path: "/proc/self/exe", Args: []string{killUserArg0, strconv.Itoa(u.uid)}, Env: []string{}}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("killing the processes of build user %d: %v: %s", u.uid, err, strings.TrimSpace(string(out)))
	}
	return nil
}
