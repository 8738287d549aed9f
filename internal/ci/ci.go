// Package ci describes how a CI job container reaches a host's nixyard:
// the mounts and environment of a job (host passthrough), and the runner
// configuration snippets made from them. The same description drives the
// end-to-end tests, so what nixyard prints is what is tested.
package ci

import (
	"fmt"
	"path/filepath"
	"strings"
)

// DefaultSocket is the job socket nixyard's examples use on the host. It is
// in its own directory, which is what a job mounts: a bind-mounted socket
// file would go stale when the daemon restarts and recreates it, and the
// default (trusted) socket's directory must never be visible to jobs.
const DefaultSocket = "/nix/var/nix/job-socket/socket"

// Container-side locations.
const (
	// StoreRoot is the job's view of the host store root: the host's
	// /nix/store appears at /mnt/nix/store, so an image's own /nix stays.
	StoreRoot = "/mnt"
	// SocketDir holds the job socket inside the container.
	SocketDir = "/run/nixyard"
)

// Host is where the host keeps its store and job socket.
type Host struct {
	// StoreRoot is the store's root: "/" for /nix/store, or the --store
	// directory of a nixyard serving a chroot store.
	StoreRoot string
	// Socket is the job socket (a --listen PATH,trusted=false).
	Socket string
}

// WithDefaults fills in the default store root and socket.
func (h Host) WithDefaults() Host {
	if h.StoreRoot == "" {
		h.StoreRoot = "/"
	}
	if h.Socket == "" {
		h.Socket = DefaultSocket
	}
	return h
}

// DefaultDaemonSocketDir holds nix-daemon's (and nixyard's) default
// socket, which trusts by uid: never for jobs.
const DefaultDaemonSocketDir = "/nix/var/nix/daemon-socket"

// Check refuses a host whose mounts would give jobs more than the job
// socket and the store: a socket in / (the host's root would be mounted)
// or beside the daemon's default, trusted socket; and paths that the
// daemon flag, the mounts or the snippet cannot carry as they are.
func (h Host) Check() error {
	h = h.WithDefaults()
	for _, p := range []string{h.Socket, h.StoreRoot} {
		if strings.ContainsAny(p, ", \t\n\"'\\:") {
			return fmt.Errorf("%q: a path with a comma, a colon, a quote, a backslash or white space cannot go into the daemon's --listen or a volume mount", p)
		}
	}
	switch dir := filepath.Clean(filepath.Dir(h.Socket)); {
	case dir == "/":
		return fmt.Errorf("socket %s: its directory is mounted into every job, and / is the host's root: put the job socket in a directory of its own", h.Socket)
	case dir == filepath.Join(filepath.Clean(h.StoreRoot), DefaultDaemonSocketDir) || dir == DefaultDaemonSocketDir:
		return fmt.Errorf("socket %s: its directory, which is mounted into every job, holds the daemon's default socket, which trusts container root as root: put the job socket in a directory of its own (default %s)", h.Socket, DefaultSocket)
	}
	return nil
}

// Mount is a bind mount into the job container. All are read-only.
type Mount struct {
	Host, Container string
}

// Mounts returns the job's bind mounts: the host store, read-only (a
// writable one lets a container's nix-collect-garbage delete the host's
// paths), and the job socket's directory (read-only too: connecting to a
// socket needs no write access to its file system). The host's state
// directory (database, roots, the trusted default socket) is not mounted.
func (h Host) Mounts() []Mount {
	h = h.WithDefaults()
	return []Mount{
		{Host: filepath.Join(h.StoreRoot, "nix", "store"), Container: filepath.Join(StoreRoot, "nix", "store")},
		{Host: filepath.Dir(h.Socket), Container: SocketDir},
	}
}

// StoreURL is the store the job's Nix uses: the daemon over the mounted
// socket, reading store files under /mnt (Nix clients read NAR contents
// from their own file system, so ?root= must name where the store is).
func (h Host) StoreURL() string {
	h = h.WithDefaults()
	return fmt.Sprintf("unix://%s/%s?root=%s", SocketDir, filepath.Base(h.Socket), StoreRoot)
}

// Env is the job's environment that points its Nix at nixyard.
func (h Host) Env() []string {
	return []string{"NIX_REMOTE=" + h.StoreURL()}
}

// DaemonFlag is the nixyard daemon argument that creates the job socket.
func (h Host) DaemonFlag() string {
	h = h.WithDefaults()
	flag := "--listen " + h.Socket + ",trusted=false,tenant=ci"
	if h.StoreRoot != "/" {
		flag = "--store " + h.StoreRoot + " " + flag
	}
	return flag
}

// GitLab returns a GitLab Runner [[runners]] snippet (docker executor).
func (h Host) GitLab() string {
	h = h.WithDefaults()
	var b strings.Builder
	fmt.Fprintf(&b, "# nixyard: host passthrough for Nix jobs. Start the daemon with\n#   nixyard daemon %s\n", h.DaemonFlag())
	fmt.Fprintf(&b, "# Jobs see the host store read-only at %s/nix/store and reach nixyard over\n", StoreRoot)
	fmt.Fprintf(&b, "# an untrusted job socket; results are at %s/nix/store/... inside the job.\n", StoreRoot)
	b.WriteString("[[runners]]\n")
	b.WriteString("  name = \"nixyard\"\n")
	b.WriteString("  executor = \"docker\"\n")
	b.WriteString("  environment = [" + quoteList(h.Env()) + "]\n")
	b.WriteString("  [runners.docker]\n")
	b.WriteString("    image = \"nixos/nix\"\n")
	var vols []string
	for _, m := range h.Mounts() {
		vols = append(vols, m.Host+":"+m.Container+":ro")
	}
	b.WriteString("    volumes = [" + quoteList(vols) + "]\n")
	return b.String()
}

func quoteList(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = fmt.Sprintf("%q", s)
	}
	return strings.Join(q, ", ")
}
