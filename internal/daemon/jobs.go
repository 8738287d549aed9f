package daemon

import (
	"errors"
	"fmt"

	"github.com/nixyard/nixyard/internal/jobs"
	"github.com/nixyard/nixyard/internal/store"
	"golang.org/x/sys/unix"
)

// applyPolicy adjusts the peer of a connection accepted on a socket with
// policy pol, and attaches it to its job, if it is in one.
func (s *Server) applyPolicy(p *peer, pol ListenPolicy) {
	if pol.Untrusted {
		p.trusted = false
		p.jobSock = true
	}
	if pol.Trusted {
		p.trusted, p.refused, p.hook = true, "", true
	}
	p.tenant = pol.Tenant
	if s.opts.Jobs == nil {
		return
	}
	if p.pid <= 0 {
		// The kernel gives no pid for a client outside the daemon's pid
		// namespace (a daemon run in a container of its own): its job
		// cannot be told, and on a job socket it is refused, not served
		// as if it were the host's (no session, no connection limit).
		if pol.Untrusted {
			s.outsideWarned.Do(func() {
				s.log.Warn("a job socket's client is outside the daemon's pid namespace, so its job cannot be told: run the daemon in the host's pid namespace; refusing such clients")
			})
			p.refused = "the daemon cannot see this client's process (it is outside the daemon's pid namespace), so it cannot tell which job the connection belongs to; the daemon must run in the host's pid namespace"
		}
		return
	}
	jc, err := s.opts.Jobs.Attach(int(p.pid), pol.Tenant)
	var tooMany *jobs.TooManyConnsError
	switch {
	case errors.Is(err, jobs.ErrNotJob):
		p.hostFiles = sameRoot(p.pid)
	case errors.As(err, &tooMany):
		p.refused = err.Error()
	case err != nil && pol.Untrusted:
		// A connection that cannot be counted against its job (the
		// daemon out of descriptors, say) is not served on a job socket.
		s.log.Warn("cannot find the job of a client; refusing it", "pid", p.pid, "err", err)
		p.refused = "the daemon cannot tell which job this connection belongs to; try again"
	case err != nil:
		// The client may have exited already; its connection then gets
		// per-connection roots, as with nix-daemon.
		s.log.Warn("cannot find the job of a client; using per-connection temporary roots", "pid", p.pid, "err", err)
	default:
		p.job = jc
	}
}

// sameRoot reports whether process pid has the daemon's root directory:
// its paths name the daemon's files. (Not whether it is in the daemon's
// mount namespace: a Nix client of a chroot store makes one of its own,
// a copy of the host's.)
func sameRoot(pid int32) bool {
	var theirs, ours unix.Stat_t
	if unix.Stat(fmt.Sprintf("/proc/%d/root", pid), &theirs) != nil || unix.Stat("/", &ours) != nil {
		return false
	}
	return theirs.Dev == ours.Dev && theirs.Ino == ours.Ino
}

// openSession returns the temporary roots of connection c: its job's, kept
// across the job's connections, or its own, dropped when it closes.
func (c *conn) openSession() (*store.Session, func()) {
	if c.peer.job != nil {
		// The job outlives the connection; serveNetConn releases it.
		return c.peer.job.Session(), func() {}
	}
	ss := c.st.OpenSession()
	return ss, func() {
		if err := ss.Close(); err != nil {
			c.log.Warn("closing store session", "err", err)
		}
	}
}

// sessionAnnouncement is the text of the activity the handshake starts and
// stops at once, so that `nixyard doctor` can see the connection's
// session. It is at level Vomit, which Nix clients do not show unless run
// with -vvvvvvv, and activities are part of the protocol since 1.20.
func (c *conn) sessionAnnouncement() string {
	trust := "trusted"
	if !c.peer.trusted {
		trust = "untrusted"
	}
	job := "none"
	if c.peer.job != nil {
		job = c.peer.job.ID()
	}
	tenant := c.peer.tenant
	if tenant == "" {
		tenant = "-"
	}
	return fmt.Sprintf("%s job=%s tenant=%s trust=%s", SessionAnnouncementPrefix, job, tenant, trust)
}

// SessionAnnouncementPrefix starts the text of the session activity a
// connection gets with a SetOptions at verbosity 7 (vomit): "nixyard-session:
// job=ID|none tenant=NAME|- trust=trusted|untrusted".
const SessionAnnouncementPrefix = "nixyard-session:"

// errJobGC refuses a deletion from a job socket.
var errJobGC = errors.New("deleting store paths is not allowed through a job socket: the host's store is shared by every job and is collected by the host")

// checkJobGC refuses, on a job socket, a collection that deletes: one
// job's `nix-collect-garbage` would otherwise empty the host's cache for
// every other job, and so would `nix-store --delete $(nix-store --gc
// --print-dead)`. A job cannot delete what it made either: its job
// session holds every path it used. Listing roots or dead paths stays
// allowed.
func (c *conn) checkJobGC(action store.GCAction) error {
	if c.peer.jobSock && (action == store.GCDeleteDead || action == store.GCDeleteSpecific) {
		return errJobGC
	}
	return nil
}

// downloadShare names whom the connection's downloads count with for the
// download slots: its CI job (all its connections), else its client
// process, else the connection alone.
func (c *conn) downloadShare() string {
	switch {
	case c.peer.job != nil:
		return "job " + c.peer.job.ID()
	case c.peer.pid > 0:
		return fmt.Sprintf("pid %d", c.peer.pid)
	}
	return fmt.Sprintf("connection %p", c)
}
