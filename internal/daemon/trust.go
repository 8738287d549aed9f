package daemon

import (
	"errors"
	"fmt"
	"net"
	"os/user"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/jobs"
)

// peer is who is on the other end of a connection.
type peer struct {
	pid     int32 // -1 if unknown
	uid     int   // -1 if unknown
	user    string
	trusted bool
	refused string // non-empty: why the connection is refused
	tenant  string // the listening socket's tenant, if any
	jobSock bool   // connected through a trusted=false (job) socket
	// hostFiles: the peer has the daemon's root directory, so its paths
	// name the daemon's files.
	hostFiles bool
	hook      bool       // the build hook's connection (its private socket)
	job       *jobs.Conn // the peer's job, if it is in a container
}

// trust names the peer's standing, as logs and metrics say it:
// "refused", "trusted" or "untrusted".
func (p peer) trust() string {
	switch {
	case p.refused != "":
		return "refused"
	case p.trusted:
		return "trusted"
	}
	return "untrusted"
}

func (p peer) pidString() string {
	if p.pid < 0 {
		return "<unknown>"
	}
	return strconv.Itoa(int(p.pid))
}

// peerCred reads SO_PEERCRED of a Unix socket connection.
func peerCred(nc net.Conn) (*unix.Ucred, error) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return nil, fmt.Errorf("peer credentials: %T is not a Unix socket", nc)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, fmt.Errorf("peer credentials: %w", err)
	}
	if serr != nil {
		return nil, fmt.Errorf("peer credentials: getsockopt SO_PEERCRED: %w", serr)
	}
	return cred, nil
}

// identify decides who the peer of nc is and whether it may connect, from
// SO_PEERCRED against trusted-users, allowed-users and build-users-group
// (§3.3). A peer whose credentials cannot be read is untrusted.
func (s *Server) identify(nc net.Conn) peer {
	p := peer{pid: -1, uid: -1, user: "<unknown>"}
	cred, err := peerCred(nc)
	if err != nil {
		s.log.Debug("cannot identify peer; treating it as untrusted", "err", err)
		if !matchUser(p.user, nil, s.opts.AllowedUsers) {
			p.refused = "peer credentials are unknown and allowed-users is not '*'"
		}
		return p
	}
	p.pid, p.uid = cred.Pid, int(cred.Uid)
	p.user = strconv.Itoa(int(cred.Uid))
	if u, err := user.LookupId(strconv.Itoa(int(cred.Uid))); err == nil {
		p.user = u.Username
	}
	primary := strconv.Itoa(int(cred.Gid))
	if g, err := user.LookupGroupId(primary); err == nil {
		primary = g.Name
	}
	groups := append([]string{primary}, supplementaryGroups(p.user)...)
	p.trusted = matchUser(p.user, groups, s.opts.TrustedUsers)
	switch {
	case s.opts.BuildUsersGroup != "" && primary == s.opts.BuildUsersGroup:
		p.refused = fmt.Sprintf("user '%s' is a build user (group '%s') and is not allowed to connect to the Nix daemon", p.user, primary)
		p.trusted = false
	case !p.trusted && !matchUser(p.user, groups, s.opts.AllowedUsers):
		p.refused = fmt.Sprintf("user '%s' is not allowed to connect to the Nix daemon", p.user)
	}
	return p
}

// supplementaryGroups returns the names of the groups name belongs to.
func supplementaryGroups(name string) []string {
	u, err := user.Lookup(name)
	if err != nil {
		return nil
	}
	ids, err := u.GroupIds()
	if err != nil {
		return nil
	}
	var out []string
	for _, id := range ids {
		if g, err := user.LookupGroupId(id); err == nil {
			out = append(out, g.Name)
		} else if !errors.Is(err, user.UnknownGroupIdError(id)) {
			out = append(out, id)
		}
	}
	return out
}

// matchUser reports whether a user in groups matches a nix.conf user list:
// "*" matches everyone, "@g" the members of g, anything else a user name.
func matchUser(name string, groups []string, list []string) bool {
	for _, e := range list {
		switch {
		case e == "*":
			return true
		case len(e) > 1 && e[0] == '@':
			if slices.Contains(groups, e[1:]) {
				return true
			}
		case e == name:
			return true
		}
	}
	return false
}

// untrusted is the error msg that refuses an untrusted client something,
// in Nix's words; on a job socket it says why the client is untrusted
// (container root is root).
func (c *conn) untrusted(msg string) error {
	if c.peer.jobSock {
		msg += " (every client of a job socket is untrusted)"
	}
	return errors.New(msg)
}
