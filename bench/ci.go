package bench

// The CI scenario: a job's wall time to get a closure (a) today, into an
// empty per-job chroot store substituting everything from a local HTTP
// binary cache, (b) through nixyard's job socket on a cold host, (c) the
// same on a warm host. Jobs run in bubblewrap containers with the mounts
// and environment that `nixyard runner-config` prints (internal/ci).

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nixyard/nixyard/internal/ci"
)

// CIJobs runs jobs in containers for the CI scenario.
type CIJobs struct {
	Dir      string // scratch directory for job files and per-job stores
	CacheURL string // the binary cache, for case (a)
	roots    string // file listing the closure's roots, one per line
	conf     string // the jobs' NIX_CONF_DIR
}

// NewCIJobs writes the files jobs read: the closure's roots and a nix.conf.
func NewCIJobs(dir, cacheURL string, roots []string) (*CIJobs, error) {
	j := &CIJobs{Dir: dir, CacheURL: cacheURL, roots: filepath.Join(dir, "jobfiles", "roots"), conf: filepath.Join(dir, "jobfiles", "conf")}
	if err := os.MkdirAll(j.conf, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(j.roots, []byte(strings.Join(roots, "\n")+"\n"), 0o644); err != nil {
		return nil, err
	}
	conf := "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\n"
	if err := os.WriteFile(filepath.Join(j.conf, "nix.conf"), []byte(conf), 0o644); err != nil {
		return nil, err
	}
	return j, nil
}

// bwrap returns the command running script in a new container (pid,
// mount, ipc, uts namespaces; the host network, for the cache), with host
// /usr and /etc read-only, the job files at /jobfiles, extra binds, and env.
func (j *CIJobs) bwrap(ctx context.Context, binds [][3]string, env []string, script string) *exec.Cmd {
	args := []string{
		"--unshare-all", "--share-net", "--die-with-parent",
		"--ro-bind", "/usr", "/usr",
		"--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
		"--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
		"--ro-bind", "/etc", "/etc",
		"--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
		"--ro-bind", filepath.Dir(j.roots), "/jobfiles",
	}
	for _, b := range binds {
		args = append(args, b[0], b[1], b[2])
	}
	args = append(args, "--clearenv",
		"--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
		"--setenv", "NIX_CONF_DIR", "/jobfiles/conf", "--setenv", "NIX_USER_CONF_FILES", "",
		"--setenv", "NIX_STATE_DIR", "/tmp/nix-state", "--setenv", "NIX_LOG_DIR", "/tmp/nix-log",
		"--setenv", "XDG_CACHE_HOME", "/tmp/cache")
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		args = append(args, "--setenv", k, v)
	}
	args = append(args, "sh", "-c", script)
	cmd := exec.CommandContext(ctx, "bwrap", args...)
	cmd.Cancel = func() error { return KillTree(cmd.Process.Pid, time.Second) }
	return cmd
}

// realiseScript realises every root with nix-store -r (one client, as a
// job's `nix-store -r` or `nix-build` is), with extra arguments.
func realiseScript(extra string) string {
	return `set -e; xargs nix-store ` + extra + ` -r < /jobfiles/roots > /dev/null`
}

// EmptyStoreWave runs n jobs at once, each substituting the closure from
// the cache into its own fresh chroot store (case a), and returns the
// wave's wall time. The stores are removed afterwards.
func (j *CIJobs) EmptyStoreWave(ctx context.Context, tag string, n int) (time.Duration, error) {
	var cmds []*exec.Cmd
	var stores []string
	for i := range n {
		st := filepath.Join(j.Dir, fmt.Sprintf("job-store-%s-%d", tag, i))
		if err := os.MkdirAll(st, 0o755); err != nil {
			return 0, err
		}
		stores = append(stores, st)
		script := realiseScript(fmt.Sprintf("--store /job-store --option substituters %s --option require-sigs false", j.CacheURL))
		cmds = append(cmds, j.bwrap(ctx, [][3]string{{"--bind", st, "/job-store"}}, nil, script))
	}
	d, err := runWave(cmds)
	for _, st := range stores {
		if rerr := os.RemoveAll(st); rerr != nil && err == nil {
			err = rerr
		}
	}
	return d, err
}

// DaemonWave runs n jobs at once through the job socket of a nixyard
// serving the store at storeRoot (cases b and c).
func (j *CIJobs) DaemonWave(ctx context.Context, host ci.Host, n int) (time.Duration, error) {
	var binds [][3]string
	for _, m := range host.Mounts() {
		binds = append(binds, [3]string{"--ro-bind", m.Host, m.Container})
	}
	var cmds []*exec.Cmd
	for range n {
		cmds = append(cmds, j.bwrap(ctx, binds, host.Env(), realiseScript("")))
	}
	return runWave(cmds)
}

// runWave starts cmds at once and returns the time until the last ends.
func runWave(cmds []*exec.Cmd) (time.Duration, error) {
	outs := make([]strings.Builder, len(cmds))
	start := time.Now()
	for i, c := range cmds {
		c.Stderr = &outs[i]
		if err := c.Start(); err != nil {
			return 0, fmt.Errorf("starting job %d: %w", i, err)
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, len(cmds))
	for i, c := range cmds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.Wait(); err != nil {
				msg := outs[i].String()
				if len(msg) > 2000 {
					msg = msg[len(msg)-2000:]
				}
				errs[i] = fmt.Errorf("job %d: %w: %s", i, err, strings.TrimSpace(msg))
			}
		}()
	}
	wg.Wait()
	d := time.Since(start)
	for _, err := range errs {
		if err != nil {
			return d, err
		}
	}
	return d, nil
}
