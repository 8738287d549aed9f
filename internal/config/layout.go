package config

import (
	"path/filepath"

	"github.com/nixyard/nixyard/internal/nix/storepath"
)

// Layout says where a store keeps everything. Real* fields are file-system
// paths; StoreDir is the logical store directory written into store paths.
type Layout struct {
	Root         string        // chroot root ("" for the host store)
	StoreDir     storepath.Dir // logical, e.g. /nix/store
	RealStoreDir string        // Root + StoreDir
	StateDir     string        // e.g. /nix/var/nix (under Root for a chroot store)
	LogDir       string        // e.g. /nix/var/log/nix (under Root for a chroot store)
	SocketPath   string        // daemon socket
	ConfDir      string        // directory of nix.conf
	// UserPoolDir is where build users are locked, one lock file per
	// user: the host's state directory's userpool (NIX_STATE_DIR or
	// /nix/var/nix), whatever store is served, as in Nix. Every daemon on
	// the host that builds as the same users locks them there, so none
	// takes (and kills the builds of) a user another is building as.
	UserPoolDir string
}

// NewLayout computes the layout from the environment, as nix-daemon does. A
// non-empty root makes a chroot store: the logical store directory stays
// /nix/store (or NIX_STORE_DIR) and everything lives under root, including
// the default socket (nix-daemon would keep its socket in the host's state
// dir; under root, a private daemon needs nothing outside its root).
func NewLayout(root string, getenv func(string) string) Layout {
	env := func(name, def string) string {
		if v := getenv(name); v != "" {
			return v
		}
		return def
	}
	l := Layout{
		Root:     root,
		StoreDir: storepath.Dir(filepath.Clean(env("NIX_STORE_DIR", string(storepath.DefaultDir)))),
		ConfDir:  env("NIX_CONF_DIR", "/etc/nix"),
	}
	if root == "" {
		l.RealStoreDir = string(l.StoreDir)
		l.StateDir = env("NIX_STATE_DIR", "/nix/var/nix")
		l.LogDir = env("NIX_LOG_DIR", "/nix/var/log/nix")
	} else {
		l.RealStoreDir = filepath.Join(root, string(l.StoreDir))
		l.StateDir = filepath.Join(root, "/nix/var/nix")
		l.LogDir = filepath.Join(root, "/nix/var/log/nix")
	}
	l.SocketPath = env("NIX_DAEMON_SOCKET_PATH", filepath.Join(l.StateDir, "daemon-socket/socket"))
	l.UserPoolDir = filepath.Join(env("NIX_STATE_DIR", "/nix/var/nix"), "userpool")
	return l
}
