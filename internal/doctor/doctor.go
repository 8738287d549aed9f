// Package doctor checks, from inside a CI job, that the job's Nix reaches
// the host's nixyard the way host passthrough needs: the socket answers,
// the protocol is understood, the host store is visible (read-only) at the
// root the store URL names, the job is untrusted, and its connections
// share a job session.
package doctor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nixyard/nixyard/internal/ci"
	"github.com/nixyard/nixyard/internal/daemon"
	"github.com/nixyard/nixyard/internal/daemon/client"
	"github.com/nixyard/nixyard/internal/daemon/wire"
	"github.com/nixyard/nixyard/internal/nix/hint"
	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// Status is the outcome of one check.
type Status int

// Check outcomes.
const (
	OK Status = iota
	Warn
	Fail
)

func (s Status) String() string { return [...]string{"ok", "warn", "FAIL"}[s] }

// Check is one finding.
type Check struct {
	Name   string
	Status Status
	Detail string
}

// Report is the findings, in order.
type Report struct{ Checks []Check }

// Failed reports whether any check failed.
func (r *Report) Failed() bool {
	for _, c := range r.Checks {
		if c.Status == Fail {
			return true
		}
	}
	return false
}

// Write prints the report, one check per line.
func (r *Report) Write(w io.Writer) error {
	for _, c := range r.Checks {
		if _, err := fmt.Fprintf(w, "%-4s %-10s %s\n", c.Status, c.Name, c.Detail); err != nil {
			return err
		}
	}
	return nil
}

// add records a check; the daemon's messages it quotes lose their
// terminal highlighting (a report goes to a CI job's log).
func (r *Report) add(name string, st Status, format string, args ...any) {
	r.Checks = append(r.Checks, Check{Name: name, Status: st, Detail: hint.Strip(fmt.Sprintf(format, args...))})
}

// ParseStoreURL returns the socket and store root of a daemon store URL:
// "daemon", "unix://PATH[?root=DIR]", or "" (same as "daemon").
func ParseStoreURL(s string) (socket, root string, err error) {
	if s == "" || s == "daemon" || s == "auto" {
		return "/nix/var/nix/daemon-socket/socket", "/", nil
	}
	u, err := url.Parse(s)
	if err != nil {
		return "", "", fmt.Errorf("store URL %q: %w", s, err)
	}
	if u.Scheme != "unix" {
		return "", "", fmt.Errorf("store URL %q is not a daemon store (want unix://SOCKET?root=DIR)", s)
	}
	socket = u.Path
	if socket == "" {
		socket = "/nix/var/nix/daemon-socket/socket"
	}
	root = u.Query().Get("root")
	if root == "" {
		root = "/"
	}
	return socket, root, nil
}

// Run checks the daemon store storeURL.
func Run(ctx context.Context, storeURL string) *Report {
	r := &Report{}
	sock, root, err := ParseStoreURL(storeURL)
	if err != nil {
		r.add("store-url", Fail, "%v", err)
		return r
	}
	r.add("store-url", OK, "%s (socket %s, store files under %s)", storeURLOrDefault(storeURL), sock, filepath.Join(root, "nix/store"))

	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", sock)
	if err != nil {
		advice := "is the daemon running (it may be restarting: try again in a minute) with a job socket (--listen HOST-PATH), and is that socket's directory mounted into the job at " + filepath.Dir(sock) + "?"
		switch {
		case errors.Is(err, unix.EACCES):
			advice = "the job's user may not connect: check the socket directory's permissions and allowed-users"
		case storeURL == "" || storeURL == "daemon" || storeURL == "auto":
			advice = fmt.Sprintf("NIX_REMOTE does not name the job socket: set it as `nixyard runner-config` does (NIX_REMOTE=unix://%s/socket?root=%s, say, with the socket's directory mounted at %[1]s); ", ci.SocketDir, ci.StoreRoot) + advice
		}
		r.add("socket", Fail, "cannot connect to %s: %v; %s", sock, err, advice)
		return r
	}
	c := client.New(nc)
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	var session string
	c.Activities = func(_, _ uint64, text string) {
		if strings.HasPrefix(text, daemon.SessionAnnouncementPrefix) {
			session = strings.TrimSpace(strings.TrimPrefix(text, daemon.SessionAnnouncementPrefix))
		}
	}
	// Offer the newest protocol the daemon may know, so that it sends the
	// trust flag (1.35+); nixyard answers 1.37.
	if err := c.Handshake(1<<8 | 37); err != nil {
		r.add("socket", Fail, "connected to %s, but the handshake failed: %v", sock, err)
		return r
	}
	r.add("socket", OK, "%s answers", sock)
	r.add("protocol", OK, "1.%d, daemon version %q", c.Minor, c.Version)
	c.Verbosity = 7 // nixyard names the session to a client that asks for everything
	if err := c.SetOptions(nil); err != nil {
		r.add("protocol", Fail, "SetOptions failed: %v", err)
		return r
	}

	switch c.Trust {
	case 2:
		r.add("trust", OK, "untrusted, as a job should be: no extra substituters, no unsigned imports, no repair")
	case 1:
		r.add("trust", Warn, "TRUSTED: this job may add substituters, import unsigned paths and collect the host's store; jobs should use a job socket (--listen PATH), not the daemon's default socket")
	default:
		r.add("trust", Warn, "the daemon did not say (protocol 1.%d < 1.35)", c.Minor)
	}
	switch {
	case session == "":
		r.add("session", Warn, "the daemon announced no session: it is not nixyard, so a job's paths are kept only while one connection is open")
	case strings.HasPrefix(session, "job=none"):
		r.add("session", Warn, "%s: per-connection temporary roots; the daemon sees this process in its own pid namespace (not in a container)", session)
	default:
		r.add("session", OK, "%s: paths this job uses stay alive until the job ends", session)
	}
	checkStore(ctx, r, c, root)
	return r
}

func storeURLOrDefault(s string) string {
	if s == "" {
		return "daemon"
	}
	return s
}

// checkStore checks that paths the daemon reports valid are under root,
// and that the store is read-only for the job.
func checkStore(ctx context.Context, r *Report, c *client.Client, root string) {
	dir := filepath.Join(root, "nix/store")
	f, err := os.Open(dir)
	if err != nil {
		r.add("store", Fail, "%s: %v; mount the host store there read-only (or fix ?root=)", dir, err)
		return
	}
	names, _ := f.Readdirnames(256)
	f.Close()
	var cand []storepath.Path
	for _, n := range names {
		if p, err := storepath.DefaultDir.Parse("/nix/store/" + n); err == nil {
			cand = append(cand, p)
		}
	}
	valid, err := c.QueryValidPaths(ctx, cand)
	if err != nil {
		r.add("store", Fail, "asking the daemon which paths are valid: %v", err)
		return
	}
	if len(valid) == 0 {
		var all []storepath.Path
		err := c.Do(23, nil, func(d *wire.Decoder) { all = d.Paths("paths", c.Dir) })
		switch {
		case err != nil:
			r.add("store", Fail, "listing the daemon's valid paths: %v", err)
		case len(all) == 0:
			r.add("store", Warn, "the daemon's store is empty, so it cannot be told whether %s is where it is", dir)
		default:
			r.add("store", Fail, "none of the daemon's %d valid paths (e.g. %s) is among the files in %s: the host store is mounted elsewhere, or ?root= is wrong", len(all), c.Dir.Abs(all[0]), dir)
			return
		}
	} else {
		r.add("store", OK, "%s holds the daemon's store (%d of %d entries checked are valid, e.g. %s)", dir, len(valid), len(cand), c.Dir.Abs(valid[0]))
	}
	switch err := unix.Access(dir, unix.W_OK); {
	case errors.Is(err, unix.EROFS):
		r.add("read-only", OK, "%s is mounted read-only: the job cannot change the host store except through the daemon", dir)
	case err == nil:
		r.add("read-only", Fail, "%s is writable from this job: a nix-collect-garbage with --store %s could delete the host's paths; mount it read-only", dir, root)
	default:
		r.add("read-only", OK, "%s is not writable by this job (%v)", dir, err)
	}
}
