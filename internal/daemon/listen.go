package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
)

// ListenPolicy is how a listening socket treats its clients.
type ListenPolicy struct {
	// Untrusted makes every client untrusted whatever uid it has: a job
	// socket, bind-mounted into containers, where root in the container is
	// not root on the host.
	Untrusted bool
	// Trusted makes every client trusted, and lets every one connect: the
	// build hook's private socket, which only the daemon's user can reach.
	Trusted bool
	// Tenant names the socket's users in logs.
	Tenant string
	// MaxConns caps the connections open on the socket at once, refused
	// ones included (0: no cap): every job together cannot take the
	// daemon's descriptors from the host's own clients.
	MaxConns int
}

// DefaultListenMaxConns is the cap on a --listen socket's open connections
// without max-connections=N.
const DefaultListenMaxConns = 1024

// ListenSpec is one --listen argument:
// PATH[,trusted=false|users][,tenant=NAME][,max-connections=N].
type ListenSpec struct {
	Path   string
	Policy ListenPolicy
}

// ParseListenSpec parses a --listen argument (see ListenSpec).
func ParseListenSpec(s string) (ListenSpec, error) {
	parts := strings.Split(s, ",")
	// Untrusted unless asked: an extra socket is a job socket, and a job
	// socket that trusted container root by uid would let a job collect
	// the host's store.
	spec := ListenSpec{Path: parts[0], Policy: ListenPolicy{Untrusted: true, MaxConns: DefaultListenMaxConns}}
	if !filepath.IsAbs(spec.Path) {
		// A job's container mounts it by its path, and runner-config
		// takes absolute paths only.
		return spec, fmt.Errorf("--listen %q: the socket's path must be absolute", s)
	}
	for _, p := range parts[1:] {
		k, v, ok := strings.Cut(p, "=")
		if !ok {
			return spec, fmt.Errorf("--listen %q: %q is not KEY=VALUE", s, p)
		}
		switch k {
		case "trusted":
			switch v {
			case "false":
				spec.Policy.Untrusted = true
			case "users":
				// Nix's uid-based trust (trusted-users), as the default socket.
				spec.Policy.Untrusted = false
			default:
				return spec, fmt.Errorf("--listen %q: trusted=%q: want false (every client untrusted, the default) or users (trusted-users decides, as on the default socket)", s, v)
			}
		case "tenant":
			if v == "" {
				return spec, fmt.Errorf("--listen %q: empty tenant name", s)
			}
			spec.Policy.Tenant = v
		case "max-connections":
			n, err := strconv.Atoi(v)
			if err != nil || n <= 0 {
				return spec, fmt.Errorf("--listen %q: max-connections=%q is not a positive number", s, v)
			}
			spec.Policy.MaxConns = n
		default:
			return spec, fmt.Errorf("--listen %q: unknown key %q (want trusted, tenant or max-connections)", s, k)
		}
	}
	if spec.Policy.Tenant == "" {
		// Not the host's own connections' empty tenant, in logs and
		// metrics.
		spec.Policy.Tenant = spec.Path
	}
	return spec, nil
}

// Listener is a listening socket with its policy.
type Listener struct {
	net.Listener
	Policy ListenPolicy
}

// ServeAll serves every listener until ctx is done or one fails; it
// returns the first error. Once ctx is done, the sockets stop accepting
// (all but the build hook's, which the builds under way may need) and
// the connections open then are served on, until they end or
// Options.ShutdownGrace has passed (or Options.StopNow is closed); then
// the rest are closed, and their builds stopped.
func (s *Server) ServeAll(ctx context.Context, ls []Listener) error {
	accept, cancel := context.WithCancel(ctx)
	defer cancel()
	conns, stopConns := context.WithCancelCause(context.WithoutCancel(ctx))
	defer stopConns(errStopping)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for _, l := range ls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			until := accept
			if l.Policy.Trusted {
				until = conns // the build hook's: served while builds run
			}
			if err := s.serveListener(until, conns, l.Listener, l.Policy); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
				cancel()
			}
		}()
	}
	<-accept.Done()
	s.drain()
	s.closeIdle(0) // at once: there is no op to tell of the stop
	stopConns(errStopping)
	wg.Wait()
	return errors.Join(errs...)
}
