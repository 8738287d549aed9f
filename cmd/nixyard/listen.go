package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nixyard/nixyard/internal/config"
	"github.com/nixyard/nixyard/internal/daemon"
	"github.com/nixyard/nixyard/internal/jobs"
	"github.com/nixyard/nixyard/internal/store"
)

// jobReapInterval is how often ended jobs are looked for between
// collections (each collection also looks first).
const jobReapInterval = time.Minute

// startJobs creates the job-session manager (nix.conf-style settings
// job-lease: a Go duration such as 6h, or seconds; job-max-connections)
// and its periodic reaper.
func startJobs(ctx context.Context, st *store.Store, settings *config.Settings, logger *slog.Logger) (*jobs.Manager, error) {
	lease := jobs.DefaultLease
	if v, ok := settings.Lookup("job-lease"); ok {
		d, err := parseLease(v)
		if err != nil {
			return nil, err
		}
		lease = d
	}
	maxConns := 0
	if v, ok := settings.Lookup("job-max-connections"); ok {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("setting job-max-connections: %q is not a positive number", v)
		}
		maxConns = n
	}
	jm, err := jobs.New(st, jobs.Options{Lease: lease, MaxConns: maxConns, Logger: logger})
	if err != nil {
		return nil, err
	}
	go jm.Run(ctx, jobReapInterval)
	return jm, nil
}

func parseLease(v string) (time.Duration, error) {
	if d, err := time.ParseDuration(v); err == nil && d > 0 {
		return d, nil
	}
	var secs int64
	if _, err := fmt.Sscan(v, &secs); err == nil && secs > 0 && fmt.Sprint(secs) == v {
		return time.Duration(secs) * time.Second, nil
	}
	return 0, fmt.Errorf("setting job-lease: %q is not a positive duration (e.g. 6h) or number of seconds", v)
}

// listenAll opens the default socket (Nix's uid-based trust) and every
// --listen socket with its policy. Under systemd socket activation the
// default socket is the one systemd passed, as for nix-daemon.
func listenAll(defaultPath string, specs []daemon.ListenSpec, logger *slog.Logger) ([]daemon.Listener, error) {
	l, err := daemon.SystemdListener(os.Getpid())
	switch {
	case err != nil:
		return nil, err
	case l != nil:
		logger.Info("using the socket passed by systemd", "socket", l.Addr().String())
	default:
		if l, err = listen(defaultPath); err != nil {
			return nil, err
		}
	}
	out := []daemon.Listener{{Listener: l}}
	seen := map[string]bool{filepath.Clean(l.Addr().String()): true}
	for _, s := range specs {
		p := filepath.Clean(s.Path)
		if seen[p] {
			for _, o := range out {
				o.Close()
			}
			return nil, fmt.Errorf("--listen %s: the daemon listens there already (its default socket, or a --listen given twice)", s.Path)
		}
		seen[p] = true
		if filepath.Dir(p) == filepath.Dir(filepath.Clean(defaultPath)) {
			logger.Warn("a job socket is in the default socket's directory: a job that mounts that directory reaches the default socket too, which trusts container root as root; give the job socket a directory of its own", "socket", s.Path)
		}
		l, err := listen(s.Path)
		if err != nil {
			for _, o := range out {
				o.Close()
			}
			return nil, err
		}
		out = append(out, daemon.Listener{Listener: l, Policy: s.Policy})
		logger.Info("listening on a job socket", "socket", s.Path, "untrusted", s.Policy.Untrusted, "tenant", s.Policy.Tenant)
	}
	return out, nil
}
